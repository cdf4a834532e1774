//! KL estimators against an f64 reference, the backward against finite
//! differences, verl's clamps, properties, and every bad input.

use crate::common::{assert_close, finite_diff, widen, Rng};
use grpo_kernels::{kl_divergence, kl_divergence_backward, Error, KlEstimator, KlInputs};
use proptest::prelude::*;

const ESTIMATORS: [KlEstimator; 4] = [
    KlEstimator::K1,
    KlEstimator::K2,
    KlEstimator::K3,
    KlEstimator::LowVarK3,
];

/// The estimate of `d = ref - logp` in f64, from Schulman's definitions and
/// verl's `low_var_kl`.
fn kl_ref(est: KlEstimator, d: f64) -> f64 {
    let k3 = |d: f64| d.exp_m1() - d;
    match est {
        KlEstimator::K1 => -d,
        KlEstimator::K2 => d * d / 2.0,
        KlEstimator::K3 => k3(d),
        KlEstimator::LowVarK3 => k3(d.clamp(-20.0, 20.0)).clamp(-10.0, 10.0),
    }
}

/// Log-probs and reference log-probs whose differences `d` cover tiny
/// (1e-6), small and moderate (|d| < 2) values.
fn inputs(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let logp: Vec<f32> = (0..n).map(|_| -(0.01 + 6.0 * rng.uniform()) as f32).collect();
    let ref_logp = logp
        .iter()
        .map(|&lp| {
            let scale = [1e-6, 1e-3, 0.1, 2.0][rng.below(4)];
            lp + rng.range(-scale, scale) as f32
        })
        .collect();
    (logp, ref_logp)
}

#[test]
fn forward_matches_f64_reference_on_awkward_sizes() {
    for (i, &n) in [1usize, 7, 33, 1000, 16_385, 100_003].iter().enumerate() {
        let (logp, ref_logp) = inputs(n, 10 + i as u64);
        let (lp, rf) = (widen(&logp), widen(&ref_logp));
        for est in ESTIMATORS {
            let got = kl_divergence(&KlInputs::new(&logp, &ref_logp), est).unwrap();
            let want: Vec<f64> = lp.iter().zip(&rf).map(|(l, r)| kl_ref(est, r - l)).collect();
            // k3 ~ d^2/2 is accurate relative to itself, also for d ~ 1e-6.
            assert_close(&format!("{est:?} n={n}"), &got, &want, 1e-30, 4e-6);
            // The backward over as many parallel blocks: `-grad dkl/dd`,
            // each element's derivative by central differences.
            let grad: Vec<f32> = Rng::new(40 + i as u64).normals(n, 1.0);
            let got = kl_divergence_backward(&KlInputs::new(&logp, &ref_logp), est, &grad).unwrap();
            let want: Vec<f64> = lp
                .iter()
                .zip(&rf)
                .zip(&grad)
                .map(|((l, r), &g)| {
                    let d = r - l;
                    -(g as f64) * (kl_ref(est, d + 1e-6) - kl_ref(est, d - 1e-6)) / 2e-6
                })
                .collect();
            assert_close(&format!("dlogp {est:?} n={n}"), &got, &want, 1e-6, 1e-5);
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    for (i, &n) in [1usize, 5, 64, 301].iter().enumerate() {
        let mut rng = Rng::new(20 + i as u64);
        let (logp, ref_logp) = inputs(n, 30 + i as u64);
        let grad: Vec<f32> = rng.normals(n, 1.0);
        let (lp, rf, g) = (widen(&logp), widen(&ref_logp), widen(&grad));
        for est in ESTIMATORS {
            let input = KlInputs::new(&logp, &ref_logp);
            let got = kl_divergence_backward(&input, est, &grad).unwrap();
            let loss = |lp: &[f64], rf: &[f64]| -> f64 {
                lp.iter()
                    .zip(rf)
                    .zip(&g)
                    .map(|((l, r), g)| g * kl_ref(est, r - l))
                    .sum()
            };
            let want = finite_diff(&lp, 1e-6, |x| loss(x, &rf));
            assert_close(&format!("dlogp {est:?} n={n}"), &got, &want, 1e-8, 1e-5);
            // Every estimator depends on ref - logp alone.
            let want_ref = finite_diff(&rf, 1e-6, |x| loss(&lp, x));
            let neg: Vec<f32> = got.iter().map(|x| -x).collect();
            assert_close(&format!("dref {est:?} n={n}"), &neg, &want_ref, 1e-8, 1e-5);
        }
    }
}

#[test]
fn low_var_k3_clamps_like_verl() {
    // d = ref - logp: beyond k3 = 10 (d > 2.528 or d < -11.0) and beyond |d| = 20.
    let ds = [-30.0f32, -20.5, -12.0, -5.0, -1.0, 0.0, 1e-4, 2.0, 2.6, 3.0, 25.0];
    let logp = vec![-1.0f32; ds.len()];
    let ref_logp: Vec<f32> = ds.iter().map(|d| d - 1.0).collect();
    let input = KlInputs::new(&logp, &ref_logp);
    let value = kl_divergence(&input, KlEstimator::LowVarK3).unwrap();
    let grad = kl_divergence_backward(&input, KlEstimator::LowVarK3, &vec![1.0; ds.len()]).unwrap();
    for (i, (&v, &g)) in value.iter().zip(&grad).enumerate() {
        // d as the op sees it, after rounding ref_logp to f32.
        let d = ref_logp[i] as f64 - logp[i] as f64;
        let k3 = d.exp_m1() - d;
        if k3 > 10.0 {
            assert_eq!((v, g), (10.0, 0.0), "d = {d}");
        } else {
            assert!(
                (v as f64 - k3).abs() <= 1e-6 * k3.max(1e-8),
                "d = {d}: {v} vs {k3}"
            );
            let want = -d.exp_m1();
            assert!(
                (g as f64 - want).abs() <= 1e-6 * want.abs().max(1e-4),
                "d = {d}: {g} vs {want}"
            );
        }
    }
    // The plain k3 saturates instead of overflowing.
    let k3 = kl_divergence(&KlInputs::new(&[-100.0], &[0.0]), KlEstimator::K3).unwrap();
    assert!(k3[0].is_finite() && k3[0] > 1e38, "{}", k3[0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The kernel applies exactly `KlEstimator::value` and `grad_logp`
    /// (the per-element math the CUDA kernel mirrors), and the estimates
    /// keep their signs and bounds.
    #[test]
    fn kernel_is_the_per_element_math(n in 1usize..3000, seed in any::<u64>(), scale in 0.001f64..40.0) {
        let mut rng = Rng::new(seed);
        let logp: Vec<f32> = (0..n).map(|_| -(rng.uniform() * 10.0) as f32).collect();
        let ref_logp: Vec<f32> = logp.iter().map(|&l| l + (rng.normal() * scale) as f32).collect();
        let grad = vec![1.0f32; n];
        for est in ESTIMATORS {
            let input = KlInputs::new(&logp, &ref_logp);
            let value = kl_divergence(&input, est).unwrap();
            let dlogp = kl_divergence_backward(&input, est, &grad).unwrap();
            for i in 0..n {
                let d = ref_logp[i] - logp[i];
                // With the multiply-add of the copy the kernel dispatched to.
                let (v, g) = (est.value(d), est.grad_logp(d));
                prop_assert_eq!(value[i], v);
                prop_assert_eq!(dlogp[i], g);
                match est {
                    KlEstimator::K2 | KlEstimator::K3 => prop_assert!(value[i] >= 0.0),
                    KlEstimator::LowVarK3 => prop_assert!((0.0..=10.0).contains(&value[i])),
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let est = KlEstimator::K3;
    let fwd = |lp: &[f32], rf: &[f32]| kl_divergence(&KlInputs::new(lp, rf), est).unwrap_err();
    assert!(matches!(fwd(&[], &[]), Error::Empty { what: "logp", .. }));
    assert!(matches!(
        fwd(&[0.0; 3], &[0.0; 2]),
        Error::ShapeMismatch {
            what: "ref_logp",
            expected: 3,
            got: 2,
            ..
        }
    ));
    // -inf log-probs are refused like NaN and +inf; logp is reported before ref_logp.
    for bad in [f32::NEG_INFINITY, f32::NAN, f32::INFINITY] {
        let mut lp = vec![-1.0f32; 20_000];
        lp[17_000] = bad;
        let rf = vec![-1.0f32; 20_000];
        assert!(matches!(
            fwd(&lp, &rf),
            Error::NonFinite {
                what: "logp",
                index: 17_000,
                ..
            }
        ));
        assert!(matches!(
            fwd(&rf, &lp),
            Error::NonFinite {
                what: "ref_logp",
                index: 17_000,
                ..
            }
        ));
    }
    let ok = [-1.0f32; 4];
    let bwd = |g: &[f32]| kl_divergence_backward(&KlInputs::new(&ok, &ok), est, g).unwrap_err();
    assert!(matches!(
        bwd(&[1.0; 3]),
        Error::ShapeMismatch { what: "grad", .. }
    ));
    assert!(matches!(
        bwd(&[1.0, 1.0, f32::NAN, 1.0]),
        Error::NonFinite {
            what: "grad",
            index: 2,
            ..
        }
    ));
    let mut nan_ref = ok;
    nan_ref[1] = f32::NAN;
    assert!(matches!(
        kl_divergence_backward(&KlInputs::new(&ok, &nan_ref), est, &ok).unwrap_err(),
        Error::NonFinite {
            what: "ref_logp",
            index: 1,
            ..
        }
    ));
}
