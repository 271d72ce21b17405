//! A caller's attention mask (`torch.nn.TransformerEncoder`'s `src_mask`).

use candle_core::{DType, Result, Tensor};

use rankstack_nn::Error;

/// An attention mask supplied by the caller, over queries × keys, as PyTorch's `src_mask` /
/// `attn_mask`: shape `[S, S]` (shared by every sequence and head) or `[B·H, S, S]` (one per
/// sequence and head, sequence-major, as PyTorch lays it out).
///
/// - `Additive`: a float tensor added to the attention scores (`0` allows, `−∞` forbids, other
///   values bias); NaN and `+∞` are errors.
/// - `Boolean`: an integer tensor (u8, u32 or i64), non-zero = *not allowed* (PyTorch's `True`),
///   i.e. `−∞`.
///
/// It is combined with the key mask (`src_key_padding_mask`) by addition, as PyTorch does. A query
/// whose keys are all forbidden gets NaN, as in PyTorch.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Added to the scores.
    Additive(Tensor),
    /// Non-zero forbids attending.
    Boolean(Tensor),
}

impl AttentionMask {
    /// The additive bias `[B or 1, H or 1, S, S]` in `dtype` for `batch` sequences of `seq` tokens
    /// and `heads` heads, with the additive key mask `[B, S]` (if any) folded in. Errors name
    /// `layer`.
    pub(crate) fn bias(
        &self,
        layer: &str,
        batch: usize,
        seq: usize,
        heads: usize,
        key_mask: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Tensor> {
        let (mask, what) = match self {
            Self::Additive(m) => (m, "src_mask (additive)"),
            Self::Boolean(m) => (m, "src_mask (boolean)"),
        };
        let bias = match self {
            Self::Additive(m) => {
                if !m.dtype().is_float() {
                    return Err(
                        Error::input(layer, what, format!("must be a float tensor, got {:?}", m.dtype())).into()
                    );
                }
                let values = rankstack_nn::host_transfer::read_input::<f64>(&m.to_dtype(DType::F64)?, "src_mask")?;
                if let Some(v) = values.iter().find(|v| v.is_nan() || **v == f64::INFINITY) {
                    return Err(Error::input(layer, what, format!("holds {v}; use 0 to allow and −∞ to forbid")).into());
                }
                m.to_dtype(dtype)?
            }
            Self::Boolean(m) => {
                if m.dtype().is_float() {
                    return Err(Error::input(
                        layer,
                        what,
                        format!("must be an integer tensor (non-zero = not allowed), got {:?}", m.dtype()),
                    )
                    .into());
                }
                let forbidden = m.to_dtype(DType::I64)?.ne(0i64)?;
                let zeros = Tensor::zeros(m.shape(), dtype, m.device())?;
                let neg_inf = Tensor::full(f64::NEG_INFINITY, m.shape(), m.device())?.to_dtype(dtype)?;
                forbidden.where_cond(&neg_inf, &zeros)?
            }
        };
        let bias = match *mask.dims() {
            [q, k] if q == seq && k == seq => bias.reshape((1, 1, seq, seq))?,
            [n, q, k] if n == batch * heads && q == seq && k == seq => bias.reshape((batch, heads, seq, seq))?,
            _ => {
                return Err(Error::input(
                    layer,
                    what,
                    format!(
                        "expected shape [{seq}, {seq}] or [{}, {seq}, {seq}] (batch {batch} × {heads} heads), got {:?}",
                        batch * heads,
                        mask.dims()
                    ),
                )
                .into())
            }
        };
        match key_mask {
            None => Ok(bias),
            Some(k) => {
                rankstack_nn::shape::expect_dims(layer, "key_mask", k, &[Some(batch), Some(seq)])?;
                bias.broadcast_add(&k.to_dtype(dtype)?.reshape((batch, 1, 1, seq))?)
            }
        }
    }
}

/// `rows(x_rows, B, S, bias)` applied to a dense batch `x` `[B, S, d]`: its rows `[B·S, d]` with
/// the attention bias of `src_mask` and `key_mask` ([`AttentionMask`]), the result returned as
/// `[B, S, d]`. The `forward_with_src_mask` of the encoder and its layers; errors name `layer`,
/// which works on width `d` with `heads` heads.
pub(crate) fn forward_dense_with_src_mask(
    layer: &str,
    x: &Tensor,
    (width, heads): (usize, usize),
    src_mask: &AttentionMask,
    key_mask: Option<&Tensor>,
    rows: impl FnOnce(&Tensor, usize, usize, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    rankstack_nn::shape::expect_dims(layer, "input", x, &[None, None, Some(width)])?;
    let (b, s, d) = x.dims3()?;
    let bias = src_mask.bias(layer, b, s, heads, key_mask, x.dtype())?;
    rows(&x.reshape((b * s, d))?, b, s, &bias)?.reshape((b, s, d))
}
