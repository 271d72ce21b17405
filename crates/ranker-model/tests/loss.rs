//! The multi-task loss and the down-sampling calibration, by hand.

use candle_core::{Device, Tensor, Var};
use ranker_model::{calibrated_probability, multitask_loss};

const LN2: f64 = std::f64::consts::LN_2;
const NAN: f64 = f64::NAN;

fn t(rows: &[&[f64]]) -> Tensor {
    Tensor::new(rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(), &Device::Cpu).unwrap()
}

fn scalar(x: Tensor) -> f64 {
    x.to_scalar::<f64>().unwrap()
}

#[test]
fn zero_logits_cost_ln2_per_labelled_example_whatever_the_label() {
    // Two tasks with weights 1 and 0.5: each task's mean is ln 2, so L = 1.5 ln 2.
    let logits = t(&[&[0.0, 0.0], &[0.0, 0.0]]);
    let labels = t(&[&[1.0, 0.0], &[0.3, 1.0]]);
    let l = scalar(multitask_loss(&logits, &labels, &[1.0, 0.5], None).unwrap());
    assert!((l - 1.5 * LN2).abs() < 1e-15, "{l}");
}

#[test]
fn missing_labels_contribute_nothing_not_even_nan_gradients() {
    // Task 0: only row 0 labelled (y = 1, x = 2): ℓ = ln(1 + e^−2). Task 1: no labels at all → 0.
    let logits = Var::new(&[[2.0f64, 5.0], [-1.0, 3.0]], &Device::Cpu).unwrap();
    let labels = t(&[&[1.0, NAN], &[NAN, NAN]]);
    let l = multitask_loss(logits.as_tensor(), &labels, &[1.0, 1.0], None).unwrap();
    assert!((scalar(l.clone()) - (-2f64).exp().ln_1p()).abs() < 1e-15);
    let g: Vec<Vec<f64>> = l.backward().unwrap().get(logits.as_tensor()).unwrap().to_vec2().unwrap();
    // dℓ/dx = σ(2) − 1 for the one labelled entry, exactly 0 elsewhere.
    let s = 1.0 / (1.0 + (-2f64).exp());
    assert!((g[0][0] - (s - 1.0)).abs() < 1e-15);
    assert_eq!((g[0][1], g[1][0], g[1][1]), (0.0, 0.0, 0.0));
}

#[test]
fn example_weights_make_a_weighted_mean_per_task() {
    // One task, x = [0, 0], y = [1, 0], e = [3, 1]: (3 ln2 + 1 ln2) / 4 = ln 2. With x = [10, 0]:
    // (3·ln(1 + e^−10) + ln 2) / 4.
    let labels = t(&[&[1.0], &[0.0]]);
    let w = Tensor::new(&[3.0f64, 1.0], &Device::Cpu).unwrap();
    let l = scalar(multitask_loss(&t(&[&[0.0], &[0.0]]), &labels, &[1.0], Some(&w)).unwrap());
    assert!((l - LN2).abs() < 1e-15);
    let l = scalar(multitask_loss(&t(&[&[10.0], &[0.0]]), &labels, &[1.0], Some(&w)).unwrap());
    assert!((l - (3.0 * (-10f64).exp().ln_1p() + LN2) / 4.0).abs() < 1e-15, "{l}");
}

#[test]
fn huge_logits_stay_finite() {
    let l = scalar(multitask_loss(&t(&[&[1e4, -1e4]]), &t(&[&[0.0, 1.0]]), &[1.0, 1.0], None).unwrap());
    assert!((l - 2e4).abs() < 1e-9, "{l}");
}

#[test]
fn bad_inputs_are_errors() {
    let logits = t(&[&[0.0, 0.0]]);
    let e = multitask_loss(&logits, &t(&[&[0.0, 1.5]]), &[1.0, 1.0], None).unwrap_err().to_string();
    assert!(e.contains("labels") && e.contains("1.5"), "{e}");
    let e = multitask_loss(&logits, &t(&[&[0.0]]), &[1.0, 1.0], None).unwrap_err().to_string();
    assert!(e.contains("labels") && e.contains("[1, 1]"), "{e}");
    assert!(multitask_loss(&logits, &t(&[&[0.0, 1.0]]), &[1.0], None).is_err());
    let w = Tensor::new(&[-1.0f64], &Device::Cpu).unwrap();
    assert!(multitask_loss(&logits, &t(&[&[0.0, 1.0]]), &[1.0, 1.0], Some(&w))
        .unwrap_err()
        .to_string()
        .contains("example_weights"));
}

#[test]
fn calibration_undoes_negative_downsampling() {
    // p = 0.5 trained with negatives kept at r = 0.1: p' = 0.05 / (0.5 + 0.05) = 1/11.
    let p = calibrated_probability(&Tensor::new(&[0.0f64], &Device::Cpu).unwrap(), 0.1).unwrap();
    assert!((p.to_vec1::<f64>().unwrap()[0] - 1.0 / 11.0).abs() < 1e-15);
    // r = 1 is the identity: σ(x).
    let p = calibrated_probability(&Tensor::new(&[2.0f64], &Device::Cpu).unwrap(), 1.0).unwrap();
    assert!((p.to_vec1::<f64>().unwrap()[0] - 1.0 / (1.0 + (-2f64).exp())).abs() < 1e-15);
}
