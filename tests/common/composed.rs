//! GRPO's loss composed from candle's own tensor ops, the textbook form TRL
//! writes in PyTorch: what `grpo_kernels::candle` replaces. Shared by the
//! candle tests (same loss and gradients) and `benches/candle.rs` (time and
//! memory against ours).

use candle_core::{Result, Tensor, D};
use candle_nn::ops::log_softmax;
use grpo_kernels::PolicyLossConfig;

/// `log softmax(logits)` at `targets`: `[S, T, V]` logits, `[S, T]` U32 ids.
pub fn composed_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    log_softmax(logits, D::Minus1)?
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)
}

/// Token ratios, two-sided clip, k3 KL, seq-mean-token-mean over `[S, T]`
/// log-probs; `adv` `[S]`, `mask` F32 `[S, T]`.
pub fn composed_grpo(
    logp: &Tensor,
    old: &Tensor,
    reference: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    cfg: &PolicyLossConfig,
) -> Result<Tensor> {
    let ratio = (logp - old)?.exp()?;
    let adv = adv.unsqueeze(1)?.broadcast_as(logp.shape())?;
    let unclipped = (&ratio * &adv)?;
    let clipped = (ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)? * &adv)?;
    let surrogate = unclipped.minimum(&clipped)?;
    let d = (reference - logp)?;
    let k3 = ((d.exp()? - &d)? - 1.0)?;
    let per_token = ((k3 * cfg.beta as f64)? - surrogate)?;
    let masked = (per_token * mask)?;
    let per_seq = (masked.sum(1)? / mask.sum(1)?.clamp(1.0, f64::MAX)?)?;
    per_seq.mean_all()
}
