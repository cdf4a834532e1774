//! KL estimators through candle: the raw op's values, its refusals, and
//! gradients in both inputs against finite differences of an f64
//! reference.

use crate::common::reference::{kl_grad_source, kl_ref};
use crate::common::tensors::{f64s, to32, var, CPU};
use crate::common::{
    assert_close, assert_typed_error, finite_diff, fixture, fixture_f64s, Rng, KL_ESTIMATORS,
};
use candle_core::{DType, Device, Tensor};
use grpo_kernels::candle::kl_divergence;
use grpo_kernels::KlEstimator;

#[test]
fn kl_equals_raw_op_and_rejects_bad_inputs() {
    use grpo_kernels::candle::kl_divergence as candle_kl;
    use grpo_kernels::{kl_divergence, KlEstimator, KlInputs};
    let mut rng = Rng::new(32);
    let logp: Vec<f32> = (0..37).map(|_| rng.range(-5.0, -0.1) as f32).collect();
    let reference: Vec<f32> = logp.iter().map(|&l| l + rng.range(-1.0, 1.0) as f32).collect();
    let (a, b) = (
        Tensor::new(logp.as_slice(), &Device::Cpu).unwrap(),
        Tensor::new(reference.as_slice(), &Device::Cpu).unwrap(),
    );
    for est in KL_ESTIMATORS {
        let want = kl_divergence(&KlInputs::new(&logp, &reference), est).unwrap();
        assert_eq!(to32(&candle_kl(&a, &b, est).unwrap()), want);
    }
    // The candle layer's own checks are this crate's typed errors too.
    let unsupported = |reason: &str| grpo_kernels::Error::Unsupported {
        op: "kl_divergence",
        reason: reason.into(),
    };
    assert_typed_error(
        candle_kl(&a, &b.narrow(0, 0, 36).unwrap(), KlEstimator::K3),
        unsupported("logp [37] and ref_logp [36] must have one shape"),
    );
    assert_typed_error(
        candle_kl(&a.to_dtype(DType::BF16).unwrap(), &b, KlEstimator::K3),
        unsupported("`logp` must be F32, got BF16"),
    );
    let nan = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
    assert!(candle_kl(&nan, &nan, KlEstimator::K3).is_err());
}

#[test]
fn kl_gradients_match_finite_differences_in_both_inputs() {
    let mut rng = Rng::new(21);
    let n = 23;
    for est in KL_ESTIMATORS {
        // |d| < 2: inside LowVarK3's clamps, where it is k3.
        let logp: Vec<f32> = (0..n).map(|_| rng.range(-4.0, -0.5) as f32).collect();
        let ref_logp: Vec<f32> = logp.iter().map(|&l| l + rng.range(-1.5, 1.5) as f32).collect();
        let w: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let (lv, rv) = (var(&logp, &[n]), var(&ref_logp, &[n]));
        let wt = Tensor::new(w.as_slice(), &CPU).unwrap();
        let kl = kl_divergence(&lv, &rv, est).unwrap();
        let grads = kl.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();

        // Straight-through estimators: differences of k2, their gradient.
        let source = kl_grad_source(est);
        let objective = |lp: &[f64], rf: &[f64]| -> f64 {
            (0..n).map(|t| w[t] as f64 * kl_ref(source, rf[t] - lp[t])).sum()
        };
        let (lp64, rf64) = (f64s(&logp), f64s(&ref_logp));
        let want_logp = finite_diff(&lp64, 1e-6, |x| objective(x, &rf64));
        let want_ref = finite_diff(&rf64, 1e-6, |x| objective(&lp64, x));
        let got_logp = to32(grads.get(&lv).unwrap());
        let got_ref = to32(grads.get(&rv).unwrap());
        assert_close(&format!("dkl/dlogp {est:?}"), &got_logp, &want_logp, 1e-5, 1e-4);
        assert_close(&format!("dkl/dref {est:?}"), &got_ref, &want_ref, 1e-5, 1e-4);
    }
}

/// verl's `kl_penalty` for every name and TRL's KL term
/// (`tests/fixtures/kl_reference.json`): candle's values and autograd
/// gradients equal torch's.
#[test]
fn kl_through_candle_autograd_matches_verl_and_trl() {
    let fx = fixture("kl_reference.json");
    let logp: Vec<f32> = fixture_f64s(&fx["logp"]).iter().map(|&x| x as f32).collect();
    let ref_logp: Vec<f32> = fixture_f64s(&fx["ref_logp"]).iter().map(|&x| x as f32).collect();
    let n = logp.len();
    let mut cases: Vec<(KlEstimator, &serde_json::Value)> = fx["verl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                KlEstimator::from_verl_name(c["name"].as_str().unwrap()).unwrap(),
                c,
            )
        })
        .collect();
    cases.push((KlEstimator::K3, &fx["trl"]));
    for (est, case) in cases {
        let lv = var(&logp, &[n]);
        let rf = Tensor::new(ref_logp.as_slice(), &CPU).unwrap();
        let kl = kl_divergence(&lv, &rf, est).unwrap();
        let grads = kl.sum_all().unwrap().backward().unwrap();
        assert_close(
            &format!("{est:?} value"),
            &to32(&kl),
            &fixture_f64s(&case["value"]),
            1e-9,
            1e-5,
        );
        let dlogp = to32(grads.get(&lv).unwrap());
        assert_close(
            &format!("{est:?} dlogp"),
            &dlogp,
            &fixture_f64s(&case["dlogp"]),
            1e-9,
            1e-5,
        );
    }
}
