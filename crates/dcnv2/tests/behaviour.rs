//! Hand-checkable constant-weight cases, construction and input errors, gradient flow and
//! reproducibility of the DCN-V2 layers.

use candle_core::{DType, Device, Module, Tensor};
use dcnv2::{Combine, CrossLayerKind, CrossNet, CrossNetConfig, ParallelCrossNet, ParallelCrossNetConfig};
use rankstack_nn::testing::{assert_all_params_get_gradients, parameter_bits, seeded_randn, set_parameter};
use rankstack_nn::{Activation, SeededVarMap};

const DEV: Device = Device::Cpu;

fn set(store: &SeededVarMap, name: &str, rows: &[&[f64]]) {
    set_parameter(store, name, &rows.concat());
}

fn run(net: &impl Module, x: &[f64]) -> Vec<f64> {
    net.forward(&Tensor::new(x, &DEV).unwrap().unsqueeze(0).unwrap()).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

#[test]
fn full_rank_two_layers_by_hand() {
    // x0 = [1, 2], W = 0.5·I, b = [1, −1] in both layers.
    // Layer 1: W x0 + b = [1.5, 0];  x0 ⊙ that = [1.5, 0];  + x0 = [2.5, 2].
    // Layer 2: W x1 + b = [2.25, 0]; x0 ⊙ that = [2.25, 0]; + x1 = [4.75, 2].
    let store = SeededVarMap::new(0);
    let net = CrossNet::new(2, &CrossNetConfig::full_rank(2), store.var_builder(DType::F64, &DEV)).unwrap();
    for l in 0..2 {
        set(&store, &format!("layers.{l}.weight"), &[&[0.5, 0.0], &[0.0, 0.5]]);
        set(&store, &format!("layers.{l}.bias"), &[&[1.0, -1.0]]);
    }
    assert_eq!(run(&net, &[1.0, 2.0]), vec![4.75, 2.0]);
}

#[test]
fn diag_scale_by_hand() {
    // One layer, s = 1: W x0 + b + x0 = [0.5 + 1 + 1, 1 − 1 + 2] = [2.5, 2]; x0 ⊙ = [2.5, 4]; + x0 = [3.5, 6].
    let store = SeededVarMap::new(0);
    let config = CrossNetConfig { diag_scale: 1.0, ..CrossNetConfig::full_rank(1) };
    let net = CrossNet::new(2, &config, store.var_builder(DType::F64, &DEV)).unwrap();
    set(&store, "layers.0.weight", &[&[0.5, 0.0], &[0.0, 0.5]]);
    set(&store, "layers.0.bias", &[&[1.0, -1.0]]);
    assert_eq!(run(&net, &[1.0, 2.0]), vec![3.5, 6.0]);
}

#[test]
fn low_rank_by_hand() {
    // r = 1, V = [1 1], U = [1 2]ᵀ, b = 0, x0 = [1, 2]: V x0 = 3, U(V x0) = [3, 6], x0 ⊙ = [3, 12], + x0 = [4, 14].
    let store = SeededVarMap::new(0);
    let net = CrossNet::new(2, &CrossNetConfig::low_rank(1, 1), store.var_builder(DType::F64, &DEV)).unwrap();
    set(&store, "layers.0.v.weight", &[&[1.0, 1.0]]);
    set(&store, "layers.0.u.weight", &[&[1.0], &[2.0]]);
    assert_eq!(run(&net, &[1.0, 2.0]), vec![4.0, 14.0]);
}

#[test]
fn vector_two_layers_by_hand() {
    // DCN-V1: x' = x0 (xᵀw) + b + x, w = [1, 1], b = [1, −1], x0 = [1, 2].
    // Layer 1: x0ᵀw = 3; x0·3 = [3, 6]; + b = [4, 5]; + x0 = [5, 7].
    // Layer 2: x1ᵀw = 12; x0·12 = [12, 24]; + b = [13, 23]; + x1 = [18, 30].
    let store = SeededVarMap::new(0);
    let net = CrossNet::new(2, &CrossNetConfig::vector(2), store.var_builder(DType::F64, &DEV)).unwrap();
    for l in 0..2 {
        set(&store, &format!("layers.{l}.weight"), &[&[1.0, 1.0]]);
        set(&store, &format!("layers.{l}.bias"), &[&[1.0, -1.0]]);
    }
    assert_eq!(run(&net, &[1.0, 2.0]), vec![18.0, 30.0]);
    assert_eq!(
        store.named_vars().iter().map(|(n, v)| (n.as_str(), v.dims().to_vec())).collect::<Vec<_>>(),
        [
            ("layers.0.bias", vec![2]),
            ("layers.0.weight", vec![1, 2]),
            ("layers.1.bias", vec![2]),
            ("layers.1.weight", vec![1, 2]),
        ]
    );
    let config = CrossNetConfig { diag_scale: 0.5, ..CrossNetConfig::vector(1) };
    let err = CrossNet::new(2, &config, SeededVarMap::new(0).var_builder(DType::F64, &DEV)).unwrap_err().to_string();
    assert!(err.contains("invalid config `diag_scale`") && err.contains("vector"), "{err}");
}

fn two_expert_net(activation: Activation) -> (SeededVarMap, CrossNet) {
    // Two rank-1 experts with zero gates, so g = [1/2, 1/2]. Expert 0: V = [1 0], expert 1: V = [0 −1];
    // both C = [1], U = [1 1]ᵀ; b = 0.
    let store = SeededVarMap::new(0);
    let config = CrossNetConfig {
        num_layers: 1,
        layer: CrossLayerKind::Mixture { rank: 1, num_experts: 2, activation, shared_gates: false },
        diag_scale: 0.0,
    };
    let net = CrossNet::new(2, &config, store.var_builder(DType::F64, &DEV)).unwrap();
    set(&store, "layers.0.experts.0.v.weight", &[&[1.0, 0.0]]);
    set(&store, "layers.0.experts.1.v.weight", &[&[0.0, -1.0]]);
    for e in 0..2 {
        set(&store, &format!("layers.0.experts.{e}.c.weight"), &[&[1.0]]);
        set(&store, &format!("layers.0.experts.{e}.u.weight"), &[&[1.0], &[1.0]]);
        set(&store, &format!("layers.0.gates.{e}.weight"), &[&[0.0, 0.0]]);
    }
    (store, net)
}

#[test]
fn mixture_relu_by_hand() {
    // x0 = [1, 2]. Expert 0: relu(V x0) = 1, relu(C·1) = 1, U·1 = [1, 1]. Expert 1: relu(−2) = 0 → [0, 0].
    // Mixed: ½[1, 1] = [0.5, 0.5]; x0 ⊙ = [0.5, 1]; + x0 = [1.5, 3].
    let (_store, net) = two_expert_net(Activation::Relu);
    assert_eq!(run(&net, &[1.0, 2.0]), vec![1.5, 3.0]);
}

#[test]
fn mixture_tanh_by_hand() {
    // Expert 0: tanh(tanh(1)) = a; expert 1: tanh(tanh(−2)) = c. Mixed: (a + c)/2 in both coordinates;
    // output = x0 ⊙ (a + c)/2 + x0 = [1, 2] · (1 + (a + c)/2).
    let (_store, net) = two_expert_net(Activation::Tanh);
    let m = 1.0 + (1f64.tanh().tanh() + (-2f64).tanh().tanh()) / 2.0;
    let y = run(&net, &[1.0, 2.0]);
    assert!((y[0] - m).abs() < 1e-15 && (y[1] - 2.0 * m).abs() < 1e-15, "{y:?} vs {m}");
}

#[test]
fn single_expert_mixture_skips_the_gate() {
    let store = SeededVarMap::new(0);
    CrossNet::new(4, &CrossNetConfig::mixture(2, 2, 1), store.var_builder(DType::F32, &DEV)).unwrap();
    assert!(store.named_vars().iter().all(|(n, _)| !n.contains("gates")));
    assert_eq!(store.named_vars().len(), 2 * 4); // v, c, u, bias per layer
}

#[test]
fn shared_gates_are_one_set_for_the_stack() {
    let store = SeededVarMap::new(0);
    let layer = CrossLayerKind::Mixture { rank: 2, num_experts: 3, activation: Activation::Relu, shared_gates: true };
    CrossNet::new(4, &CrossNetConfig { num_layers: 2, layer, diag_scale: 0.0 }, store.var_builder(DType::F32, &DEV))
        .unwrap();
    let gates: Vec<String> = store.named_vars().into_iter().map(|(n, _)| n).filter(|n| n.contains("gates")).collect();
    assert_eq!(gates, vec!["gates.0.weight", "gates.1.weight", "gates.2.weight"]);
}

#[test]
fn parallel_mean_of_identical_towers_equals_one_tower_and_concat_stacks() {
    let x = Tensor::new(&[[0.3f64, -1.2, 0.7], [2.0, 0.1, -0.4]], &DEV).unwrap();
    let single_store = SeededVarMap::new(5);
    let single = CrossNet::new(3, &CrossNetConfig::full_rank(2), single_store.var_builder(DType::F64, &DEV)).unwrap();
    let want = single.forward(&x).unwrap();
    for combine in [Combine::Mean, Combine::Concat] {
        let store = SeededVarMap::new(6);
        let config = ParallelCrossNetConfig { num_towers: 3, tower: CrossNetConfig::full_rank(2), combine };
        let net = ParallelCrossNet::new(3, &config, store.var_builder(DType::F64, &DEV)).unwrap();
        for (name, var) in store.named_vars() {
            let src = name.split_once('.').unwrap().1.split_once('.').unwrap().1; // drop "towers.{p}."
            let (_, s) = single_store.named_vars().into_iter().find(|(n, _)| n == src).unwrap();
            var.set(s.as_tensor()).unwrap();
        }
        let y = net.forward(&x).unwrap();
        assert_eq!(y.dims()[1], net.output_dim());
        let expected = match combine {
            Combine::Mean => want.clone(),
            Combine::Concat => Tensor::cat(&[&want, &want, &want], 1).unwrap(),
        };
        let diff = (y - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "{combine:?}: {diff}");
    }
}

fn err_of<T: std::fmt::Debug>(r: rankstack_nn::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn invalid_configs_fail_at_construction_naming_the_field() {
    let store = SeededVarMap::new(0);
    let vb = store.var_builder(DType::F32, &DEV);
    let cases: Vec<(CrossNetConfig, &str)> = vec![
        (CrossNetConfig::full_rank(0), "`num_layers`"),
        (CrossNetConfig::low_rank(2, 0), "`layer.rank`"),
        (CrossNetConfig::mixture(2, 0, 2), "`layer.rank`"),
        (CrossNetConfig::mixture(2, 2, 0), "`layer.num_experts`"),
        (CrossNetConfig { diag_scale: f64::NAN, ..CrossNetConfig::full_rank(1) }, "`diag_scale`"),
        (CrossNetConfig { diag_scale: -1.0, ..CrossNetConfig::full_rank(1) }, "`diag_scale`"),
        (CrossNetConfig { diag_scale: f64::INFINITY, ..CrossNetConfig::full_rank(1) }, "`diag_scale`"),
    ];
    for (config, field) in cases {
        let msg = err_of(CrossNet::new(4, &config, vb.clone()));
        assert!(msg.starts_with("CrossNet: invalid config") && msg.contains(field), "{msg}");
    }
    assert!(err_of(CrossNet::new(0, &CrossNetConfig::full_rank(1), vb.clone())).contains("`input_dim`"));
    let parallel = |num_towers, tower| ParallelCrossNetConfig { num_towers, tower, combine: Combine::Concat };
    assert!(err_of(ParallelCrossNet::new(4, &parallel(0, CrossNetConfig::full_rank(1)), vb.clone()))
        .contains("`num_towers`"));
    let msg = err_of(ParallelCrossNet::new(4, &parallel(2, CrossNetConfig::low_rank(1, 0)), vb));
    assert!(msg.contains("ParallelCrossNet") && msg.contains("`tower.layer.rank`"), "{msg}");
}

#[test]
fn wrong_input_shapes_are_errors_naming_layer_and_shapes() {
    let store = SeededVarMap::new(0);
    let vb = store.var_builder(DType::F32, &DEV);
    let net = CrossNet::new(8, &CrossNetConfig::full_rank(2), vb.clone()).unwrap();
    let msg = net.forward(&Tensor::zeros((3, 5), DType::F32, &DEV).unwrap()).unwrap_err().to_string();
    assert!(msg.contains("CrossNet: expected input of shape [batch, 8], got [3, 5]"), "{msg}");
    let msg = net.forward(&Tensor::zeros((3, 2, 8), DType::F32, &DEV).unwrap()).unwrap_err().to_string();
    assert!(msg.contains("got [3, 2, 8]"), "{msg}");
    let config = ParallelCrossNetConfig { num_towers: 2, tower: CrossNetConfig::full_rank(1), combine: Combine::Mean };
    let par = ParallelCrossNet::new(8, &config, vb.pp("p")).unwrap();
    let msg = par.forward(&Tensor::zeros(8, DType::F32, &DEV).unwrap()).unwrap_err().to_string();
    assert!(msg.contains("ParallelCrossNet: expected input of shape [batch, 8], got [8]"), "{msg}");
}

fn all_variants() -> Vec<CrossNetConfig> {
    vec![
        CrossNetConfig::full_rank(3),
        CrossNetConfig { diag_scale: 0.5, ..CrossNetConfig::low_rank(3, 2) },
        CrossNetConfig::mixture(2, 3, 4),
        CrossNetConfig {
            layer: CrossLayerKind::Mixture {
                rank: 2,
                num_experts: 3,
                activation: Activation::Tanh,
                shared_gates: true,
            },
            ..CrossNetConfig::mixture(2, 2, 3)
        },
        // A ReLU expert of rank 2 can be dead at init (C maps the non-negative φ(Vx) to ≤ 0 for every
        // input, e.g. when both rows of a 2×2 C are negative): a property of the architecture, not a
        // lost gradient. Rank 4 makes that vanishingly unlikely.
        CrossNetConfig::mixture(2, 4, 1),
    ]
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let x = seeded_randn(1, &[16, 6], DType::F32);
    let r = seeded_randn(2, &[16, 6], DType::F32);
    for config in all_variants() {
        let store = SeededVarMap::new(1);
        let net = CrossNet::new(6, &config, store.var_builder(DType::F32, &DEV)).unwrap();
        let grads = (net.forward(&x).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_all_params_get_gradients(&store, &grads);
    }
    let store = SeededVarMap::new(1);
    let config =
        ParallelCrossNetConfig { num_towers: 2, tower: CrossNetConfig::low_rank(2, 3), combine: Combine::Concat };
    let net = ParallelCrossNet::new(6, &config, store.var_builder(DType::F32, &DEV)).unwrap();
    let r2 = Tensor::cat(&[&r, &r], 1).unwrap();
    let grads = (net.forward(&x).unwrap() * r2).unwrap().sum_all().unwrap().backward().unwrap();
    assert_all_params_get_gradients(&store, &grads);
}

#[test]
fn same_seed_gives_bit_identical_weights() {
    let weights = |seed| {
        let store = SeededVarMap::new(seed);
        CrossNet::new(5, &CrossNetConfig::mixture(2, 2, 3), store.var_builder(DType::F32, &DEV)).unwrap();
        parameter_bits(&store)
    };
    assert_eq!(weights(3), weights(3));
    assert_ne!(weights(3), weights(4));
}

#[test]
fn xavier_normal_kernels_and_zero_biases() {
    let store = SeededVarMap::new(2);
    CrossNet::new(256, &CrossNetConfig::full_rank(1), store.var_builder(DType::F64, &DEV)).unwrap();
    let vars = store.named_vars();
    let w: Vec<f64> = vars
        .iter()
        .find(|(n, _)| n == "layers.0.weight")
        .unwrap()
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let std = (w.iter().map(|v| v * v).sum::<f64>() / w.len() as f64).sqrt();
    // Xavier normal: std = sqrt(2 / (256 + 256)) = 0.0625; 65 536 samples estimate it within ~0.3%.
    assert!((std - 0.0625).abs() < 0.0625 * 0.01, "{std}");
    let b = vars.iter().find(|(n, _)| n == "layers.0.bias").unwrap().1.as_tensor().abs().unwrap().sum_all().unwrap();
    assert_eq!(b.to_scalar::<f64>().unwrap(), 0.0);
}

#[test]
fn config_serde_round_trip_and_unknown_keys_rejected() {
    let json = r#"{"num_layers": 4, "layer": {"type": "mixture", "rank": 64, "num_experts": 4, "activation": "tanh"}, "diag_scale": 0.1}"#;
    let config: CrossNetConfig = serde_json::from_str(json).unwrap();
    assert_eq!(
        config.layer,
        CrossLayerKind::Mixture { rank: 64, num_experts: 4, activation: Activation::Tanh, shared_gates: false }
    );
    let back: CrossNetConfig = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(back, config);
    let err =
        serde_json::from_str::<CrossNetConfig>(r#"{"num_layers": 4, "layer": {"type": "full_rank"}, "depth": 3}"#)
            .unwrap_err();
    assert!(err.to_string().contains("depth"), "{err}");
}
