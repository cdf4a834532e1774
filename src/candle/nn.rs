//! Differentiable replacements for candle-nn's no-backward fast paths, and
//! the other layers a Qwen2-VL port trains through, so gradients flow on CPU
//! and CUDA:
//!
//! | here | replaces (no backward) or adds |
//! |---|---|
//! | [`RmsNorm`], [`rms_normalize`] | candle-nn's `RmsNorm::forward`, `ops::rms_norm` |
//! | [`LayerNorm`], [`layer_normalize`] | candle-nn's `LayerNorm::forward` (with a bias), `ops::layer_norm` |
//! | [`softmax_last_dim`] | `ops::softmax_last_dim` |
//! | [`rope`], [`rope_tables`] | `rotary_emb::rope` |
//! | [`quick_gelu`] | transformers' `quick_gelu` (Qwen2-VL's vision MLP); candle has none |
//!
//! The exact-erf GELU (Qwen2-VL's patch merger) is candle's own
//! `Tensor::gelu_erf`, which has a backward.
//!
//! The norms and the softmax run as fused custom ops on f32 CPU tensors: one
//! task per row, forward and backward, instead of a chain of broadcast ops
//! and their backwards. Elsewhere (CUDA, BF16, F16, F64) they are composed
//! of candle tensor ops. Bad parameters and shapes are typed
//! [`crate::Error`]s (wrapped in `candle_core::Error`), never a panic or a
//! silently wrong result.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{host_slice, with_cpu, wrap};
use crate::error::{check, Error};
use crate::ops::math::{self, multiversion};

/// Elements per parallel task of the fused row ops.
const MIN_TASK: usize = 1 << 14;

/// Whether `x` takes the fused CPU path.
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A row-wise op (`op`, in errors) on the CPU: `f(x_row, g_row, out_row)` over the rows of
/// `row` elements of the contiguous f32 `x` (and of `grad` in the
/// backward; the last row may be shorter), in parallel for large inputs.
fn map_rows(
    op: &'static str,
    x: (&CpuStorage, &Layout),
    row: usize,
    grad: Option<&Tensor>,
    f: impl Fn(&[f32], Option<&[f32]>, &mut [f32]) + Sync,
) -> Result<(CpuStorage, Shape)> {
    let xs: &[f32] = host_slice(x.0, x.1, "x")?;
    let row = row.max(1);
    let mut out = vec![0f32; xs.len()];
    let mut run = |gs: Option<&[f32]>| {
        let apply = |(i, o): (usize, &mut [f32])| {
            let span = i * row..i * row + o.len();
            f(&xs[span.clone()], gs.map(|g| &g[span]), o)
        };
        if xs.len() > MIN_TASK {
            out.par_chunks_mut(row)
                .enumerate()
                .with_min_len((MIN_TASK / row).max(1))
                .for_each(apply);
        } else {
            out.chunks_mut(row).enumerate().for_each(apply);
        }
    };
    match grad {
        None => run(None),
        Some(g) => with_cpu(g, "grad", |s, l| {
            let gs: &[f32] = host_slice(s, l, "grad")?;
            if gs.len() != xs.len() {
                return Err(wrap(crate::Error::ShapeMismatch {
                    op,
                    what: "grad",
                    expected: xs.len(),
                    got: gs.len(),
                }));
            }
            run(Some(gs));
            Ok(())
        })?,
    }
    Ok((CpuStorage::F32(out), x.1.shape().clone()))
}

/// The last dimension of a layout: the row length of the fused row ops.
fn row_len(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

/// RMSNorm (Zhang & Sennrich, 2019): `x / sqrt(mean(x^2) + eps) * weight`
/// over the last dimension, as [`rms_normalize`] then the scale.
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
    /// Errors as [`rms_normalize`], or a `ShapeMismatch` if `weight` does
    /// not hold one value per element of `x`'s last dimension.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        affine("rms_norm", &rms_normalize(x, self.eps)?, &self.weight, None)
    }
}

/// LayerNorm (Ba, Kiros & Hinton, 2016) as torch's `nn.LayerNorm(hidden,
/// eps)` with its elementwise affine: `layer_normalize(x, eps) * weight +
/// bias` over the last dimension (the Qwen2-VL vision tower's `norm1`,
/// `norm2` and the merger's `ln_q`, eps 1e-6).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale, `[hidden]`.
    pub weight: Tensor,
    /// Shift, `[hidden]`; `None` for torch's `bias=False`.
    pub bias: Option<Tensor>,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// A norm with the given scale and shift.
    pub fn new(weight: Tensor, bias: Option<Tensor>, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl candle_core::Module for LayerNorm {
    /// Errors as [`layer_normalize`], or a `ShapeMismatch` if `weight` or
    /// `bias` does not hold one value per element of `x`'s last dimension.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        affine(
            "layer_norm",
            &layer_normalize(x, self.eps)?,
            &self.weight,
            self.bias.as_ref(),
        )
    }
}

/// `y * weight (+ bias)`, both of `y`'s last dimension's size, broadcast
/// over the rows (never over anything else, as a `[1]` or `[hidden, 1]`
/// tensor would be).
fn affine(op: &'static str, y: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let d = y.dim(D::Minus1)?;
    let vector = |what, t: &Tensor| {
        check::len(op, what, d, t.elem_count()).map_err(wrap)?;
        t.reshape(d)
    };
    let y = y.broadcast_mul(&vector("weight", weight)?)?;
    match bias {
        Some(b) => y.broadcast_add(&vector("bias", b)?),
        None => Ok(y),
    }
}

/// `x / sqrt(mean(x^2) + eps)` over the last dimension (RMSNorm's
/// normalization, without the scale). Computed in f32 (BF16 and F16 input
/// converted, the result converted back; F64 stays F64).
/// Backward: with `xhat` the output and `r = 1 / sqrt(mean(x^2) + eps)`,
/// `dx = r (g - xhat mean(g xhat))`.
///
/// Errors (typed [`crate::Error`]): `InvalidParameter` for an `eps` that is
/// negative, NaN or infinite; `Unsupported` for a non-float `x`.
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    normalize(x, eps, Norm::Rms)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension, with the biased
/// variance `var = mean((x - mean)^2)`, as torch's `layer_norm` (LayerNorm's
/// normalization, without the affine). Computed in f32 (BF16 and F16 input
/// converted, the result converted back; F64 stays F64), the variance about
/// the mean (never as `E[x^2] - E[x]^2`, which cancels for rows far from 0).
/// A row of one element normalizes to 0.
/// Backward: with `xhat` the output and `r = 1 / sqrt(var + eps)`,
/// `dx = r (g - mean(g) - xhat mean(g xhat))`.
///
/// Errors (typed [`crate::Error`]): `InvalidParameter` for an `eps` that is
/// negative, NaN or infinite; `Unsupported` for a non-float `x`.
pub fn layer_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    normalize(x, eps, Norm::Layer)
}

/// Which row normalization: RMSNorm's, about 0, or LayerNorm's, about the
/// row's mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Norm {
    Rms,
    Layer,
}

impl Norm {
    fn op(self) -> &'static str {
        match self {
            Norm::Rms => "rms_normalize",
            Norm::Layer => "layer_normalize",
        }
    }
}

fn normalize(x: &Tensor, eps: f64, norm: Norm) -> Result<Tensor> {
    let op = norm.op();
    check::param(op, "eps", eps, eps >= 0.0, "finite and >= 0").map_err(wrap)?;
    let dtype = x.dtype();
    let wide = match dtype {
        DType::F32 | DType::BF16 | DType::F16 => DType::F32,
        DType::F64 => DType::F64,
        d => {
            return Err(wrap(Error::Unsupported {
                op,
                reason: format!("`x` must be F32, F64, BF16 or F16, got {d:?}"),
            }))
        }
    };
    x.dim(D::Minus1)?; // a scalar has no rows: candle's error
    if fused(x) {
        return x.contiguous()?.apply_op1(Normalize {
            norm,
            eps,
            grad: None,
        });
    }
    let x = x.to_dtype(wide)?;
    let x = match norm {
        Norm::Rms => x,
        // Centered twice (the corrected two-pass algorithm): the second
        // mean is the first one's rounding error, which for rows far from 0
        // (1e4 + noise) would otherwise shift every output.
        Norm::Layer => {
            let once = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            once.broadcast_sub(&once.mean_keepdim(D::Minus1)?)?
        }
    };
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.to_dtype(dtype)
}

/// The fused row normalization of f32 CPU rows: the forward, or with
/// `grad` its backward at `x`.
struct Normalize {
    norm: Norm,
    eps: f64,
    grad: Option<Tensor>,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        self.norm.op()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (centered, eps) = (self.norm == Norm::Layer, self.eps);
        map_rows(
            self.name(),
            (s, l),
            row_len(l),
            self.grad.as_ref(),
            |x, g, out| {
                // In f64, the mean first and then the squares about it: 1e4-scale
                // activations squared lose bits in f32, and E[x^2] - E[x]^2
                // cancels.
                let n = x.len() as f64;
                let mean = if centered {
                    x.iter().map(|&v| v as f64).sum::<f64>() / n
                } else {
                    0.0
                };
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let r = 1.0 / (var + eps).sqrt();
                let xhat = |v: f32| (v as f64 - mean) * r;
                match g {
                    None => out.iter_mut().zip(x).for_each(|(o, &v)| *o = xhat(v) as f32),
                    Some(g) => {
                        let (sum_g, dot) = x.iter().zip(g).fold((0.0, 0.0), |(s, d), (&v, &gv)| {
                            (s + gv as f64, d + gv as f64 * xhat(v))
                        });
                        // mean(g) is the mean's share of the gradient: none for RMS.
                        let mean_g = if centered { sum_g / n } else { 0.0 };
                        let mean_dot = dot / n;
                        for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
                            *o = (r * (gv as f64 - mean_g - xhat(v) * mean_dot)) as f32;
                        }
                    }
                }
            },
        )
    }

    fn bwd(&self, x: &Tensor, _xhat: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Normalize {
            norm: self.norm,
            eps: self.eps,
            grad: Some(grad.contiguous()?),
        };
        Ok(Some(x.apply_op1_no_bwd(&op)?))
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
        map_rows(
            self.name(),
            (s, l),
            row_len(l),
            self.grad.as_ref(),
            |x, g, out| match g {
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
            },
        )
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Softmax {
            grad: Some(grad.contiguous()?),
        };
        Ok(Some(y.apply_op1_no_bwd(&op)?))
    }
}

/// The slope of [`quick_gelu`]'s sigmoid.
const QUICK_GELU_SLOPE: f64 = 1.702;

/// GELU's sigmoid approximation `x sigmoid(1.702 x)` (Hendrycks & Gimpel,
/// 2016, §2; transformers' `quick_gelu`, the activation of Qwen2-VL's
/// vision MLP). Backward: with `s = sigmoid(1.702 x)`,
/// `dx = g s (1 + 1.702 x (1 - s))`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        return x.contiguous()?.apply_op1(QuickGelu { grad: None });
    }
    x * candle_nn::ops::sigmoid(&(x * QUICK_GELU_SLOPE)?)?
}

/// The fused [`quick_gelu`] of f32 CPU tensors: the forward, or with `grad`
/// its backward at `x`.
struct QuickGelu {
    grad: Option<Tensor>,
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick_gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_rows(
            self.name(),
            (s, l),
            MIN_TASK,
            self.grad.as_ref(),
            quick_gelu_chunk,
        )
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = QuickGelu {
            grad: Some(grad.contiguous()?),
        };
        Ok(Some(x.apply_op1_no_bwd(&op)?))
    }
}

multiversion! {
    /// [`quick_gelu`] of `x` into `out`, or with `g` its backward, with the
    /// crate's vectorizable `exp` (candle's CPU sigmoid calls libm's per
    /// element).
    fn quick_gelu_chunk(x: &[f32], g: Option<&[f32]>, out: &mut [f32]) {
        const K: f32 = QUICK_GELU_SLOPE as f32;
        let sigmoid = |v: f32| 1.0 / (1.0 + math::exp::<Mad>(-K * v));
        match g {
            None => out.iter_mut().zip(x).for_each(|(o, &v)| *o = v * sigmoid(v)),
            Some(g) => {
                for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
                    let s = sigmoid(v);
                    *o = gv * s * (1.0 + K * v * (1.0 - s));
                }
            }
        }
    }
}

/// Rotary position embedding (Su et al., "RoFormer", 2021) in the
/// half-split layout Qwen and Llama use (transformers' `rotate_half`): `x`
/// is `[batch, heads, seq, dim]`, `cos` and `sin` are `[seq, dim / 2]` (or
/// anything that broadcasts to `[.., seq, dim / 2]`), and
/// `[x1, x2] -> [x1 cos - x2 sin, x1 sin + x2 cos]`. Built from
/// narrow/mul/cat, so it has a backward (unlike
/// `candle_nn::rotary_emb::rope`).
///
/// Errors (typed [`crate::Error`]): `InvalidParameter` (`dim`) for an odd
/// last dimension of `x`; `ShapeMismatch` if the last dimension of `cos`
/// or `sin` is not half of `x`'s.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "rope";
    let dim = x.dim(D::Minus1)?;
    check::param(OP, "dim", dim as f64, dim % 2 == 0, "even (x's last dimension)").map_err(wrap)?;
    let half = dim / 2;
    check::len(OP, "cos's last dimension", half, cos.dim(D::Minus1)?).map_err(wrap)?;
    check::len(OP, "sin's last dimension", half, sin.dim(D::Minus1)?).map_err(wrap)?;
    let (x1, x2) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// `cos` and `sin` tables for [`rope`]: position `p` in `0..seq`, frequency
/// `theta^(-2i / dim)` for `i` in `0..dim / 2`, as `[seq, dim / 2]` F32
/// tensors of the angles `p theta^(-2i / dim)`, each the f32 product of an
/// f32 position and frequency, as in transformers (so positions above 2^24
/// are rounded).
///
/// Errors (typed [`crate::Error`], all `InvalidParameter`): `theta` not
/// finite and > 0, an odd `dim`, a `seq` above `u32::MAX`.
pub fn rope_tables(
    seq: usize,
    dim: usize,
    theta: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rope_tables";
    check::param(OP, "theta", theta, theta > 0.0, "finite and > 0").map_err(wrap)?;
    check::param(OP, "dim", dim as f64, dim.is_multiple_of(2), "even").map_err(wrap)?;
    let end = u32::try_from(seq).map_err(|_| {
        wrap(Error::InvalidParameter {
            op: OP,
            name: "seq",
            value: seq as f64,
            expected: "at most u32::MAX",
        })
    })?;
    let inv: Vec<f32> = (0..dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / dim as f64) as f32)
        .collect();
    let inv = Tensor::new(inv.as_slice(), device)?.unsqueeze(0)?;
    let pos = Tensor::arange(0u32, end, device)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?;
    let angles = pos.broadcast_mul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}
