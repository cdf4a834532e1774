//! # grpo-kernels
//!
//! Fast, tested kernels for GRPO training (Shao et al., "DeepSeekMath", 2024):
//! every op has a CPU implementation (the reference, and a multithreaded
//! fallback) and, with the `cuda` feature, hand-written CUDA kernels.
//!
//! | op | module |
//! |---|---|
//! | token log-probs (+ entropy), forward and backward | [`ops::logprob`] |
//! | group advantages (GRPO, Dr. GRPO, batch std, RLOO, whitening), reward weighting, TRL's NaN rewards and `normalize_then_sum`, verl's groups of one, broadcast to tokens | [`ops::advantages`] |
//! | KL estimators k1, k2, k3, verl's low-variance k3, `abs` and straight-through `+` forms, forward and backward | [`ops::kl`] |
//! | policy-gradient corrections (TRL): sampler importance weights (vLLM IS), off-policy sequence mask (OPSM), high-entropy token mask, truncated-completion mask | [`ops::corrections`] |
//! | clipped policy loss (token / sequence ratios, dual clip, KL penalty, four aggregations) with statistics, forward and backward | [`ops::policy_loss`] |
//! | token sampling: temperature, top-k, top-p, min-p, Gumbel-max over a Philox4x32-10 stream | [`ops::sampling`], [`ops::philox`] |
//! | fused linear log-probs: the same from hidden states and the LM head, without `[N, V]` logits | [`ops::fused_linear`] |
//! | fused LM head + GRPO loss: loss, statistics and `dh`, `dW` from hidden states in one pass (three matrix products) | [`ops::fused_linear_loss`] |

#![warn(missing_docs)]

pub mod element;
pub mod error;
pub mod memory;
pub mod ops;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(feature = "candle")]
pub mod candle;

pub use element::{DType, Float, TokenId};
pub use error::{CudaFailure, DeviceFault, Error, Result};
pub use memory::{Host, Memory};
pub use ops::advantages::{
    broadcast_to_tokens, broadcast_to_tokens_into, group_advantages, group_advantages_into, AdvantageConfig,
    AdvantageMode, GroupAdvantages, GroupAdvantagesOut, NanRewards, RewardAggregation, Rewards, Singletons,
};
pub use ops::corrections::{
    high_entropy_mask, high_entropy_mask_into, mask_truncated_completions, off_policy_mask,
    off_policy_mask_into, sampler_is_weights, sampler_is_weights_into, IsMode, SamplerIs, SamplerIsConfig,
    SamplerIsStats, SamplerLogps,
};
pub use ops::fused_linear::{
    fused_linear_logprobs, fused_linear_logprobs_backward, fused_linear_logprobs_backward_into,
    fused_linear_logprobs_into, FusedLinearConfig, LinearGrads, LinearGradsOut, LinearRows,
};
pub use ops::fused_linear_loss::{
    fused_linear_policy_loss, fused_linear_policy_loss_into, FusedLossConfig, LinearLoss, LinearLossInputs,
    LinearLossOut,
};
pub use ops::kl::{
    kl_divergence, kl_divergence_backward, kl_divergence_backward_into, kl_divergence_into, KlEstimator,
    KlInputs,
};
pub use ops::layout::SeqLayout;
pub use ops::logprob::{
    token_logprobs, token_logprobs_backward, token_logprobs_backward_inplace, token_logprobs_backward_into,
    token_logprobs_into, LogProbConfig, LogProbGrads, LogProbSaved, LogProbs, LogProbsOut, LogitRows,
};
pub use ops::math::{active_simd_level, set_simd_level, simd_level, SimdLevel};
pub use ops::philox::{philox4x32_10, RowStream};
pub use ops::policy_loss::{
    policy_loss, policy_loss_backward, policy_loss_backward_into, policy_loss_into, Advantage, Aggregation,
    ImportanceLevel, PolicyLoss, PolicyLossConfig, PolicyLossInputs, PolicyLossStats, PolicyObjective,
};
pub use ops::sampling::{sample, sample_into, SampleInputs, Samples, SamplesOut, SamplingConfig};
