//! The CPU ops, one module per op family (as `src/ops/`), plus the two
//! suites that run every family: `bad_input` (each kind of bad call gives its
//! typed error) and `extreme_inputs` (random finite inputs of extreme
//! magnitude give a typed error or finite outputs). The candle ops run both
//! on the same inputs in the candle binary (`tests/candle/bad_input.rs`,
//! `tests/candle/extreme_inputs.rs`).
//!
//! `tests/simd_level.rs` is a binary of its own: it caps the instruction set
//! process-wide, which would change the bits other tests here compute.
//! Layout: `tests/README.md`.

#[path = "../common/mod.rs"]
mod common;

mod advantages;
mod bad_input;
mod corrections;
mod extreme_inputs;
mod fused_linear;
mod fused_linear_loss;
mod into_forms;
mod kl;
mod logprob;
mod policy_loss;
mod sampling;
