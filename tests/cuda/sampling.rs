//! CUDA fused sampling against the CPU op: the same token for the same
//! (seed, row, step) on awkward sizes, every dtype and filter combination
//! (the CPU op is itself checked against an exact f64 reference and the
//! filtered distribution in tests/sampling.rs), the same log-prob, and the
//! status word for bad rows.
#![cfg(feature = "cuda")]

use crate::common::gpu::{down, gpu, poison_pool, sanitizer, up};
use crate::common::{assert_close, Rng};
use grpo_kernels::cuda::{self, Device, Gpu, GpuFloat};
use grpo_kernels::{sample, DeviceFault, Error, SampleInputs, SamplingConfig};
use half::{bf16, f16};

fn configs() -> Vec<SamplingConfig> {
    let c = |temperature, top_k, top_p, min_p| SamplingConfig {
        temperature,
        top_k,
        top_p,
        min_p,
        seed: 0x5EED,
        step: 3,
    };
    vec![
        c(1.0, 0, 1.0, 0.0),
        c(0.7, 0, 1.0, 0.0),
        c(0.0, 0, 1.0, 0.0),
        c(0.7, 50, 1.0, 0.0),
        c(1.0, 0, 0.9, 0.0),
        c(0.7, 50, 0.9, 0.0),
        c(1.0, 1, 1.0, 0.0),
        c(1.0, 0, 1.0, 0.05),
        c(1.3, 3000, 0.95, 0.01),
        c(0.5, 0, 0.3, 0.0),
    ]
}

/// Draws on both devices; returns the rows whose tokens differ.
fn compare<T: GpuFloat>(
    gpu: &Gpu,
    rows: usize,
    vocab: usize,
    spread: f64,
    cfg: &SamplingConfig,
    seed: u64,
) -> usize {
    let mut rng = Rng::new(seed);
    let logits: Vec<T> = rng.normals(rows * vocab, spread);
    let want = sample(&SampleInputs::new(&logits, vocab), cfg).unwrap();
    let d_logits = up(gpu, &logits);
    let inputs = SampleInputs::<T, Device> {
        logits: d_logits.as_view(),
        vocab,
    };
    poison_pool(gpu, 2 * rows);
    let got = cuda::sample(gpu, &inputs, cfg).unwrap();
    gpu.check().unwrap();
    let (tokens, logp) = (down(gpu, &got.tokens), down(gpu, &got.logp));
    let what = format!("{:?} {rows}x{vocab} spread {spread} {cfg:?}", T::DTYPE);
    let mut differ = 0;
    for r in 0..rows {
        assert!(
            (tokens[r] as usize) < vocab,
            "{what}: row {r} token {} out of range",
            tokens[r]
        );
        if tokens[r] != want.tokens[r] {
            differ += 1;
            continue;
        }
        assert_close(
            &format!("logp {what} row {r}"),
            &[logp[r]],
            &[want.logp[r] as f64],
            2e-5,
            2e-5,
        );
    }
    differ
}

#[test]
#[ignore = "needs a CUDA device"]
fn tokens_match_cpu_on_awkward_sizes_and_dtypes() {
    let gpu = gpu();
    let shapes: &[(usize, usize)] = if sanitizer() {
        &[(3, 1), (5, 7), (9, 1000)]
    } else {
        &[(3, 1), (5, 7), (64, 1000), (33, 32_003), (64, 151_936)]
    };
    let (mut rows_total, mut differ_total) = (0, 0);
    for (i, &(rows, vocab)) in shapes.iter().enumerate() {
        for (k, cfg) in configs().iter().enumerate() {
            for spread in [1.0, 4.0] {
                let seed = (i * 100 + k) as u64;
                differ_total += compare::<f32>(&gpu, rows, vocab, spread, cfg, seed);
                differ_total += compare::<bf16>(&gpu, rows, vocab, spread, cfg, seed + 1);
                differ_total += compare::<f16>(&gpu, rows, vocab, spread, cfg, seed + 2);
                rows_total += 3 * rows;
            }
        }
    }
    // Rounding ties (keys within an ulp, a mass on a top-p boundary) may
    // flip a few rows; a rule difference would flip many.
    println!("{differ_total} of {rows_total} rows differ");
    assert!(
        differ_total * 1000 <= rows_total,
        "{differ_total} of {rows_total} rows differ"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn ties_and_plateaus_are_resolved_like_the_cpu() {
    let gpu = gpu();
    // Many equal values (one histogram bin that cannot be split), top-k
    // cutting through them (ties with the k-th are kept), top-p over them.
    let vocab = 5000;
    let mut logits = vec![0.0f32; 4 * vocab];
    for (i, x) in logits.iter_mut().enumerate() {
        *x = match i % vocab {
            j if j < 3000 => 1.0,
            j if j < 3010 => 2.5,
            _ => -1.0,
        };
    }
    let d_logits = up(&gpu, &logits);
    for cfg in configs() {
        let want = sample(&SampleInputs::new(&logits, vocab), &cfg).unwrap();
        let inputs = SampleInputs::<f32, Device> {
            logits: d_logits.as_view(),
            vocab,
        };
        let got = cuda::sample(&gpu, &inputs, &cfg).unwrap();
        gpu.check().unwrap();
        assert_eq!(down(&gpu, &got.tokens), want.tokens, "{cfg:?}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_rows_are_reported_by_index() {
    let gpu = gpu();
    let vocab = 300;
    let mut logits = vec![0.5f32; 6 * vocab];
    logits[4 * vocab + 17] = f32::NAN;
    for x in &mut logits[2 * vocab..3 * vocab] {
        *x = f32::NEG_INFINITY;
    }
    let d_logits = up(&gpu, &logits);
    let inputs = SampleInputs::<f32, Device> {
        logits: d_logits.as_view(),
        vocab,
    };
    let got = cuda::sample(&gpu, &inputs, &SamplingConfig::default()).unwrap();
    let err = gpu.check().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Device {
                fault: DeviceFault::NonFinite,
                index: 2,
                op: "sample"
            }
        ),
        "{err}"
    );
    let logp = down(&gpu, &got.logp);
    assert!(
        logp[2].is_nan() && logp[4].is_nan() && logp[0].is_finite(),
        "{logp:?}"
    );
    gpu.check().expect("check clears the status");
}
