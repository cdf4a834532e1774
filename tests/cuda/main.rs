//! Every test that needs a CUDA device, one module per op family (as
//! `src/cuda/` and `cuda/`), plus `bad_input` (the CPU's bad-input cases on
//! the GPU: the same typed errors) and `candle` (the candle ops on CUDA
//! tensors, feature `candle-cuda`). Each compares the CUDA kernels with the
//! CPU ops on the same data.
//!
//! Every test is `#[ignore = "needs a CUDA device"]`, so a machine without
//! one lists them as ignored; on a GPU run them with
//! `cargo test --release --features cuda --test cuda -- --include-ignored`
//! (or `bash bench/gpu/run.sh parity`, over binaries built elsewhere).
//! Without the `cuda` feature (which needs nvcc to build), one ignored test
//! per family says so instead. Layout: `tests/README.md`.

#[cfg(feature = "cuda")]
#[path = "../common/mod.rs"]
mod common;

#[cfg(feature = "cuda")]
mod advantages;
#[cfg(feature = "cuda")]
mod bad_input;
#[cfg(feature = "candle-cuda")]
mod candle;
#[cfg(feature = "cuda")]
mod corrections;
#[cfg(feature = "cuda")]
mod fused_linear;
#[cfg(feature = "cuda")]
mod fused_linear_loss;
#[cfg(feature = "cuda")]
mod kl;
#[cfg(feature = "cuda")]
mod logprob;
#[cfg(feature = "cuda")]
mod policy_loss;
#[cfg(feature = "cuda")]
mod sampling;

/// One ignored test per family when the CUDA suites are compiled out, so
/// `cargo test` shows where they are and why they did not run (a plain
/// `--include-ignored` then fails here instead of passing nothing).
#[cfg(not(feature = "candle-cuda"))]
macro_rules! compiled_out {
    ($reason:literal: $($family:ident),+) => {
        $(
            #[test]
            #[ignore = $reason]
            fn $family() {
                panic!(concat!(stringify!($family), ": ", $reason));
            }
        )+
    };
}

#[cfg(not(feature = "cuda"))]
mod without_cuda_feature {
    compiled_out!("needs a CUDA device, and the `cuda` feature (nvcc) to build: see tests/README.md":
        advantages, bad_input, corrections, fused_linear, fused_linear_loss, kl, logprob, policy_loss, sampling);
}

#[cfg(not(feature = "candle-cuda"))]
mod without_candle_cuda_feature {
    compiled_out!("needs a CUDA device, and the `candle-cuda` feature to build: see tests/README.md": candle);
}
