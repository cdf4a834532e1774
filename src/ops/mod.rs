//! The ops: one module per family, each holding the family's spec (inputs,
//! parameters, validation) and its CPU kernel, which is both the reference
//! the CUDA kernels are tested against and a multithreaded fallback.

pub mod math;

<<<<<<< HEAD
pub mod advantages;
pub mod kl;
=======
pub mod fused_linear;
>>>>>>> fused
pub mod layout;
pub mod logprob;
<<<<<<< HEAD
pub mod policy_loss;
=======
pub mod philox;
pub mod sampling;
>>>>>>> sampling
