//! The candle ops (`src/candle/`, feature `candle`) on CPU tensors, one
//! module per op family plus `nn`: values against the raw ops and composed
//! candle math, typed errors, and gradients through candle's autograd
//! against finite differences of f64 references. Plus the two suites that
//! run every family on the same inputs as the CPU ops' in `tests/cpu/`:
//! `bad_input` (each kind of bad call gives the CPU ops' typed error) and
//! `extreme_inputs` (random finite inputs of extreme magnitude give a typed
//! error or finite outputs and gradients). The candle ops on CUDA tensors
//! are in `tests/cuda/candle.rs`. Layout: `tests/README.md`.

#[cfg(feature = "candle")]
#[path = "../common/mod.rs"]
mod common;

#[cfg(feature = "candle")]
mod advantages;
#[cfg(feature = "candle")]
mod bad_input;
#[cfg(feature = "candle")]
mod corrections;
#[cfg(feature = "candle")]
mod extreme_inputs;
#[cfg(feature = "candle")]
mod fused_linear;
#[cfg(feature = "candle")]
mod fused_linear_loss;
#[cfg(feature = "candle")]
mod kl;
#[cfg(feature = "candle")]
mod logprob;
#[cfg(feature = "candle")]
mod nn;
#[cfg(feature = "candle")]
mod policy_loss;
#[cfg(feature = "candle")]
mod sampling;

/// Shown as ignored, with the reason, when the suites are compiled out.
#[cfg(not(feature = "candle"))]
#[test]
#[ignore = "the candle suites need the `candle` feature: cargo test --features candle"]
fn candle_suites_need_the_candle_feature() {
    panic!("built without the `candle` feature: rebuild with --features candle");
}
