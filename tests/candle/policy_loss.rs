//! The clipped policy loss through candle: the same values as the raw op,
//! gradients through candle's autograd equal to those of the same math
//! composed from candle tensor ops and to the raw backward, against finite
//! differences of an f64 reference, and its refusals.

use crate::common::composed::composed_grpo;
use crate::common::reference::kl_ref;
use crate::common::tensors::{f64s, to32, to64, var, CPU};
use crate::common::{assert_close, finite_diff, Rng};
use candle_core::{DType, Device, Tensor, Var};
use grpo_kernels::candle::{policy_loss, PolicyLossTensors};
use grpo_kernels::{Advantage, Aggregation, KlEstimator, PolicyLossConfig, PolicyLossInputs, SeqLayout};

#[test]
fn policy_loss_equals_raw_op_and_composed_candle_math() {
    let mut rng = Rng::new(11);
    let dev = Device::Cpu;
    let (s, t) = (5, 23);
    let n = s * t;
    let logp: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.3 - 2.0) as f32).collect();
    let old: Vec<f32> = logp.iter().map(|&x| x + (rng.normal() * 0.2) as f32).collect();
    let reference: Vec<f32> = logp.iter().map(|&x| x + (rng.normal() * 0.2) as f32).collect();
    let adv: Vec<f32> = (0..s).map(|_| rng.normal() as f32).collect();
    let mask: Vec<u8> = (0..n).map(|i| (i % t < t - (i / t) * 3) as u8).collect();
    let cfg = PolicyLossConfig {
        beta: 0.04,
        kl: KlEstimator::K3,
        aggregation: Aggregation::SeqMeanTokenMean,
        ..Default::default()
    };

    let raw = grpo_kernels::policy_loss(
        &PolicyLossInputs::new(
            &logp,
            Advantage::per_sequence(&adv),
            SeqLayout::Padded { batch: s, seq_len: t },
        )
        .with_old(&old)
        .with_ref(&reference)
        .with_mask(&mask),
        &cfg,
    )
    .unwrap();

    let logp_t = Var::from_tensor(&Tensor::from_vec(logp, (s, t), &dev).unwrap()).unwrap();
    let old_t = Tensor::from_vec(old, (s, t), &dev).unwrap();
    let ref_t = Tensor::from_vec(reference, (s, t), &dev).unwrap();
    let adv_t = Tensor::from_vec(adv, s, &dev).unwrap();
    let mask_t = Tensor::from_vec(mask, (s, t), &dev).unwrap();
    let inputs = PolicyLossTensors {
        old_logp: Some(&old_t),
        ref_logp: Some(&ref_t),
        advantages: &adv_t,
        mask: Some(&mask_t),
        cu_seqlens: None,
        pg_weights: None,
    };
    let ours = policy_loss(&logp_t, &inputs, &cfg).unwrap();
    assert_eq!(ours.loss.to_scalar::<f32>().unwrap(), raw.loss());
    assert_eq!(to32(&ours.per_token), raw.per_token);
    assert_eq!(ours.stats, raw.stats());

    let composed = composed_grpo(
        &logp_t,
        &old_t,
        &ref_t,
        &adv_t,
        &mask_t.to_dtype(DType::F32).unwrap(),
        &cfg,
    )
    .unwrap();
    let want_loss = composed.to_scalar::<f32>().unwrap() as f64;
    assert_close("loss", &[raw.loss()], &[want_loss], 1e-6, 1e-5);
    let g_ours = ours.loss.backward().unwrap();
    let g_composed = composed.backward().unwrap();
    assert_close(
        "dlogp",
        &to32(g_ours.get(&logp_t).unwrap()),
        &to64(g_composed.get(&logp_t).unwrap()),
        1e-6,
        1e-4,
    );
}

#[test]
fn policy_loss_packed_per_token_advantages_gradient_matches_raw_backward() {
    let mut rng = Rng::new(12);
    let dev = Device::Cpu;
    let cu: Vec<u32> = vec![0, 4, 4, 11, 20];
    let n = 20;
    let logp: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.3 - 1.0) as f32).collect();
    let adv: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let cfg = PolicyLossConfig {
        beta: 0.0,
        aggregation: Aggregation::TokenMean {
            normalizer: Some(64.0),
        },
        ..Default::default()
    };
    let inputs = PolicyLossInputs::new(
        &logp,
        Advantage::per_token(&adv),
        SeqLayout::Packed { cu_seqlens: &cu },
    );
    // d(3 loss + sum 2 l_t)/dlogp, through candle and raw.
    let want = grpo_kernels::policy_loss_backward(&inputs, &cfg, 3.0, Some(&vec![2.0; n])).unwrap();
    let logp_t = Var::from_tensor(&Tensor::from_vec(logp, n, &dev).unwrap()).unwrap();
    let adv_t = Tensor::from_vec(adv, n, &dev).unwrap();
    let cu_t = Tensor::from_vec(cu, 5, &dev).unwrap();
    let out = policy_loss(
        &logp_t,
        &PolicyLossTensors {
            old_logp: None,
            ref_logp: None,
            advantages: &adv_t,
            mask: None,
            cu_seqlens: Some(&cu_t),
            pg_weights: None,
        },
        &cfg,
    )
    .unwrap();
    let total = ((out.loss * 3.0).unwrap() + (out.per_token.sum_all().unwrap() * 2.0).unwrap()).unwrap();
    let got = total.backward().unwrap();
    assert_eq!(to32(got.get(&logp_t).unwrap()), want);
}

#[test]
fn policy_loss_rejects_bad_shapes_and_dtypes() {
    let dev = Device::Cpu;
    let logp = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let adv = Tensor::zeros(2, DType::F32, &dev).unwrap();
    let base = PolicyLossTensors {
        old_logp: None,
        ref_logp: None,
        advantages: &adv,
        mask: None,
        cu_seqlens: None,
        pg_weights: None,
    };
    let cfg = PolicyLossConfig {
        beta: 0.0,
        ..Default::default()
    };
    let err = |r: candle_core::Result<_>| {
        r.map(|_: grpo_kernels::candle::PolicyLossOutput| ())
            .unwrap_err()
            .to_string()
    };
    assert!(err(policy_loss(&logp.flatten_all().unwrap(), &base, &cfg)).contains("padded"));
    let bad_adv = Tensor::zeros(3, DType::F32, &dev).unwrap();
    assert!(err(policy_loss(
        &logp,
        &PolicyLossTensors {
            advantages: &bad_adv,
            ..base
        },
        &cfg
    ))
    .contains("advantages"));
    let f64_mask = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
    assert!(err(policy_loss(
        &logp,
        &PolicyLossTensors {
            mask: Some(&f64_mask),
            ..base
        },
        &cfg
    ))
    .contains("mask"));
    let nan = Tensor::new(&[[0.0f32, f32::NAN, 0.0], [0.0, 0.0, 0.0]], &dev).unwrap();
    let nan_err = err(policy_loss(&nan, &base, &cfg));
    assert!(nan_err.contains("`logp` is not finite (NaN, infinity or beyond its type's range) at index 1"));
}

#[test]
fn policy_loss_gradient_matches_finite_differences() {
    let mut rng = Rng::new(22);
    let (s, t) = (3usize, 5usize);
    let n = s * t;
    let logp: Vec<f32> = (0..n).map(|_| rng.range(-3.0, -0.5) as f32).collect();
    // Log-ratios spread across both clip bounds (ln 0.8 = -0.22, ln 1.28 =
    // 0.25), none within 0.02 of a kink where finite differences straddle it.
    let old: Vec<f32> = logp
        .iter()
        .map(|&l| {
            let bounds = [0.8f64.ln(), 1.28f64.ln()];
            let mut r = rng.range(-0.5, 0.5);
            while bounds.iter().any(|b| (r - b).abs() < 0.02) {
                r = rng.range(-0.5, 0.5);
            }
            l - r as f32
        })
        .collect();
    let ref_logp: Vec<f32> = logp.iter().map(|&l| l + rng.range(-0.3, 0.3) as f32).collect();
    let adv: Vec<f32> = vec![1.3, -0.7, 0.4];
    let mask: Vec<u8> = (0..n).map(|i| (i % 7 != 3) as u8).collect();
    let w: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let cfg = PolicyLossConfig {
        eps_low: 0.2,
        eps_high: 0.28,
        beta: 0.04,
        kl: KlEstimator::K3,
        ..PolicyLossConfig::default()
    };

    let lv = var(&logp, &[s, t]);
    let tensor = |x: &[f32]| Tensor::from_vec(x.to_vec(), (s, t), &CPU).unwrap();
    let (old_t, ref_t, w_t) = (tensor(&old), tensor(&ref_logp), tensor(&w));
    let adv_t = Tensor::new(adv.as_slice(), &CPU).unwrap();
    let mask_t = Tensor::from_vec(mask.clone(), (s, t), &CPU).unwrap();
    let inputs = PolicyLossTensors {
        old_logp: Some(&old_t),
        ref_logp: Some(&ref_t),
        advantages: &adv_t,
        mask: Some(&mask_t),
        cu_seqlens: None,
        pg_weights: None,
    };
    let out = policy_loss(&lv, &inputs, &cfg).unwrap();
    // The loss and a weighted sum of the per-token terms: both outputs' backward.
    let objective = (&out.loss + out.per_token.mul(&w_t).unwrap().sum_all().unwrap()).unwrap();
    let grads = objective.backward().unwrap();

    // f64 reference: GRPO's clipped surrogate plus beta k3, sequence-mean of token-means.
    let reference = |live: &[f64]| -> f64 {
        let (lo, hi) = (1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64);
        let mut total = 0.0;
        for (q, &a) in adv.iter().enumerate() {
            let a = a as f64;
            let act: Vec<usize> = (q * t..(q + 1) * t).filter(|&i| mask[i] != 0).collect();
            for &i in &act {
                let r = (live[i] - old[i] as f64).exp();
                let pg = -(r * a).min(r.clamp(lo, hi) * a);
                let l = pg + cfg.beta as f64 * kl_ref(KlEstimator::K3, ref_logp[i] as f64 - live[i]);
                total += l / (s as f64 * act.len() as f64) + w[i] as f64 * l;
            }
        }
        total
    };
    let want = finite_diff(&f64s(&logp), 1e-6, reference);
    assert_close(
        "policy loss dlogp",
        &to32(grads.get(&lv).unwrap()),
        &want,
        1e-5,
        1e-4,
    );
}

/// TRL 1.16's `_compute_loss` and verl's losses
/// (tests/fixtures/policy_loss_reference.py) through candle's autograd: the
/// loss, its gradient in `logp` and the statistics, every objective and
/// option, each case also with NaN in the padding.
#[test]
fn matches_trl_and_verl_fixtures_through_autograd() {
    use crate::common::policy_loss_fixture::{all_cases, FixtureCase};
    let dev = Device::Cpu;
    for c in all_cases() {
        let shape = (c.batch, c.seq_len);
        let logp = Var::from_tensor(&Tensor::from_vec(c.logp.clone(), shape, &dev).unwrap()).unwrap();
        let old = Tensor::from_vec(c.old_logp.clone(), shape, &dev).unwrap();
        let reference = c
            .ref_logp
            .clone()
            .map(|r| Tensor::from_vec(r, shape, &dev).unwrap());
        let adv = if c.per_token_advantages {
            Tensor::from_vec(c.advantages.clone(), shape, &dev).unwrap()
        } else {
            Tensor::from_vec(c.advantages.clone(), c.batch, &dev).unwrap()
        };
        let mask = Tensor::from_vec(c.mask.clone(), shape, &dev).unwrap();
        let weights = c
            .pg_weights
            .clone()
            .map(|w| Tensor::from_vec(w, shape, &dev).unwrap());
        let inputs = PolicyLossTensors {
            old_logp: Some(&old),
            ref_logp: reference.as_ref(),
            advantages: &adv,
            mask: Some(&mask),
            pg_weights: weights.as_ref(),
            cu_seqlens: None,
        };
        let out = policy_loss(&logp, &inputs, &c.cfg).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let loss = out.loss.to_scalar::<f32>().unwrap();
        assert_close(&format!("{} loss", c.name), &[loss], &[c.loss], 1e-6, 1e-5);
        for (name, want) in &c.stats {
            let got = FixtureCase::stat(&out.stats, name);
            assert_close(&format!("{} {name}", c.name), &[got], &[*want], 1e-6, 1e-5);
        }
        let grads = out.loss.backward().unwrap();
        let dlogp = to32(&grads.get(&logp).unwrap().flatten_all().unwrap());
        assert_close(&format!("{} dlogp", c.name), &dlogp, &c.dlogp, 1e-7, 1e-5);
    }
}

/// The new objectives with TRL's bias-corrected KL and `pg_weights`
/// through candle's autograd (both outputs' backward) against finite
/// differences of an f64 reference that holds the detached parts (CISPO's
/// and VESPO's weights, `pg_weights`) at their values.
#[test]
fn objectives_backward_matches_finite_differences() {
    use grpo_kernels::PolicyObjective;
    let mut rng = Rng::new(29);
    let (s, t) = (3, 6);
    let n = s * t;
    let logp: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.3 - 1.5) as f32).collect();
    let old: Vec<f32> = logp.iter().map(|&l| l - rng.range(-0.4, 0.4) as f32).collect();
    let ref_logp: Vec<f32> = logp.iter().map(|&l| l + rng.range(-0.3, 0.3) as f32).collect();
    let adv: Vec<f32> = vec![1.3, -0.7, 0.4];
    let mask: Vec<u8> = (0..n).map(|i| (i % 5 != 3) as u8).collect();
    let pw: Vec<f32> = (0..n).map(|_| rng.range(0.0, 1.5) as f32).collect();
    let w: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let tensor = |x: &[f32]| Tensor::from_vec(x.to_vec(), (s, t), &CPU).unwrap();
    let (old_t, ref_t, pw_t, w_t) = (tensor(&old), tensor(&ref_logp), tensor(&pw), tensor(&w));
    let adv_t = Tensor::new(adv.as_slice(), &CPU).unwrap();
    let mask_t = Tensor::from_vec(mask.clone(), (s, t), &CPU).unwrap();
    let inputs = PolicyLossTensors {
        old_logp: Some(&old_t),
        ref_logp: Some(&ref_t),
        advantages: &adv_t,
        mask: Some(&mask_t),
        pg_weights: Some(&pw_t),
        cu_seqlens: None,
    };
    for objective in [
        PolicyObjective::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05,
        },
        PolicyObjective::Cispo {
            min_ratio: 0.0,
            max_ratio: 1.1,
        },
        PolicyObjective::Vespo {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        },
    ] {
        let cfg = PolicyLossConfig {
            objective,
            beta: 0.04,
            kl: KlEstimator::K3,
            kl_bias_correction: true,
            log_ratio_clamp: f32::INFINITY,
            aggregation: Aggregation::TokenMean { normalizer: None },
            ..PolicyLossConfig::default()
        };
        let lv = var(&logp, &[s, t]);
        let out = policy_loss(&lv, &inputs, &cfg).unwrap();
        let total = (&out.loss + out.per_token.mul(&w_t).unwrap().sum_all().unwrap()).unwrap();
        let grads = total.backward().unwrap();

        let tokens = mask.iter().filter(|&&m| m != 0).count() as f64;
        let lr0: Vec<f64> = (0..n).map(|i| logp[i] as f64 - old[i] as f64).collect();
        let reference = |live: &[f64]| -> f64 {
            let mut sum = 0.0;
            for (q, &a) in adv.iter().enumerate() {
                let a = a as f64;
                let act: Vec<usize> = (q * t..(q + 1) * t).filter(|&i| mask[i] != 0).collect();
                let log_w = act.iter().map(|&i| lr0[i]).sum::<f64>().clamp(1e-8f64.ln(), 20.0);
                for &i in &act {
                    let r = (live[i] - old[i] as f64).exp();
                    let pg = match objective {
                        PolicyObjective::Sapo { tau_pos, tau_neg } => {
                            let tau = if a > 0.0 { tau_pos } else { tau_neg } as f64;
                            -4.0 / tau * a / (1.0 + (-tau * (r - 1.0)).exp())
                        }
                        PolicyObjective::Cispo { max_ratio, .. } => {
                            -lr0[i].exp().min(max_ratio as f64) * a * live[i]
                        }
                        _ => {
                            let (k, l) = if a >= 0.0 { (2.0, 3.0) } else { (3.0, 2.0) };
                            -(l + k * log_w - l * log_w.exp()).exp() * a * live[i]
                        }
                    };
                    let kl = kl_ref(KlEstimator::K3, ref_logp[i] as f64 - live[i]) * r;
                    let l = pw[i] as f64 * pg + cfg.beta as f64 * kl;
                    sum += l / tokens + w[i] as f64 * l;
                }
            }
            sum
        };
        let want = finite_diff(&f64s(&logp), 1e-6, reference);
        assert_close(
            &format!("{objective:?} dlogp"),
            &to32(grads.get(&lv).unwrap()),
            &want,
            1e-5,
            1e-4,
        );
    }
}
