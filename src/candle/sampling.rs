//! [`sample`] on candle tensors: one token per row of `[B, V]` logits and
//! its log-prob, by the rule of [`crate::ops::sampling`] (not differentiable:
//! sampling has no gradient; the trainer recomputes log-probs).

use candle_core::{Result, Storage, Tensor};

use super::{with_float_slice, wrap};
use crate::ops::sampling::{self as op, SampleInputs, SamplingConfig, OP};

/// Draws one token per row of `logits` (`[B, V]`, F32/BF16/F16): returns
/// `(tokens U32 [B], logp F32 [B])` on the logits' device, `logp` being
/// `log softmax(z / T)` at the token before filtering. Reproducible from
/// `(cfg.seed, cfg.step)`; see [`crate::sample`].
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use grpo_kernels::{candle::sample, SamplingConfig};
/// let logits = Tensor::randn(0f32, 3., (4, 50), &Device::Cpu)?;
/// let cfg = SamplingConfig { temperature: 0.7, top_k: 10, ..Default::default() };
/// let (tokens, logp) = sample(&logits, &cfg)?;
/// assert_eq!(tokens.dims(), &[4]);
/// assert!(logp.to_vec1::<f32>()?.iter().all(|&l| l <= 0.0));
/// # Ok(()) }
/// ```
pub fn sample(logits: &Tensor, cfg: &SamplingConfig) -> Result<(Tensor, Tensor)> {
    let (_, vocab) = logits.dims2()?;
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let out = match &*storage {
        Storage::Cpu(s) => with_float_slice!(s, layout, "logits", |x| op::sample(
            &SampleInputs::new(x, vocab),
            cfg
        )
        .map_err(wrap)?),
        _ => candle_core::bail!("{OP}: the candle op runs on CPU tensors in this build"),
    };
    let b = out.tokens.len();
    let dev = logits.device();
    Ok((
        Tensor::from_vec(out.tokens, b, dev)?,
        Tensor::from_vec(out.logp, b, dev)?,
    ))
}
