//! Moving *distinct* rows of a matrix: a gather whose backward pass is a gather too.
//!
//! `index_select` along dim 0 is differentiable in candle, but its backward pass is `index_add`,
//! and so is the usual way of putting rows back (`zeros.index_add(rows, src)`). candle 0.11's CUDA
//! `index_add` (and `scatter`) kernel runs one thread per column and loops over the rows serially:
//! for TransAct's packed rows (1.6 million rows of width 96 at batch 32 768) that is 96 threads
//! doing all the work, and it made GPU scoring 30 times slower than PyTorch. When the rows are
//! distinct, scattering them is a gather with the inverse map, so both directions here are
//! gathers (`index_select`, parallel over every element on every device):
//!
//! ```text
//! gather_rows(x, r)        y[i] = x[r[i]]                      (r distinct)
//! scatter_rows(s, r, n)    y[r[i]] = s[i], y[j] = 0 elsewhere   (r distinct, r[i] < n)
//! ```
//!
//! Values are exact copies, so results equal `index_select` / `zeros.index_add` (up to the sign
//! of zeros) on every device.

use candle_core::{Result, Tensor};

use crate::row_gather_op::RowGatherOp;

/// `x[rows]` for a 2-D `x` `[n, d]` and distinct `rows` (each `< n`): `[rows.len(), d]`.
pub fn gather_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let back = inverse(rows, n, "gather_rows")?;
    apply(&x.contiguous()?, rows, &back)
}

/// `[n, d]` zeros with row `rows[i]` set to `src[i]`, for a 2-D `src` `[rows.len(), d]` and
/// distinct `rows` (each `< n`).
pub fn scatter_rows(src: &Tensor, rows: &[u32], n: usize) -> Result<Tensor> {
    let (m, d) = src.dims2()?;
    if rows.len() != m {
        candle_core::bail!("scatter_rows: {} rows for a source of {m}", rows.len());
    }
    // Output row j reads source row inverse[j]; rows not written read an appended zero row (m).
    let forward = inverse(rows, n, "scatter_rows")?;
    let extended = Tensor::cat(&[&src.contiguous()?, &Tensor::zeros((1, d), src.dtype(), src.device())?], 0)?;
    // The zero row's gradient is discarded: it reads the sentinel row n of the extended gradient.
    let back: Vec<u32> = rows.iter().copied().chain([n as u32]).collect();
    apply(&extended, &forward, &back)?.narrow(0, 0, n)
}

/// For `rows` distinct and `< n`: `inv[rows[i]] = i`, and `rows.len()` (a sentinel) elsewhere.
fn inverse(rows: &[u32], n: usize, op: &str) -> Result<Vec<u32>> {
    let sentinel = rows.len() as u32;
    let mut inv = vec![sentinel; n];
    for (i, &r) in rows.iter().enumerate() {
        match inv.get_mut(r as usize) {
            Some(slot) if *slot == sentinel => *slot = i as u32,
            Some(_) => candle_core::bail!("{op}: row {r} appears twice"),
            None => candle_core::bail!("{op}: row {r} is out of range for {n} rows"),
        }
    }
    Ok(inv)
}

/// `y = x[forward]` with `∂x = [∂y ; 0][back]`: exact when every row of `x` that `forward`
/// reads more than once is constant (the zero row of `scatter_rows`).
fn apply(x: &Tensor, forward: &[u32], back: &[u32]) -> Result<Tensor> {
    let device = x.device();
    // `[in_rows]` u32: the output row each input row's gradient comes from (`out_rows`: none).
    let back = Tensor::from_slice(back, back.len(), device)?;
    let op = RowGatherOp {
        name: "distinct-rows-gather",
        index: Tensor::from_slice(forward, forward.len(), device)?,
        backward: Box::new(move |grad: &Tensor| {
            let (_, d) = grad.dims2()?;
            let zero = Tensor::zeros((1, d), grad.dtype(), grad.device())?;
            Tensor::cat(&[grad, &zero], 0)?.index_select(&back, 0)
        }),
    };
    x.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    fn grid(rows: usize, cols: usize) -> Var {
        let values: Vec<f64> = (0..rows * cols).map(|i| i as f64 + 1.0).collect();
        Var::from_tensor(&Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn gathers_and_scatters_like_index_select_and_index_add_in_value_and_gradient() {
        let x = grid(5, 3);
        let rows = [4u32, 0, 2];
        let weights =
            Tensor::from_vec((0..9).map(|i| i as f64 - 3.5).collect::<Vec<_>>(), (3, 3), &Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&rows, 3, &Device::Cpu).unwrap();

        let y = gather_rows(x.as_tensor(), &rows).unwrap();
        let want = x.as_tensor().index_select(&ids, 0).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
        let g = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g_want = (&want * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap(),
            g_want.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap()
        );

        let s = grid(3, 3);
        let y = scatter_rows(s.as_tensor(), &rows, 6).unwrap();
        let want = Tensor::zeros((6, 3), DType::F64, &Device::Cpu).unwrap().index_add(&ids, s.as_tensor(), 0).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
        let w6 = Tensor::from_vec((0..18).map(|i| (i as f64).sin()).collect::<Vec<_>>(), (6, 3), &Device::Cpu).unwrap();
        let g = (&y * &w6).unwrap().sum_all().unwrap().backward().unwrap();
        let g_want = (&want * &w6).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(s.as_tensor()).unwrap().to_vec2::<f64>().unwrap(),
            g_want.get(s.as_tensor()).unwrap().to_vec2::<f64>().unwrap()
        );
    }

    #[test]
    fn repeated_or_out_of_range_rows_are_errors() {
        let x = grid(4, 2);
        assert!(gather_rows(x.as_tensor(), &[1, 1]).unwrap_err().to_string().contains("appears twice"));
        assert!(gather_rows(x.as_tensor(), &[4]).unwrap_err().to_string().contains("out of range"));
        assert!(scatter_rows(x.as_tensor(), &[0, 1], 5).unwrap_err().to_string().contains("2 rows for a source of 4"));
        assert_eq!(gather_rows(x.as_tensor(), &[]).unwrap().dims(), &[0, 2]);
    }
}
