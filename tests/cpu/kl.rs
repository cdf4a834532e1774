//! KL estimators against an f64 reference, the backward against finite
//! differences, verl's clamps, TRL's and verl's own code (the committed
//! fixture), the flow into the policy loss, properties, and every bad input.

use crate::common::reference::{kl_grad_ref, kl_grad_source, kl_value_ref};
use crate::common::{assert_close, finite_diff, fixture, fixture_f64s, widen, Rng, KL_ESTIMATORS};
use grpo_kernels::{kl_divergence, kl_divergence_backward, Error, KlEstimator, KlInputs};
use proptest::prelude::*;

const ESTIMATORS: [KlEstimator; 8] = KL_ESTIMATORS;

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
            let want: Vec<f64> = lp
                .iter()
                .zip(&rf)
                .map(|(l, r)| kl_value_ref(est, r - l))
                .collect();
            // k3 ~ d^2/2 is accurate relative to itself, also for d ~ 1e-6.
            assert_close(&format!("{est:?} n={n}"), &got, &want, 1e-30, 4e-6);
            // The backward over as many parallel blocks: `grad dkl/dlogp`.
            let grad: Vec<f32> = Rng::new(40 + i as u64).normals(n, 1.0);
            let got = kl_divergence_backward(&KlInputs::new(&logp, &ref_logp), est, &grad).unwrap();
            let want: Vec<f64> = lp
                .iter()
                .zip(&rf)
                .zip(&grad)
                .map(|((l, r), &g)| g as f64 * kl_grad_ref(est, r - l))
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
            // Differences of the value, or of k2's for a straight-through
            // estimator (its gradient by definition).
            let source = kl_grad_source(est);
            let loss = |lp: &[f64], rf: &[f64]| -> f64 {
                lp.iter()
                    .zip(rf)
                    .zip(&g)
                    .map(|((l, r), g)| g * kl_value_ref(source, r - l))
                    .sum()
            };
            let mut want = finite_diff(&lp, 1e-6, |x| loss(x, &rf));
            let mut want_ref = finite_diff(&rf, 1e-6, |x| loss(&lp, x));
            if source == KlEstimator::Abs {
                // A step across |d|'s kink at 0 differences both sides:
                // those tokens get torch's sign (the other tests check it).
                for t in 0..n {
                    let d = rf[t] - lp[t];
                    if d.abs() <= 2e-6 {
                        want[t] = g[t] * kl_grad_ref(est, d);
                        want_ref[t] = -want[t];
                    }
                }
            }
            assert_close(&format!("dlogp {est:?} n={n}"), &got, &want, 1e-8, 1e-5);
            // Every estimator depends on ref - logp alone.
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
    // verl's `low_var_kl+`: the same values, k2's gradient -d throughout.
    let st = KlEstimator::LowVarK3StraightThrough;
    assert_eq!(kl_divergence(&input, st).unwrap(), value);
    let grad = kl_divergence_backward(&input, st, &vec![1.0; ds.len()]).unwrap();
    for (i, &g) in grad.iter().enumerate() {
        assert_eq!(g, logp[i] - ref_logp[i]);
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
                    KlEstimator::K2 | KlEstimator::K3 | KlEstimator::Abs | KlEstimator::AbsStraightThrough => {
                        prop_assert!(value[i] >= 0.0)
                    }
                    KlEstimator::LowVarK3 | KlEstimator::LowVarK3StraightThrough => {
                        prop_assert!((0.0..=10.0).contains(&value[i]))
                    }
                    KlEstimator::K1 | KlEstimator::K1StraightThrough => {}
                }
            }
        }
    }
}

#[test]
fn abs_gradient_is_torch_sign_with_zero_at_zero() {
    // d = ref - logp = +0, -0 (logp = ref), tiny and ordinary of both signs.
    let logp = [-1.0f32, -0.0, -1.0, -1.0, -2.0, -1.0];
    let ref_logp = [-1.0f32, 0.0, -1.0 + 1e-7, -1.0 - 1e-7, -1.0, -3.0];
    let input = KlInputs::new(&logp, &ref_logp);
    let grad = kl_divergence_backward(&input, KlEstimator::Abs, &[1.0; 6]).unwrap();
    assert_eq!(grad, [0.0, 0.0, -1.0, 1.0, -1.0, 1.0]);
    let value = kl_divergence(&input, KlEstimator::Abs).unwrap();
    for i in 0..6 {
        assert_eq!(value[i], (logp[i] - ref_logp[i]).abs());
    }
}

/// verl's `kl_penalty` (commit b178a3cd) for every estimator name and TRL's
/// KL term, values and torch autograd gradients, from
/// `tests/fixtures/kl_reference.json`.
#[test]
fn every_verl_and_trl_estimator_matches_their_code() {
    let fx = fixture("kl_reference.json");
    let logp: Vec<f32> = fixture_f64s(&fx["logp"]).iter().map(|&x| x as f32).collect();
    let ref_logp: Vec<f32> = fixture_f64s(&fx["ref_logp"]).iter().map(|&x| x as f32).collect();
    let input = KlInputs::new(&logp, &ref_logp);
    let ones = vec![1.0f32; logp.len()];
    let check = |what: &str, est: KlEstimator, case: &serde_json::Value| {
        let value = kl_divergence(&input, est).unwrap();
        let dlogp = kl_divergence_backward(&input, est, &ones).unwrap();
        assert_close(
            &format!("{what} value"),
            &value,
            &fixture_f64s(&case["value"]),
            1e-9,
            1e-5,
        );
        assert_close(
            &format!("{what} dlogp"),
            &dlogp,
            &fixture_f64s(&case["dlogp"]),
            1e-9,
            1e-5,
        );
    };
    let cases = fx["verl"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let est = KlEstimator::from_verl_name(name).unwrap();
        // verl at b178a3cd raises for exactly the `+` names (see the module docs).
        assert_eq!(
            case["verl_raises"].as_bool(),
            Some(est.is_straight_through()),
            "{name}"
        );
        check(&format!("verl {name} = {est:?}"), est, case);
    }
    check("TRL beta KL", KlEstimator::K3, &fx["trl"]);
    assert_eq!(KlEstimator::from_verl_name("full"), None);
    assert_eq!(KlEstimator::from_verl_name("k2+"), Some(KlEstimator::K2));
}

/// The policy loss takes the new estimators through `PolicyLossConfig::kl`:
/// its reported mean KL is the estimator's value, its KL gradient the
/// estimator's (k2's for the straight-through ones).
#[test]
fn new_estimators_flow_into_the_policy_loss() {
    use grpo_kernels::{
        policy_loss, policy_loss_backward, Advantage, PolicyLossConfig, PolicyLossInputs, SeqLayout,
    };
    let mut rng = Rng::new(77);
    let (seqs, len) = (3, 7);
    let logp: Vec<f32> = (0..seqs * len).map(|_| rng.range(-4.0, -0.1) as f32).collect();
    let ref_logp: Vec<f32> = logp.iter().map(|&l| l + rng.range(-3.0, 3.0) as f32).collect();
    let adv = [0.5f32, -1.0, 0.0];
    let run = |kl: KlEstimator, beta: f32| {
        let layout = SeqLayout::Padded {
            batch: seqs,
            seq_len: len,
        };
        let inputs =
            PolicyLossInputs::new(&logp, Advantage::PerSequence(&adv[..]), layout).with_ref(&ref_logp);
        let cfg = PolicyLossConfig {
            beta,
            kl,
            ..PolicyLossConfig::default()
        };
        let out = policy_loss(&inputs, &cfg).unwrap();
        (
            out.stats().kl_mean,
            policy_loss_backward(&inputs, &cfg, 1.0, None).unwrap(),
        )
    };
    let (_, pg_only) = run(KlEstimator::K3, 0.0);
    for est in KL_ESTIMATORS {
        let (kl_mean, dlogp) = run(est, 0.5);
        let d: Vec<f64> = logp
            .iter()
            .zip(&ref_logp)
            .map(|(&l, &r)| (r - l) as f64)
            .collect();
        let want_mean = d.iter().map(|&d| kl_value_ref(est, d)).sum::<f64>() / d.len() as f64;
        assert!(
            (kl_mean as f64 - want_mean).abs() <= 1e-5 * want_mean.abs().max(1.0),
            "{est:?}"
        );
        // Seq-mean of token-means: each token's KL gradient is beta / (S len).
        let want: Vec<f64> = (0..d.len())
            .map(|t| pg_only[t] as f64 + 0.5 / (seqs * len) as f64 * kl_grad_ref(est, d[t]))
            .collect();
        assert_close(&format!("policy loss dlogp {est:?}"), &dlogp, &want, 1e-6, 1e-5);
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
