//! Differentiable replacements for candle-nn's no-backward fast paths,
//! composed of candle tensor ops, so gradients flow on CPU and CUDA.

use candle_core::{DType, Result, Tensor, D};

/// RMSNorm (Zhang & Sennrich, 2019): `x / sqrt(mean(x^2) + eps) * weight`
/// over the last dimension, computed in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Scale, `[hidden]`.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// A norm with the given scale.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }
}

impl candle_core::Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv_rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)
    }
}

/// Softmax over the last dimension, with a backward (unlike
/// `candle_nn::ops::softmax_last_dim`).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotary position embedding (Su et al., "RoFormer", 2021) in the
/// half-split layout Qwen and Llama use: `x` is `[batch, heads, seq, dim]`,
/// `cos` and `sin` are `[seq, dim / 2]`. Built from narrow/mul/cat, so it
/// has a backward (unlike `candle_nn::rotary_emb::rope`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// `cos` and `sin` tables for [`rope`]: position `p`, frequency
/// `theta^(-2i / dim)`, as `[seq, dim / 2]` F32 tensors.
pub fn rope_tables(
    seq: usize,
    dim: usize,
    theta: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / dim as f64) as f32)
        .collect();
    let inv = Tensor::new(inv.as_slice(), device)?.unsqueeze(0)?;
    let pos = Tensor::arange(0u32, seq as u32, device)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?;
    let angles = pos.broadcast_mul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}
