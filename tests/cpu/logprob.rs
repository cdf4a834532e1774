//! Token log-probs on the CPU against an independent f64 reference, the
//! backward against finite differences, properties, and every bad input.

use crate::common::reference::logprob_rows as reference;
use crate::common::{assert_close, assert_close_rows, finite_diff, softmax_row_atol, widen, Rng};
use grpo_kernels::{
    token_logprobs, token_logprobs_backward, token_logprobs_backward_inplace, Error, Float, LogProbConfig,
    LogProbGrads, LogitRows,
};
use half::{bf16, f16};
use proptest::prelude::*;

fn cfg(t: f32) -> LogProbConfig {
    LogProbConfig {
        temperature: t,
        entropy: true,
        ignore_index: None,
    }
}

fn check_forward<T: Float>(rows: usize, vocab: usize, scale: f64, t: f32, seed: u64, tol: f64) {
    let mut rng = Rng::new(seed);
    let logits: Vec<T> = rng.normals(rows * vocab, scale);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    let out = token_logprobs(
        &LogitRows {
            logits: &logits,
            targets: &targets,
            mask: None,
            vocab,
        },
        &cfg(t),
    )
    .unwrap();
    let tgt: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
    let want = reference(&widen(&logits), &tgt, vocab, t as f64);
    let what = format!("{:?} rows={rows} vocab={vocab} scale={scale} T={t}", T::DTYPE);
    let col = |k: usize| want.iter().map(|w| [w.0, w.1, w.2][k]).collect::<Vec<_>>();
    assert_close(&format!("logp {what}"), &out.logp, &col(0), tol, tol);
    assert_close(
        &format!("entropy {what}"),
        out.entropy.as_ref().unwrap(),
        &col(1),
        tol,
        tol,
    );
    assert_close(&format!("lse {what}"), &out.lse, &col(2), tol, tol);
}

#[test]
fn forward_matches_f64_reference_on_awkward_sizes() {
    let shapes = [
        (1, 1),
        (3, 2),
        (5, 7),
        (4, 1021),
        (9, 2048),
        (3, 4099),
        (7, 32000),
    ];
    for (i, &(rows, vocab)) in shapes.iter().enumerate() {
        for &t in &[1.0f32, 0.7, 2.5] {
            let seed = 100 + i as u64;
            check_forward::<f32>(rows, vocab, 3.0, t, seed, 2e-5);
            check_forward::<bf16>(rows, vocab, 3.0, t, seed, 2e-5);
            check_forward::<f16>(rows, vocab, 3.0, t, seed, 2e-5);
        }
    }
}

#[test]
fn forward_at_qwen_vocab() {
    check_forward::<bf16>(3, 151_936, 4.0, 1.0, 7, 1e-4);
    check_forward::<f32>(2, 151_936, 4.0, 0.6, 8, 1e-4);
}

#[test]
fn forward_is_stable_for_huge_logits() {
    // Logits up to 1e4 in magnitude: a naive exp overflows at 89.
    check_forward::<f32>(6, 513, 5e3, 1.0, 9, 1e-4);
    check_forward::<bf16>(6, 513, 5e3, 1.0, 10, 1e-4);
}

#[test]
fn negative_infinity_means_probability_zero() {
    let logits = [0.0f32, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
    let rows = |targets: &'static [u32]| LogitRows {
        logits: &logits[..],
        targets,
        mask: None,
        vocab: 2,
    };
    // A target of probability 0 has no finite log-prob.
    assert_eq!(
        token_logprobs(&rows(&[1u32, 0]), &cfg(1.0)).unwrap_err(),
        Error::NonFinite {
            op: "token_logprobs",
            what: "logp",
            index: 0
        }
    );
    let out = token_logprobs(&rows(&[0u32, 0]), &cfg(1.0)).unwrap();
    assert_eq!(out.logp, vec![0.0, 0.0]);
    assert_eq!(out.entropy.as_ref().unwrap(), &vec![0.0, 0.0]);
    let grads = [1.0f32, 1.0];
    let d = token_logprobs_backward(
        &LogitRows {
            logits: &logits,
            targets: &[0u32, 0],
            mask: None,
            vocab: 2,
        },
        &cfg(1.0),
        &out.saved(),
        &LogProbGrads {
            logp: &grads,
            entropy: Some(&grads),
            lse: None,
        },
    )
    .unwrap();
    assert!(d.iter().all(|x| x.is_finite()), "{d:?}");
}

#[test]
fn masked_and_ignored_rows_are_zero_and_never_read() {
    let vocab = 5;
    // Row 1 holds NaN: it is masked, so it must not be read.
    let mut logits = vec![0.5f32; 4 * vocab];
    logits[vocab + 2] = f32::NAN;
    let targets = [1i64, 2, -100, 4];
    let mask = [1u8, 0, 1, 1];
    let c = LogProbConfig {
        ignore_index: Some(-100),
        ..cfg(1.0)
    };
    let rows = LogitRows::new(&logits, &targets, vocab).with_mask(&mask);
    let out = token_logprobs(&rows, &c).unwrap();
    assert_eq!(out.logp[1], 0.0);
    assert_eq!(out.logp[2], 0.0);
    assert!((out.logp[0] + (5.0f32).ln()).abs() < 1e-6);
    let ones = [1.0f32; 4];
    let d = token_logprobs_backward(
        &rows,
        &c,
        &out.saved(),
        &LogProbGrads {
            logp: &ones,
            entropy: Some(&ones),
            lse: Some(&ones),
        },
    )
    .unwrap();
    assert!(d[vocab..3 * vocab].iter().all(|&x| x == 0.0));
    assert!(d[..vocab].iter().any(|&x| x != 0.0));
}

/// The scalar `sum_i g_i logp_i + gh_i H_i + gl_i lse_i` in f64.
fn weighted_outputs(logits: &[f64], targets: &[usize], vocab: usize, t: f64, g: &[[f64; 3]]) -> f64 {
    reference(logits, targets, vocab, t)
        .iter()
        .zip(g)
        .map(|(o, g)| g[0] * o.0 + g[1] * o.1 + g[2] * o.2)
        .sum()
}

fn check_backward<T: Float>(rows: usize, vocab: usize, t: f32, seed: u64, rtol: f64) {
    let mut rng = Rng::new(seed);
    let logits: Vec<T> = rng.normals(rows * vocab, 2.0);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    let g: Vec<[f64; 3]> = (0..rows)
        .map(|_| [rng.normal(), rng.normal(), rng.normal()])
        .collect();
    let gf = |k: usize| g.iter().map(|x| x[k] as f32).collect::<Vec<_>>();
    let (g_logp, g_h, g_lse) = (gf(0), gf(1), gf(2));
    let c = cfg(t);
    let input = LogitRows::new(&logits, &targets, vocab);
    let fwd = token_logprobs(&input, &c).unwrap();
    let grads: LogProbGrads = LogProbGrads {
        logp: &g_logp,
        entropy: Some(&g_h),
        lse: Some(&g_lse),
    };
    let got = token_logprobs_backward(&input, &c, &fwd.saved(), &grads).unwrap();

    let tgt: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
    let g64: Vec<[f64; 3]> = g
        .iter()
        .map(|x| [x[0] as f32 as f64, x[1] as f32 as f64, x[2] as f32 as f64])
        .collect();
    let want = finite_diff(&widen(&logits), 1e-5, |z| {
        weighted_outputs(z, &tgt, vocab, t as f64, &g64)
    });
    let got32: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
    // bf16 / f16 gradients are rounded on store: rtol is their half-ulp.
    let what = format!("dlogits {:?} {rows}x{vocab} T={t}", T::DTYPE);
    assert_close(&what, &got32, &want, 1e-7, rtol);

    let mut inplace = logits.clone();
    token_logprobs_backward_inplace(&mut inplace, &targets, None, vocab, &c, &fwd.saved(), &grads).unwrap();
    assert_eq!(inplace, got, "in-place backward differs from out-of-place");
}

#[test]
fn backward_matches_finite_differences() {
    for (i, &(rows, vocab)) in [(1, 1), (2, 3), (3, 13), (4, 37), (2, 2053)].iter().enumerate() {
        for &t in &[1.0f32, 0.6, 1.7] {
            check_backward::<f32>(rows, vocab, t, 200 + i as u64, 1e-4);
            check_backward::<bf16>(rows, vocab, t, 300 + i as u64, 4e-3);
            check_backward::<f16>(rows, vocab, t, 400 + i as u64, 5e-4);
        }
    }
}

/// The backward's closed form in f64: `dz_j = (g (1[j=y] - p_j) + g_L p_j - g_H p_j (log p_j + H)) / T`.
fn reference_grad(logits: &[f64], targets: &[usize], vocab: usize, t: f64, g: &[[f64; 3]]) -> Vec<f64> {
    let outs = reference(logits, targets, vocab, t);
    let mut d = Vec::with_capacity(logits.len());
    for (i, row) in logits.chunks(vocab).enumerate() {
        let (_, h, lse) = outs[i];
        for (j, z) in row.iter().enumerate() {
            let log_p = z / t - lse;
            let p = log_p.exp();
            let onehot = (j == targets[i]) as u8 as f64;
            d.push((g[i][0] * (onehot - p) + g[i][2] * p - g[i][1] * p * (log_p + h)) / t);
        }
    }
    d
}

#[test]
fn backward_is_accurate_at_low_temperature_and_large_logits() {
    // x and lse both near 40: a formula with x - lse computed late cancels.
    let (rows, vocab) = (64, 4051);
    let mut rng = Rng::new(21);
    for &(t, scale) in &[(0.35f32, 4.0), (0.1, 3.0), (1.0, 50.0)] {
        let logits: Vec<f32> = rng.normals(rows * vocab, scale);
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        let g: Vec<[f64; 3]> = (0..rows)
            .map(|_| [rng.normal() as f32 as f64, rng.normal() as f32 as f64, 0.0])
            .collect();
        let (gl, gh): (Vec<f32>, Vec<f32>) = g.iter().map(|x| (x[0] as f32, x[1] as f32)).unzip();
        let input = LogitRows::new(&logits, &targets, vocab);
        let fwd = token_logprobs(&input, &cfg(t)).unwrap();
        let grads: LogProbGrads = LogProbGrads {
            logp: &gl,
            entropy: Some(&gh),
            lse: None,
        };
        let got = token_logprobs_backward(&input, &cfg(t), &fwd.saved(), &grads).unwrap();
        let tgt: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
        let want = reference_grad(&widen(&logits), &tgt, vocab, t as f64, &g);
        let atol = softmax_row_atol(&logits, t);
        assert_close_rows(
            &format!("dlogits T={t} scale={scale}"),
            &got,
            &want,
            vocab,
            atol,
            |_| 0.0,
            1e-4,
        );
    }
}

#[test]
fn gradient_rows_sum_to_zero_without_lse_gradient() {
    // sum_j dz_j = g (1 - 1) + g_H * 0 = 0: a softmax-invariance property.
    let mut rng = Rng::new(5);
    let (rows, vocab) = (4, 777);
    let logits: Vec<f32> = rng.normals(rows * vocab, 2.0);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    let input = LogitRows::new(&logits, &targets, vocab);
    let fwd = token_logprobs(&input, &cfg(1.3)).unwrap();
    let g: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
    let d = token_logprobs_backward(
        &input,
        &cfg(1.3),
        &fwd.saved(),
        &LogProbGrads {
            logp: &g,
            entropy: Some(&g),
            lse: None,
        },
    )
    .unwrap();
    for row in d.chunks(vocab) {
        assert!(row.iter().map(|&x| x as f64).sum::<f64>().abs() < 1e-5);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// log-probs are <= 0, exp of all V of them sums to 1, entropy lies in [0, ln V].
    #[test]
    fn logprobs_form_a_distribution(vocab in 1usize..300, seed in any::<u64>(), scale in 0.01f64..50.0, t in 0.1f32..4.0) {
        let mut rng = Rng::new(seed);
        let row: Vec<f32> = rng.normals(vocab, scale);
        // One row per possible target, all holding the same logits.
        let logits: Vec<f32> = (0..vocab).flat_map(|_| row.iter().copied()).collect();
        let targets: Vec<u32> = (0..vocab as u32).collect();
        let out = token_logprobs(&LogitRows { logits: &logits, targets: &targets, mask: None, vocab }, &cfg(t)).unwrap();
        prop_assert!(out.logp.iter().all(|&l| l <= 1e-6));
        let total: f64 = out.logp.iter().map(|&l| (l as f64).exp()).sum();
        prop_assert!((total - 1.0).abs() < 1e-4, "sum of probabilities {}", total);
        let h = out.entropy.unwrap()[0] as f64;
        prop_assert!(h >= -1e-5 && h <= (vocab as f64).ln() + 1e-4, "entropy {}", h);
    }
}

fn fwd_err(logits: &[f32], targets: &[i64], mask: Option<&[u8]>, vocab: usize, c: LogProbConfig) -> Error {
    token_logprobs(
        &LogitRows {
            logits,
            targets,
            mask,
            vocab,
        },
        &c,
    )
    .unwrap_err()
}

#[test]
fn bad_inputs_are_typed_errors() {
    let ok = [0.0f32; 6];
    let c = cfg(1.0);
    assert!(matches!(
        fwd_err(&[], &[], None, 3, c),
        Error::Empty { what: "targets", .. }
    ));
    assert!(matches!(
        fwd_err(&[], &[0], None, 0, c),
        Error::Empty { what: "vocab", .. }
    ));
    assert!(matches!(
        fwd_err(&ok[..5], &[0, 1], None, 3, c),
        Error::ShapeMismatch {
            what: "logits",
            expected: 6,
            got: 5,
            ..
        }
    ));
    assert!(matches!(
        fwd_err(&ok, &[0, 1], Some(&[1]), 3, c),
        Error::ShapeMismatch { what: "mask", .. }
    ));
    for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            fwd_err(&ok, &[0, 1], None, 3, cfg(t)),
            Error::InvalidParameter {
                name: "temperature",
                ..
            }
        ));
    }
    assert!(matches!(
        fwd_err(&ok, &[0, 3], None, 3, c),
        Error::TokenOutOfRange {
            index: 1,
            token: 3,
            vocab: 3,
            ..
        }
    ));
    assert!(matches!(
        fwd_err(&ok, &[-1, 0], None, 3, c),
        Error::TokenOutOfRange {
            index: 0,
            token: -1,
            ..
        }
    ));
    for bad in [f32::NAN, f32::INFINITY] {
        let mut logits = ok;
        logits[4] = bad;
        assert!(matches!(
            fwd_err(&logits, &[0, 1], None, 3, c),
            Error::NonFinite {
                what: "logits",
                index: 1,
                ..
            }
        ));
    }
    let all_neg_inf = [f32::NEG_INFINITY; 3];
    assert!(matches!(
        fwd_err(&all_neg_inf, &[0], None, 3, c),
        Error::NonFinite { index: 0, .. }
    ));

    // Backward: gradient lengths, and an entropy gradient without a saved entropy.
    let input = LogitRows {
        logits: &ok[..],
        targets: &[0u32, 1][..],
        mask: None,
        vocab: 3,
    };
    let no_entropy = LogProbConfig { entropy: false, ..c };
    let fwd = token_logprobs(&input, &no_entropy).unwrap();
    let g = [1.0f32; 2];
    let short: LogProbGrads = LogProbGrads {
        logp: &g[..1],
        entropy: None,
        lse: None,
    };
    assert!(matches!(
        token_logprobs_backward(&input, &c, &fwd.saved(), &short).unwrap_err(),
        Error::ShapeMismatch {
            what: "grad_logp",
            ..
        }
    ));
    let needs_h: LogProbGrads = LogProbGrads {
        logp: &g,
        entropy: Some(&g),
        lse: None,
    };
    assert!(matches!(
        token_logprobs_backward(&input, &c, &fwd.saved(), &needs_h).unwrap_err(),
        Error::Unsupported { .. }
    ));
}
