//! Differentiable replacements for candle-nn's no-backward fast paths, so
//! gradients flow on CPU and CUDA. Softmax and the RMS normalization run as
//! fused custom ops on f32 CPU tensors (one pass per row forward and
//! backward, instead of a chain of broadcast ops and their backwards);
//! elsewhere they are composed of candle tensor ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{host_slice, with_cpu};

/// Elements per parallel task of the fused row ops.
const MIN_TASK: usize = 1 << 14;

/// Whether `x` takes the fused CPU path.
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A row-wise op on the CPU: `f(x_row, g_row, out_row)` over the rows of
/// the contiguous f32 `x` (and of `grad` in the backward), in parallel for
/// large inputs.
fn map_rows(
    x: (&CpuStorage, &Layout),
    grad: Option<&Tensor>,
    f: impl Fn(&[f32], Option<&[f32]>, &mut [f32]) + Sync,
) -> Result<(CpuStorage, Shape)> {
    let xs: &[f32] = host_slice(x.0, x.1, "x")?;
    let d = x.1.dims().last().copied().unwrap_or(1).max(1);
    let mut out = vec![0f32; xs.len()];
    let mut run = |gs: Option<&[f32]>| {
        let row =
            |(i, o): (usize, &mut [f32])| f(&xs[i * d..(i + 1) * d], gs.map(|g| &g[i * d..(i + 1) * d]), o);
        if xs.len() > MIN_TASK {
            out.par_chunks_mut(d)
                .enumerate()
                .with_min_len((MIN_TASK / d).max(1))
                .for_each(row);
        } else {
            out.chunks_mut(d).enumerate().for_each(row);
        }
    };
    match grad {
        None => run(None),
        Some(g) => with_cpu(g, "grad", |s, l| {
            let gs: &[f32] = host_slice(s, l, "grad")?;
            if gs.len() != xs.len() {
                candle_core::bail!("grad has {} elements, expected {}", gs.len(), xs.len());
            }
            run(Some(gs));
            Ok(())
        })?,
    }
    Ok((CpuStorage::F32(out), x.1.shape().clone()))
}

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
        rms_normalize(x, self.eps)?.broadcast_mul(&self.weight)
    }
}

/// `x / sqrt(mean(x^2) + eps)` over the last dimension, computed in f32.
/// Backward: with `xhat` the output and `r = 1 / sqrt(mean(x^2) + eps)`,
/// `dx = r (g - xhat mean(g xhat))`.
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        return x.contiguous()?.apply_op1(RmsNormalize { eps, grad: None });
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.to_dtype(dtype)
}

/// The fused RMS normalization of f32 CPU rows: the forward, or with
/// `grad` its backward at `x`.
struct RmsNormalize {
    eps: f64,
    grad: Option<Tensor>,
}

impl CustomOp1 for RmsNormalize {
    fn name(&self) -> &'static str {
        "rms_normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let eps = self.eps;
        // Sums in f64: a row of 1e4-scale activations squared loses bits in f32.
        let inv_rms = |x: &[f32]| {
            let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
            1.0 / (ms + eps).sqrt()
        };
        map_rows((s, l), self.grad.as_ref(), |x, g, out| {
            let r = inv_rms(x);
            match g {
                None => out
                    .iter_mut()
                    .zip(x)
                    .for_each(|(o, &v)| *o = (v as f64 * r) as f32),
                Some(g) => {
                    let dot = x
                        .iter()
                        .zip(g)
                        .map(|(&v, &gv)| v as f64 * r * gv as f64)
                        .sum::<f64>();
                    let mean = dot / x.len() as f64;
                    for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
                        *o = (r * (gv as f64 - v as f64 * r * mean)) as f32;
                    }
                }
            }
        })
    }

    fn bwd(&self, x: &Tensor, _xhat: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormalize {
            eps: self.eps,
            grad: Some(grad.contiguous()?),
        };
        Ok(Some(x.apply_op1(op)?))
    }
}

/// Softmax over the last dimension, with a backward (unlike
/// `candle_nn::ops::softmax_last_dim`): `y = exp(x - max) / sum`, and
/// `dx = y (g - sum(g y))`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        return x.contiguous()?.apply_op1(Softmax { grad: None });
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The fused softmax of f32 CPU rows: the forward of `x`, or with `grad`
/// the backward given the forward's output `y` as the argument.
struct Softmax {
    grad: Option<Tensor>,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax_last_dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_rows((s, l), self.grad.as_ref(), |x, g, out| match g {
            None => {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                out.iter_mut().for_each(|o| *o *= inv);
            }
            // Here `x` holds the forward's output y.
            Some(g) => {
                let dot: f32 = x.iter().zip(g).map(|(&y, &gv)| y * gv).sum();
                for ((o, &y), &gv) in out.iter_mut().zip(x).zip(g) {
                    *o = y * (gv - dot);
                }
            }
        })
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Softmax {
            grad: Some(grad.contiguous()?),
        };
        Ok(Some(y.apply_op1(op)?))
    }
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
