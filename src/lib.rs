//! # grpo-kernels
//!
//! Fast, tested kernels for GRPO training (Shao et al., "DeepSeekMath", 2024):
//! every op has a CPU implementation (the reference, and a multithreaded
//! fallback) and, with the `cuda` feature, hand-written CUDA kernels.
//!
//! | op | module |
//! |---|---|
//! | token log-probs (+ entropy), forward and backward | [`ops::logprob`] |
//! | token sampling: temperature, top-k, top-p, min-p, Gumbel-max over a Philox4x32-10 stream | [`ops::sampling`], [`ops::philox`] |

#![warn(missing_docs)]
#![allow(clippy::too_many_arguments)]

pub mod element;
pub mod error;
pub mod memory;
pub mod ops;

pub use element::{DType, Float, TokenId};
pub use error::{Error, Result};
pub use memory::{Host, Memory};
pub use ops::layout::SeqLayout;
pub use ops::logprob::{
    token_logprobs, token_logprobs_backward, token_logprobs_backward_inplace, LogProbConfig, LogProbGrads,
    LogProbSaved, LogProbs, LogitRows,
};
pub use ops::philox::{philox4x32_10, RowStream};
pub use ops::sampling::{sample, SampleInputs, Samples, SamplingConfig};
