//! The corrections family (TRL's sampler importance weights, OPSM, the
//! high-entropy mask, truncated completions) against TRL's own outputs
//! (`tests/fixtures/corrections_trl.json`) and against naive f64 references
//! on random padded and packed batches; `_into` forms multiply into a
//! buffer; bad inputs are in `tests/common/bad_input.rs`.

use crate::common::corrections::{
    batch, entropy_ref, f32s, fixture, is_config, is_ref, opsm_ref, u8s, Layout, MODES,
};
use crate::common::{assert_close, Rng};
use grpo_kernels::{
    high_entropy_mask, high_entropy_mask_into, mask_truncated_completions, off_policy_mask,
    off_policy_mask_into, sampler_is_weights, sampler_is_weights_into, Error, IsMode, SamplerIsConfig,
    SamplerLogps,
};

const RTOL: f64 = 1e-5;

fn logps<'a>(logp: &'a [f32], sampler: &'a [f32], mask: &'a [u8], layout: &'a Layout) -> SamplerLogps<'a> {
    SamplerLogps {
        logp,
        sampler_logp: sampler,
        mask: Some(mask),
        layout: layout.get(),
    }
}

fn f64s(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| x as f64).collect()
}

#[test]
fn sampler_is_weights_match_trl() {
    let fx = fixture();
    let cases = fx["sampler_is"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let layout = Layout::from_json(&c["layout"]);
        let (old, sampler, mask) = (f32s(&c["old_logp"]), f32s(&c["sampler_logp"]), u8s(&c["mask"]));
        let out = sampler_is_weights(&logps(&old, &sampler, &mask, &layout), &is_config(c)).unwrap();
        assert_close(name, &out.weights, &f64s(&f32s(&c["weights"])), 0.0, RTOL);
        let s = &out.stats;
        let got = [
            s.ratio_min,
            s.ratio_mean,
            s.ratio_max,
            s.logp_diff_mean,
            s.logp_diff_max,
        ];
        let want: Vec<f64> = c["stats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_close(&format!("{name}: stats"), &got, &want, 1e-7, RTOL);
    }
}

#[test]
fn off_policy_mask_matches_trl() {
    let fx = fixture();
    let cases = fx["off_policy"].as_array().unwrap();
    let mut dropped = 0;
    for c in cases {
        let layout = Layout::from_json(&c["layout"]);
        let (logp, sampler, mask) = (f32s(&c["logp"]), f32s(&c["sampler_logp"]), u8s(&c["mask"]));
        let t = c["threshold"].as_f64().unwrap() as f32;
        let w = off_policy_mask(
            &logps(&logp, &sampler, &mask, &layout),
            &f32s(&c["advantages"]),
            t,
        )
        .unwrap();
        assert_eq!(w, f32s(&c["weights"]), "{}", c["name"]);
        dropped += w.iter().filter(|&&x| x == 0.0).count();
    }
    assert!(dropped > 0, "the fixture drops some sequence");
}

#[test]
fn high_entropy_mask_matches_trl_exactly() {
    let fx = fixture();
    for c in fx["high_entropy"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let (h, mask) = (f32s(&c["entropy"]), u8s(&c["mask"]));
        let (w, t) = high_entropy_mask(&h, Some(&mask), c["top_quantile"].as_f64().unwrap()).unwrap();
        assert_eq!(w, f32s(&c["weights"]), "{name}");
        let want = c["threshold"].as_f64().map(|x| x as f32);
        assert_eq!(
            t.map(f32::to_bits),
            want.map(f32::to_bits),
            "{name}: threshold bit for bit"
        );
    }
}

#[test]
fn mask_truncated_completions_matches_trl() {
    let fx = fixture();
    for c in fx["truncated"].as_array().unwrap() {
        let layout = Layout::from_json(&c["layout"]);
        let ids: Vec<i64> = c["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let stop: Vec<i64> = c["stop_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let mut mask = u8s(&c["mask"]);
        let before = mask.clone();
        let n = mask_truncated_completions(&ids, &layout.get(), &stop, &mut mask).unwrap();
        assert_eq!(mask, u8s(&c["want_mask"]), "{}", c["name"]);
        let changed = layout
            .ranges()
            .into_iter()
            .filter(|r| mask[r.clone()] != before[r.clone()])
            .count();
        assert_eq!(n, changed);
    }
}

#[test]
fn every_op_matches_an_f64_reference_on_random_batches() {
    let mut rng = Rng::new(2020);
    for i in 0..120 {
        let b = batch(&mut rng, i % 2 == 1);
        let inputs = logps(&b.logp, &b.sampler, &b.mask, &b.layout);
        for (j, mode) in MODES.into_iter().enumerate() {
            let bounds = [(None, Some(3.0)), (Some(0.6), Some(1.8)), (Some(0.9), None)];
            let (clip_min, clip_max) = bounds[(i + j) % 3];
            let cfg = SamplerIsConfig {
                mode,
                clip_min,
                clip_max,
            };
            let w = sampler_is_weights(&inputs, &cfg).unwrap().weights;
            let want = is_ref(&b.logp, &b.sampler, &b.mask, &b.layout, &cfg);
            assert_close(&format!("batch {i}, {mode:?}"), &w, &want, 1e-30, 1e-5);
        }
        let delta = (0.05 * rng.normal()) as f32;
        let w = off_policy_mask(&inputs, &b.adv, delta).unwrap();
        assert_eq!(
            f64s(&w),
            opsm_ref(&b.logp, &b.sampler, &b.mask, &b.layout, &b.adv, delta),
            "batch {i}: OPSM"
        );
        for rho in [0.0, 0.2, 0.5, 0.77, 1.0] {
            let (w, t) = high_entropy_mask(&b.entropy, Some(&b.mask), rho).unwrap();
            let (want, want_t) = entropy_ref(&b.entropy, &b.mask, rho);
            assert_eq!(f64s(&w), want, "batch {i}: entropy mask, rho {rho}");
            if let (Some(t), Some(want_t)) = (t, want_t) {
                assert!(
                    (t as f64 - want_t).abs() <= 1e-6 * want_t.abs().max(1.0),
                    "{t} vs {want_t}"
                );
            }
            assert_eq!(t.is_some(), want_t.is_some());
        }
    }
}

#[test]
fn into_forms_multiply_and_compose() {
    let mut rng = Rng::new(7);
    for packed in [false, true] {
        let b = batch(&mut rng, packed);
        let n = b.logp.len();
        let inputs = logps(&b.logp, &b.sampler, &b.mask, &b.layout);
        let cfg = SamplerIsConfig {
            mode: IsMode::TokenTruncate,
            clip_min: Some(0.5),
            clip_max: Some(2.0),
        };
        let start: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
        let mut w = start.clone();
        let stats = sampler_is_weights_into(&inputs, &cfg, &mut w).unwrap();
        off_policy_mask_into(&inputs, &b.adv, 0.0, &mut w).unwrap();
        high_entropy_mask_into(&b.entropy, Some(&b.mask), 0.3, &mut w).unwrap();
        let is = sampler_is_weights(&inputs, &cfg).unwrap();
        assert_eq!(is.stats, stats);
        let opsm = off_policy_mask(&inputs, &b.adv, 0.0).unwrap();
        let (ent, _) = high_entropy_mask(&b.entropy, Some(&b.mask), 0.3).unwrap();
        let want: Vec<f32> = (0..n)
            .map(|t| start[t] * is.weights[t] * opsm[t] * ent[t])
            .collect();
        assert_eq!(w, want);
    }
}

#[test]
fn edge_cases() {
    // No mask: every token counts; a one-token batch; an all-masked batch.
    let layout = Layout::Padded(1, 1);
    let (old, sampler) = ([-1.0f32], [-2.0f32]);
    let inputs = SamplerLogps {
        logp: &old[..],
        sampler_logp: &sampler[..],
        mask: None,
        layout: layout.get(),
    };
    let out = sampler_is_weights(&inputs, &SamplerIsConfig::default()).unwrap();
    assert_eq!(out.weights, [1.0f32.exp()]);
    let cfg = SamplerIsConfig {
        mode: IsMode::TokenMask,
        clip_min: None,
        clip_max: Some(2.0),
    };
    assert_eq!(sampler_is_weights(&inputs, &cfg).unwrap().weights, [0.0]);
    let (w, t) = high_entropy_mask(&[0.3, 0.1], Some(&[0, 0]), 0.2).unwrap();
    assert_eq!((w, t), (vec![0.0, 0.0], None), "no token: all zero, as TRL");
    let (w, t) = high_entropy_mask(&[0.3, 0.1, 0.2], None, 0.0).unwrap();
    assert_eq!(
        (w, t),
        (vec![1.0, 0.0, 0.0], Some(0.3)),
        "rho 0 keeps the maximum"
    );
    // Every token masked out: ratios of zero differences, statistics 0 at token level.
    let mask = [0u8];
    let inputs = SamplerLogps {
        mask: Some(&mask[..]),
        ..inputs
    };
    let out = sampler_is_weights(&inputs, &cfg).unwrap();
    assert_eq!(
        (out.weights[0], out.stats.ratio_max, out.stats.logp_diff_max),
        (1.0, 0.0, 0.0)
    );
}

#[test]
fn mask_truncated_completions_against_a_naive_reference() {
    let mut rng = Rng::new(11);
    for i in 0..60 {
        let b = batch(&mut rng, i % 2 == 0);
        let ids: Vec<u32> = (0..b.mask.len()).map(|_| rng.below(6) as u32).collect();
        let stop = [2i64, 5];
        let mut mask = b.mask.clone();
        mask_truncated_completions(&ids, &b.layout.get(), &stop, &mut mask).unwrap();
        let mut want = b.mask.clone();
        for r in b.layout.ranges() {
            let last = r.clone().filter(|&t| b.mask[t] != 0).max();
            if last.is_some_and(|t| ids[t] != 2 && ids[t] != 5) {
                r.for_each(|t| want[t] = 0);
            }
        }
        assert_eq!(mask, want, "batch {i}");
    }
}

#[test]
fn mask_truncated_completions_bad_inputs() {
    let op = "mask_truncated_completions";
    let mut mask = vec![1u8; 3];
    let e = mask_truncated_completions(&[1u32, 2], &Layout::Padded(1, 2).get(), &[2], &mut mask).unwrap_err();
    assert_eq!(
        e,
        Error::ShapeMismatch {
            op,
            what: "mask",
            expected: 2,
            got: 3
        }
    );
    let e =
        mask_truncated_completions(&[1u32, 2, 3], &Layout::Padded(2, 2).get(), &[2], &mut mask).unwrap_err();
    assert_eq!(
        e,
        Error::ShapeMismatch {
            op,
            what: "tokens (batch * seq_len)",
            expected: 4,
            got: 3
        }
    );
    let bad = Layout::Packed(vec![0, 2, 1, 3]);
    let e = mask_truncated_completions(&[1u32, 2, 3], &bad.get(), &[2], &mut mask).unwrap_err();
    assert!(matches!(e, Error::InvalidLayout { op: o, .. } if o == op), "{e}");
    assert_eq!(mask, [1, 1, 1], "untouched on error");
}

/// Finite log-probs and entropies of extreme magnitude: a typed error
/// (`weights` beyond f32 with no upper bound) or finite weights, never NaN
/// (entropies are >= 0, as entropies are).
#[test]
fn extreme_inputs_give_finite_weights_or_a_typed_error() {
    let mut rng = Rng::new(5);
    let big = |rng: &mut Rng| [3e38f32, -3e38, 1e30, -1e-30, 0.0][rng.below(5)];
    for i in 0..200 {
        let mut b = batch(&mut rng, i % 2 == 0);
        for t in 0..b.logp.len() {
            if b.mask[t] != 0 {
                b.logp[t] = big(&mut rng);
                b.sampler[t] = big(&mut rng);
                b.entropy[t] = big(&mut rng).abs();
            }
        }
        let inputs = logps(&b.logp, &b.sampler, &b.mask, &b.layout);
        for mode in MODES {
            for (clip_min, clip_max) in [(None, Some(3.0)), (Some(0.5), None)] {
                let cfg = SamplerIsConfig {
                    mode,
                    clip_min,
                    clip_max,
                };
                match sampler_is_weights(&inputs, &cfg) {
                    Ok(out) => assert!(out.weights.iter().all(|w| w.is_finite() && *w >= 0.0)),
                    Err(e) => assert!(
                        clip_max.is_none() && matches!(e, Error::NonFinite { what: "weights", .. }),
                        "{e}"
                    ),
                }
            }
        }
        let w = off_policy_mask(&inputs, &b.adv, 0.1).unwrap();
        assert!(w.iter().all(|&x| x == 0.0 || x == 1.0));
        let (w, t) = high_entropy_mask(&b.entropy, Some(&b.mask), 0.3).unwrap();
        assert!(w.iter().all(|&x| x == 0.0 || x == 1.0) && t.is_none_or(f32::is_finite));
    }
}

/// One GRPO loss step with every correction on, against TRL's own
/// `_compute_loss` (`tests/fixtures/grpo_step_trl.json`, written by
/// `grpo_step_reference.py`): the sampler's importance weights
/// (`sequence_mask`, max 3), the off-policy sequence mask and the
/// high-entropy mask, multiplied into one `pg_weights` buffer by the
/// `_into` forms, then `policy_loss` with TRL's "grpo" settings (no clamp,
/// k3 KL) gives TRL's loss and d loss / d logp.
#[test]
fn corrections_into_pg_weights_equal_trl_compute_loss() {
    use grpo_kernels::{
        policy_loss, policy_loss_backward, Advantage, Aggregation, KlEstimator, PolicyLossConfig,
        PolicyLossInputs, PolicyObjective, SeqLayout,
    };
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/grpo_step_trl.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for (k, c) in cases.iter().enumerate() {
        let (b, t) = (
            c["batch"].as_u64().unwrap() as usize,
            c["seq_len"].as_u64().unwrap() as usize,
        );
        let layout = || SeqLayout::Padded { batch: b, seq_len: t };
        let (mask, logp, old, sampler) = (
            u8s(&c["mask"]),
            f32s(&c["logp"]),
            f32s(&c["old_logp"]),
            f32s(&c["sampler_logp"]),
        );
        let (reference, entropy, adv) = (f32s(&c["ref_logp"]), f32s(&c["entropy"]), f32s(&c["advantages"]));
        let num = |key: &str| c[key].as_f64().unwrap();

        let mut pg_weights = vec![1.0f32; b * t];
        let sampler_of = |logp| SamplerLogps {
            logp,
            sampler_logp: &sampler[..],
            mask: Some(&mask[..]),
            layout: layout(),
        };
        let is_cfg = SamplerIsConfig {
            mode: IsMode::SequenceMask,
            clip_min: None,
            clip_max: Some(num("is_clip_max") as f32),
        };
        sampler_is_weights_into(&sampler_of(&old[..]), &is_cfg, &mut pg_weights).unwrap();
        off_policy_mask_into(
            &sampler_of(&logp[..]),
            &adv,
            num("opsm_threshold") as f32,
            &mut pg_weights,
        )
        .unwrap();
        high_entropy_mask_into(
            &entropy,
            Some(&mask),
            num("top_entropy_quantile"),
            &mut pg_weights,
        )
        .unwrap();

        let inputs = PolicyLossInputs::new(&logp, Advantage::per_sequence(&adv), layout())
            .with_old(&old)
            .with_ref(&reference)
            .with_mask(&mask)
            .with_pg_weights(&pg_weights);
        let cfg = PolicyLossConfig {
            objective: PolicyObjective::Clip { delta: None },
            eps_low: num("eps_low") as f32,
            eps_high: num("eps_high") as f32,
            log_ratio_clamp: f32::INFINITY,
            beta: num("beta") as f32,
            kl: KlEstimator::K3,
            aggregation: Aggregation::SeqMeanTokenMean,
            ..PolicyLossConfig::default()
        };
        let out = policy_loss(&inputs, &cfg).unwrap();
        let what = format!("case {k}");
        assert_close(
            &format!("{what}: loss"),
            &[out.loss()],
            &[num("loss")],
            1e-7,
            RTOL,
        );
        let dlogp = policy_loss_backward(&inputs, &cfg, 1.0, None).unwrap();
        // TRL's gradient at padding is 0, as ours.
        let want: Vec<f64> = c["dlogp"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_close(&format!("{what}: dlogp"), &dlogp, &want, 1e-8, RTOL);
        // Every correction acts in some case: some weight is 0, some is
        // neither 0 nor 1.
        assert!(pg_weights.contains(&0.0), "{what}: no token dropped");
        assert!(
            pg_weights.iter().any(|&w| w != 0.0 && w != 1.0),
            "{what}: no importance weight"
        );
    }
}
