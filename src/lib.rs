//! # grpo-kernels
//!
//! Fast, tested kernels for GRPO training (Shao et al., "DeepSeekMath", 2024):
//! every op has a CPU implementation (the reference, and a multithreaded
//! fallback) and, with the `cuda` feature, hand-written CUDA kernels.
//!
//! | op | module |
//! |---|---|
//! | token log-probs (+ entropy), forward and backward | [`ops::logprob`] |
//! | fused linear log-probs: the same from hidden states and the LM head, without `[N, V]` logits | [`ops::fused_linear`] |

#![warn(missing_docs)]
#![allow(clippy::too_many_arguments)]

pub mod element;
pub mod error;
pub mod memory;
pub mod ops;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(feature = "candle")]
pub mod candle;

pub use element::{DType, Float, TokenId};
pub use error::{DeviceFault, Error, Result};
pub use memory::{Host, Memory};
pub use ops::fused_linear::{
    fused_linear_logprobs, fused_linear_logprobs_backward, FusedLinearConfig, LinearGrads, LinearRows,
};
pub use ops::layout::SeqLayout;
pub use ops::logprob::{
    token_logprobs, token_logprobs_backward, token_logprobs_backward_inplace, LogProbConfig, LogProbGrads,
    LogProbSaved, LogProbs, LogitRows,
};
