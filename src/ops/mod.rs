//! The ops: one module per family, each holding the family's spec (inputs,
//! parameters, validation) and its CPU kernel, which is both the reference
//! the CUDA kernels are tested against and a multithreaded fallback.

pub(crate) mod math;

pub mod advantages;
pub mod corrections;
pub mod fused_linear;
pub mod fused_linear_loss;
pub mod kl;
pub mod layout;
pub mod logprob;
pub(crate) mod output;
pub mod philox;
pub mod policy_loss;
pub mod sampling;
