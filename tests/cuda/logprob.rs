//! CUDA token log-probs against the CPU reference: fresh random inputs,
//! awkward sizes, every dtype, NaN-poisoned outputs, in-place backward, and
//! the status word for bad data.
#![cfg(feature = "cuda")]

use crate::common::gpu::{down, gpu, poisoned, sized, up};
use crate::common::{assert_close, assert_close_rows, softmax_row_atol, Rng};
use grpo_kernels::cuda::{self, Device, Gpu, GpuFloat, LogProbsOut};
use grpo_kernels::{
    token_logprobs, token_logprobs_backward, DeviceFault, Error, LogProbConfig, LogProbGrads, LogProbSaved,
    LogitRows,
};
use half::{bf16, f16};

struct Case {
    rows: usize,
    vocab: usize,
    temperature: f32,
    entropy: bool,
    masked: bool,
}

/// Runs forward and backward on both devices and compares.
fn check<T: GpuFloat>(gpu: &Gpu, case: &Case, seed: u64) {
    let Case {
        rows,
        vocab,
        temperature,
        entropy,
        masked,
    } = *case;
    let what = format!(
        "{:?} rows={rows} vocab={vocab} T={temperature} H={entropy} mask={masked}",
        T::DTYPE
    );
    let mut rng = Rng::new(seed);
    let logits: Vec<T> = rng.normals(rows * vocab, 4.0);
    let targets: Vec<i64> = (0..rows)
        .map(|_| {
            if masked && rng.below(5) == 0 {
                -100
            } else {
                rng.below(vocab) as i64
            }
        })
        .collect();
    let mask: Vec<u8> = (0..rows).map(|_| (!masked || rng.below(4) != 0) as u8).collect();
    let cfg = LogProbConfig {
        temperature,
        entropy,
        ignore_index: Some(-100),
    };
    let cpu_rows = LogitRows::new(&logits, &targets, vocab).with_mask(&mask);
    let want = token_logprobs(&cpu_rows, &cfg).unwrap();

    let (d_logits, d_targets, d_mask) = (up(gpu, &logits), up(gpu, &targets), up(gpu, &mask));
    let rows_dev: LogitRows<'_, T, i64, Device> = LogitRows {
        logits: d_logits.as_view(),
        targets: d_targets.as_view(),
        mask: Some(d_mask.as_view()),
        vocab,
    };
    let (mut logp, mut lse, mut ent) = (poisoned(gpu, rows), poisoned(gpu, rows), poisoned(gpu, rows));
    cuda::token_logprobs_into(
        gpu,
        &rows_dev,
        &cfg,
        &mut LogProbsOut {
            logp: logp.as_view_mut(),
            entropy: entropy.then(|| ent.as_view_mut()),
            lse: lse.as_view_mut(),
        },
    )
    .unwrap();
    gpu.check().unwrap();
    let tol = 2e-5 * (vocab as f64).ln().max(1.0);
    let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_close(
        &format!("logp {what}"),
        &down(gpu, &logp),
        &widen(&want.logp),
        tol,
        tol,
    );
    assert_close(
        &format!("lse {what}"),
        &down(gpu, &lse),
        &widen(&want.lse),
        tol,
        tol,
    );
    if entropy {
        let want_h = widen(want.entropy.as_ref().unwrap());
        assert_close(&format!("entropy {what}"), &down(gpu, &ent), &want_h, tol, tol);
    }

    // Backward from the CPU's saved values, so both sides see the same inputs.
    let g: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
    let g_h: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
    let grads_cpu: LogProbGrads = LogProbGrads {
        logp: &g,
        entropy: entropy.then_some(&g_h[..]),
        lse: Some(&g),
    };
    let want_d = token_logprobs_backward(&cpu_rows, &cfg, &want.saved(), &grads_cpu).unwrap();
    let (d_g, d_gh, d_lse) = (up(gpu, &g), up(gpu, &g_h), up(gpu, &want.lse));
    let d_ent = want.entropy.as_ref().map(|e| up(gpu, e));
    let saved = LogProbSaved::<Device> {
        lse: d_lse.as_view(),
        entropy: d_ent.as_ref().map(|e| e.as_view()),
    };
    let grads = LogProbGrads::<Device> {
        logp: d_g.as_view(),
        entropy: entropy.then(|| d_gh.as_view()),
        lse: Some(d_g.as_view()),
    };
    let got_d = cuda::token_logprobs_backward(gpu, &rows_dev, &cfg, &saved, &grads).unwrap();
    gpu.check().unwrap();
    let got_d = down(gpu, &got_d);
    let to64 = |v: &[T]| v.iter().map(|x| x.to_f32() as f64).collect::<Vec<_>>();
    let to32 = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    // One rounding of the stored dtype apart, at most.
    let rtol = match T::DTYPE {
        grpo_kernels::DType::F32 => 2e-5,
        grpo_kernels::DType::BF16 => 8e-3,
        grpo_kernels::DType::F16 => 1e-3,
    };
    let atol = softmax_row_atol(&logits, temperature);
    assert_close_rows(
        &format!("dlogits {what}"),
        &to32(&got_d),
        &to64(&want_d),
        vocab,
        atol,
        |r| {
            if entropy {
                (g_h[r] / temperature).abs() as f64
            } else {
                0.0
            }
        },
        rtol,
    );

    // In place: the gradient overwrites a copy of the logits.
    let mut inplace = up(gpu, &logits);
    cuda::token_logprobs_backward_inplace(
        gpu,
        &mut inplace.as_view_mut(),
        &rows_dev.targets,
        &rows_dev.mask,
        vocab,
        &cfg,
        &saved,
        &grads,
    )
    .unwrap();
    gpu.check().unwrap();
    assert_eq!(
        down(gpu, &inplace),
        got_d,
        "in-place differs from out-of-place ({what})"
    );
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let shapes = [
        (1, 1),
        (3, 7),
        (5, 1021),
        (64, 4099),
        (1, 151_936),
        (7, 151_936),
        (300, 32_000),
        (16_384, 1_000),
        (1_500, 151_936),
    ];
    for (i, &(rows, vocab)) in shapes.iter().enumerate() {
        cases.push(Case {
            rows,
            vocab,
            temperature: [1.0, 0.7, 1.3][i % 3],
            entropy: i % 2 == 0,
            masked: i % 3 != 1,
        });
    }
    sized(cases, |c| c.rows * c.vocab, 1 << 20)
}

#[test]
#[ignore = "needs a CUDA device"]
fn logprobs_match_cpu_f32() {
    let gpu = gpu();
    for (i, case) in cases().iter().enumerate() {
        check::<f32>(&gpu, case, 1000 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn logprobs_match_cpu_bf16() {
    let gpu = gpu();
    for (i, case) in cases().iter().enumerate() {
        check::<bf16>(&gpu, case, 2000 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn logprobs_match_cpu_f16() {
    let gpu = gpu();
    for (i, case) in cases().iter().take(6).enumerate() {
        check::<f16>(&gpu, case, 3000 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn random_row_counts_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(77);
    let runs = if crate::common::gpu::sanitizer() { 2 } else { 12 };
    for i in 0..runs {
        let case = Case {
            rows: 1 + rng.below(if crate::common::gpu::sanitizer() {
                256
            } else {
                16_384
            }),
            vocab: 1 + rng.below(5_000),
            temperature: rng.range(0.3, 2.0) as f32,
            entropy: true,
            masked: i % 2 == 0,
        };
        check::<bf16>(&gpu, &case, 4000 + i);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_data_is_reported_and_poisons_only_its_row() {
    let gpu = gpu();
    let vocab = 1000;
    for split_path in [false, true] {
        // Few rows of a long vocab take the split + merge path.
        let (rows, vocab) = if split_path { (2, 200_000) } else { (64, vocab) };
        let mut logits = vec![0.25f32; rows * vocab];
        let mut targets = vec![3u32; rows];
        targets[1] = vocab as u32; // out of range
        let d_logits = up(&gpu, &logits);
        let d_targets = up(&gpu, &targets);
        let rows_dev: LogitRows<'_, f32, u32, Device> = LogitRows {
            logits: d_logits.as_view(),
            targets: d_targets.as_view(),
            mask: None,
            vocab,
        };
        let cfg = LogProbConfig::default();
        let out = cuda::token_logprobs(&gpu, &rows_dev, &cfg).unwrap();
        let err = gpu.check().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Device {
                    fault: DeviceFault::TokenOutOfRange,
                    index: 1,
                    ..
                }
            ),
            "{err}"
        );
        let logp = down(&gpu, &out.logp);
        assert!(
            logp[1].is_nan() && (logp[0] + (vocab as f32).ln()).abs() < 1e-4,
            "{logp:?}"
        );
        gpu.check().expect("check clears the status");

        targets[1] = 0;
        logits[vocab + 17] = f32::NAN;
        let (d_logits, d_targets) = (up(&gpu, &logits), up(&gpu, &targets));
        let rows_dev: LogitRows<'_, f32, u32, Device> = LogitRows {
            logits: d_logits.as_view(),
            targets: d_targets.as_view(),
            mask: None,
            vocab,
        };
        let out = cuda::token_logprobs(&gpu, &rows_dev, &cfg).unwrap();
        assert!(matches!(
            gpu.check().unwrap_err(),
            Error::Device {
                fault: DeviceFault::NonFinite,
                index: 1,
                ..
            }
        ));
        assert!(down(&gpu, &out.lse)[1].is_nan());
    }
}
