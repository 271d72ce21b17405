//! Input-shape checks. Every public `forward` validates its inputs with these so that a wrong
//! shape is reported with the layer's name and the expected and actual shapes, instead of a
//! broadcasting error deep inside candle (or, worse, a silently broadcast result).

use candle_core::Tensor;

use crate::Error;

/// One expected dimension: a fixed size, or any size (`None`, e.g. the batch).
pub type Dim = Option<usize>;

fn render(expected: &[Dim]) -> String {
    let parts: Vec<String> = expected
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Some(n) => n.to_string(),
            None if i == 0 => "batch".to_string(),
            None => "_".to_string(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Checks that `x` has exactly the dimensions in `expected` (`None` matches any size).
pub fn expect_dims(layer: &str, what: &str, x: &Tensor, expected: &[Dim]) -> Result<(), Error> {
    let dims = x.dims();
    let ok = dims.len() == expected.len() && dims.iter().zip(expected).all(|(&d, e)| e.is_none_or(|e| e == d));
    if ok {
        Ok(())
    } else {
        Err(Error::Shape {
            layer: layer.to_string(),
            what: what.to_string(),
            expected: render(expected),
            actual: dims.to_vec(),
        })
    }
}

/// Checks that `x` is a `[batch, width]` matrix and returns the batch size.
pub fn expect_matrix(layer: &str, what: &str, x: &Tensor, width: usize) -> Result<usize, Error> {
    expect_dims(layer, what, x, &[None, Some(width)])?;
    Ok(x.dim(0)?)
}

/// Checks that two inputs have the same batch size.
pub fn expect_same_batch(layer: &str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<(), Error> {
    let (na, ta) = a;
    let (nb, tb) = b;
    let (ba, bb) = (ta.dim(0)?, tb.dim(0)?);
    if ba == bb {
        Ok(())
    } else {
        Err(Error::input(layer, nb, format!("batch size {bb} differs from `{na}`'s batch size {ba}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn shape_errors_name_layer_expected_and_actual() {
        let x = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(expect_matrix("L", "input", &x, 8).unwrap(), 4);
        let msg = expect_matrix("CrossNet", "input", &x, 16).unwrap_err().to_string();
        assert_eq!(msg, "CrossNet: expected input of shape [batch, 16], got [4, 8]");
        let msg = expect_dims("L", "seq", &x, &[None, Some(8), Some(2)]).unwrap_err().to_string();
        assert_eq!(msg, "L: expected seq of shape [batch, 8, 2], got [4, 8]");
    }

    #[test]
    fn batch_mismatch_is_reported() {
        let a = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 8), DType::F32, &Device::Cpu).unwrap();
        let msg = expect_same_batch("MaskBlock", ("mask_input", &a), ("hidden_input", &b)).unwrap_err().to_string();
        assert!(msg.contains("MaskBlock") && msg.contains("hidden_input") && msg.contains('3'));
    }
}
