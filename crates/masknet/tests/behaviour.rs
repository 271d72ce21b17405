//! Hand-checkable constant-weight cases, the paper configuration, construction and input errors,
//! dropout, gradient flow and reproducibility of the MaskNet layers.

use candle_core::{DType, Device, ModuleT, Tensor};
use masknet::{MaskBlock, MaskBlockConfig, ParallelMaskNet, ParallelMaskNetConfig, SerialMaskNet, SerialMaskNetConfig};
use rankstack_nn::testing::{assert_all_params_get_gradients, parameter_bits, seeded_randn, set_parameter};
use rankstack_nn::{Activation, MlpConfig, SeededVarMap};

const DEV: Device = Device::Cpu;

/// m = z = q = 2, t = 1: W1 = [1 1], b1 = 0, W2 = [1 1]ᵀ, b2 = [0, 1], W_h = I, LN weight 1, bias 0.
fn hand_block(activation: Activation) -> (SeededVarMap, MaskBlock) {
    let store = SeededVarMap::new(0);
    let config =
        MaskBlockConfig { aggregation_dim: Some(1), activation, layer_norm_eps: 1e-12, ..MaskBlockConfig::new(2) };
    let block = MaskBlock::new(2, 2, &config, store.var_builder(DType::F64, &DEV)).unwrap();
    set_parameter(&store, "mask.aggregation.weight", &[1.0, 1.0]);
    set_parameter(&store, "mask.aggregation.bias", &[0.0]);
    set_parameter(&store, "mask.projection.weight", &[1.0, 1.0]);
    set_parameter(&store, "mask.projection.bias", &[0.0, 1.0]);
    set_parameter(&store, "hidden.weight", &[1.0, 0.0, 0.0, 1.0]);
    (store, block)
}

#[test]
fn mask_block_by_hand() {
    // v = h = [1, 2]: W1 v = 3, ReLU 3, mask = [3, 3] + [0, 1] = [3, 4]; mask ⊙ h = [3, 8]; W_h = I.
    // LN: mean 5.5, variance 6.25, std 2.5 → [−1, 1]. ReLU → [0, 1]; identity → [−1, 1].
    let v = Tensor::new(&[[1f64, 2.0]], &DEV).unwrap();
    let (_s, relu) = hand_block(Activation::Relu);
    assert_eq!(relu.mask(&v).unwrap().to_vec2::<f64>().unwrap(), vec![vec![3.0, 4.0]]);
    let y = relu.forward(&v, &v).unwrap().to_vec2::<f64>().unwrap();
    assert!((y[0][0] - 0.0).abs() < 1e-12 && (y[0][1] - 1.0).abs() < 1e-12, "{y:?}");
    let (_s, identity) = hand_block(Activation::Identity);
    let y = identity.forward(&v, &v).unwrap().to_vec2::<f64>().unwrap();
    assert!((y[0][0] + 1.0).abs() < 1e-12 && (y[0][1] - 1.0).abs() < 1e-12, "{y:?}");
}

#[test]
fn paper_configuration_is_one_line() {
    let store = SeededVarMap::new(0);
    let net = ParallelMaskNet::new(2144, &ParallelMaskNetConfig::paper(), store.var_builder(DType::F32, &DEV)).unwrap();
    assert_eq!(net.output_dim(), 3 * 512);
    assert_eq!(net.blocks().len(), 3);
    assert!(net.blocks().iter().all(|b| b.aggregation_dim() == 4288 && b.output_dim() == 512));
    // Per block: W1 4288×2144 + b1, W2 2144×4288 + b2, W_h 512×2144 (no bias), LN 2×512.
    let per_block = 4288 * 2144 + 4288 + 2144 * 4288 + 2144 + 512 * 2144 + 2 * 512;
    let total: usize = store.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(total, 3 * per_block);
    assert!(store.named_vars().iter().all(|(n, _)| !n.ends_with("hidden.bias")));
}

#[test]
fn serial_blocks_chain_and_mask_from_the_embedding() {
    let store = SeededVarMap::new(3);
    let config = SerialMaskNetConfig { blocks: vec![MaskBlockConfig::new(6), MaskBlockConfig::new(4)] };
    let net = SerialMaskNet::new(5, &config, store.var_builder(DType::F64, &DEV)).unwrap();
    assert_eq!((net.blocks()[1].mask_input_dim(), net.blocks()[1].hidden_input_dim()), (5, 6));
    let x = seeded_randn(1, &[3, 5], DType::F64);
    let h1 = net.blocks()[0].forward(&x, &x).unwrap();
    let want = net.blocks()[1].forward(&x, &h1).unwrap();
    let got = net.forward(&x).unwrap();
    assert_eq!(got.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
}

#[test]
fn dropout_only_in_training_and_reproducible() {
    let config = ParallelMaskNetConfig {
        num_blocks: 2,
        block: MaskBlockConfig { dropout: 0.5, ..MaskBlockConfig::new(16) },
        blocks: vec![],
        top_mlp: None,
    };
    let build = || {
        let store = SeededVarMap::new(1);
        ParallelMaskNet::new(8, &config, store.var_builder(DType::F32, &DEV)).unwrap()
    };
    let x = seeded_randn(2, &[4, 8], DType::F32);
    let (a, b) = (build(), build());
    let eval = a.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(eval, a.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap());
    let train_a = a.forward_t(&x, true).unwrap().to_vec2::<f32>().unwrap();
    let train_b = b.forward_t(&x, true).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(train_a, train_b, "same seed, same masks");
    assert_ne!(train_a, eval);
    let zeros = train_a.iter().flatten().filter(|v| **v == 0.0).count();
    assert!(zeros > 0);
}

fn err<T: std::fmt::Debug>(r: rankstack_nn::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn invalid_configs_fail_at_construction_naming_the_field() {
    let store = SeededVarMap::new(0);
    let vb = store.var_builder(DType::F32, &DEV);
    let block = |f: fn(&mut MaskBlockConfig)| {
        let mut c = MaskBlockConfig::new(4);
        f(&mut c);
        c
    };
    let cases: Vec<(MaskBlockConfig, &str)> = vec![
        (block(|c| c.projection_ratio = 0.0), "`projection_ratio`"),
        (block(|c| c.projection_ratio = -2.0), "`projection_ratio`"),
        (block(|c| c.projection_ratio = f64::NAN), "`projection_ratio`"),
        (block(|c| c.projection_ratio = 0.01), "`projection_ratio`"), // rounds to t = 0
        (block(|c| c.aggregation_dim = Some(0)), "`aggregation_dim`"),
        (block(|c| c.output_dim = 0), "`output_dim`"),
        (block(|c| c.dropout = 1.0), "`dropout`"),
        (block(|c| c.layer_norm_eps = 0.0), "`layer_norm_eps`"),
    ];
    for (config, field) in cases {
        let msg = err(MaskBlock::new(8, 8, &config, vb.clone()));
        assert!(msg.starts_with("MaskBlock: invalid config") && msg.contains(field), "{msg}");
        let parallel = ParallelMaskNetConfig { num_blocks: 3, block: config.clone(), blocks: vec![], top_mlp: None };
        let msg = err(ParallelMaskNet::new(8, &parallel, vb.clone()));
        assert!(
            msg.starts_with("ParallelMaskNet: invalid config") && msg.contains(&format!("`block.{}", &field[1..])),
            "{msg}"
        );
    }
    let zero_blocks = ParallelMaskNetConfig { num_blocks: 0, ..ParallelMaskNetConfig::paper() };
    assert!(err(ParallelMaskNet::new(8, &zero_blocks, vb.clone())).contains("`num_blocks`"));
    assert!(err(SerialMaskNet::new(8, &SerialMaskNetConfig { blocks: vec![] }, vb.clone())).contains("`blocks`"));
    let bad_second =
        SerialMaskNetConfig { blocks: vec![MaskBlockConfig::new(4), block(|c| c.aggregation_dim = Some(0))] };
    assert!(err(SerialMaskNet::new(8, &bad_second, vb.clone())).contains("`blocks[1].aggregation_dim`"));
    let bad_mlp = ParallelMaskNetConfig {
        num_blocks: 1,
        block: MaskBlockConfig::new(4),
        blocks: vec![],
        top_mlp: Some(MlpConfig::relu(vec![0])),
    };
    assert!(err(ParallelMaskNet::new(8, &bad_mlp, vb.clone())).contains("`top_mlp.dims[0]`"));
    assert!(err(ParallelMaskNet::new(0, &ParallelMaskNetConfig::paper(), vb)).contains("`input_dim`"));
}

#[test]
fn wrong_inputs_are_errors_naming_layer_and_shapes() {
    let store = SeededVarMap::new(0);
    let vb = store.var_builder(DType::F32, &DEV);
    let block = MaskBlock::new(6, 4, &MaskBlockConfig::new(3), vb.pp("b")).unwrap();
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &DEV).unwrap();
    let msg = block.forward(&z(&[2, 5]), &z(&[2, 4])).unwrap_err().to_string();
    assert!(msg.contains("MaskBlock: expected mask_input of shape [batch, 6], got [2, 5]"), "{msg}");
    let msg = block.forward(&z(&[2, 6]), &z(&[2, 6])).unwrap_err().to_string();
    assert!(msg.contains("MaskBlock: expected hidden_input of shape [batch, 4], got [2, 6]"), "{msg}");
    let msg = block.forward(&z(&[2, 6]), &z(&[3, 4])).unwrap_err().to_string();
    assert!(msg.contains("MaskBlock") && msg.contains("batch size 3"), "{msg}");
    let par = ParallelMaskNet::new(
        6,
        &ParallelMaskNetConfig { num_blocks: 2, block: MaskBlockConfig::new(3), blocks: vec![], top_mlp: None },
        vb.pp("p"),
    )
    .unwrap();
    let msg = par.forward(&z(&[2, 7])).unwrap_err().to_string();
    assert!(msg.contains("ParallelMaskNet: expected input of shape [batch, 6], got [2, 7]"), "{msg}");
    let ser =
        SerialMaskNet::new(6, &SerialMaskNetConfig { blocks: vec![MaskBlockConfig::new(3)] }, vb.pp("s")).unwrap();
    let msg = ser.forward(&z(&[6])).unwrap_err().to_string();
    assert!(msg.contains("SerialMaskNet: expected input of shape [batch, 6], got [6]"), "{msg}");
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let x = seeded_randn(5, &[16, 6], DType::F32);
    let loss = |y: Tensor| (y.clone() * seeded_randn(6, y.dims(), DType::F32)).unwrap().sum_all().unwrap();
    let full = MaskBlockConfig { hidden_bias: true, input_layer_norm: true, ..MaskBlockConfig::new(5) };
    let store = SeededVarMap::new(1);
    let top = MlpConfig {
        normalization: rankstack_nn::Normalization::LayerNorm,
        activate_last: false,
        ..MlpConfig::relu(vec![7, 3])
    };
    let net = ParallelMaskNet::new(
        6,
        &ParallelMaskNetConfig { num_blocks: 3, block: full.clone(), blocks: vec![], top_mlp: Some(top) },
        store.var_builder(DType::F32, &DEV),
    )
    .unwrap();
    assert_all_params_get_gradients(&store, &loss(net.forward_t(&x, true).unwrap()).backward().unwrap());
    let store = SeededVarMap::new(1);
    let blocks = vec![full.clone(), MaskBlockConfig { activation: Activation::Identity, ..full }];
    let net = SerialMaskNet::new(6, &SerialMaskNetConfig { blocks }, store.var_builder(DType::F32, &DEV)).unwrap();
    assert_all_params_get_gradients(&store, &loss(net.forward_t(&x, true).unwrap()).backward().unwrap());
}

#[test]
fn same_seed_gives_bit_identical_weights() {
    let bits = |seed| {
        let store = SeededVarMap::new(seed);
        let config =
            ParallelMaskNetConfig { num_blocks: 2, block: MaskBlockConfig::new(4), blocks: vec![], top_mlp: None };
        ParallelMaskNet::new(6, &config, store.var_builder(DType::F32, &DEV)).unwrap();
        parameter_bits(&store)
    };
    assert_eq!(bits(9), bits(9));
    assert_ne!(bits(9), bits(10));
}

#[test]
fn config_serde_defaults_and_unknown_keys() {
    let c: ParallelMaskNetConfig = serde_json::from_str(r#"{"num_blocks": 3, "block": {"output_dim": 512}}"#).unwrap();
    assert_eq!(c, ParallelMaskNetConfig::paper());
    let e = serde_json::from_str::<MaskBlockConfig>(r#"{"output_dim": 8, "ratio": 2}"#).unwrap_err();
    assert!(e.to_string().contains("ratio"), "{e}");
}

#[test]
fn reseeding_makes_dropout_a_function_of_the_seed() {
    use rankstack_nn::Reseed;
    let config = ParallelMaskNetConfig {
        num_blocks: 2,
        block: MaskBlockConfig { dropout: 0.5, ..MaskBlockConfig::new(8) },
        blocks: vec![],
        top_mlp: None,
    };
    let store = SeededVarMap::new(1);
    let net = ParallelMaskNet::new(8, &config, store.var_builder(DType::F32, &DEV)).unwrap();
    let x = seeded_randn(3, &[4, 8], DType::F32);
    net.reseed(42);
    let a = net.forward_t(&x, true).unwrap().to_vec2::<f32>().unwrap();
    let b = net.forward_t(&x, true).unwrap().to_vec2::<f32>().unwrap();
    net.reseed(42);
    let c = net.forward_t(&x, true).unwrap().to_vec2::<f32>().unwrap();
    assert_ne!(a, b, "the stream advances between steps");
    assert_eq!(a, c, "reseeding with the same seed replays it");
    // Sibling blocks get distinct derived seeds, so their masks differ.
    assert_ne!(net.blocks()[0].dropout().rng_state(), net.blocks()[1].dropout().rng_state());
}
