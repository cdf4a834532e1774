//! Group advantages against an f64 reference for every mode, degenerate
//! groups, properties, token broadcasting, and every bad input.

use crate::common::{
    assert_close, fixture, fixture_f64s, trl_case, trl_settings, verl_settings, widen, Rng, ADVANTAGE_MODES,
};
use grpo_kernels::{
    broadcast_to_tokens, group_advantages, AdvantageConfig, AdvantageMode, Error, NanRewards,
    RewardAggregation, Rewards, SeqLayout, Singletons,
};
use proptest::prelude::*;

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Standard deviation with divisor `len - 1` or `len`; 0 where that is 0.
fn std(xs: &[f64], unbiased: bool) -> f64 {
    let div = if unbiased { xs.len() - 1 } else { xs.len() };
    if div == 0 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / div as f64).sqrt()
}

/// `(advantages, rewards, group means, group stds)` in f64, straight from
/// the definitions; flat groups (and groups of one) get 0 in every
/// normalizing mode.
fn reference(values: &[f64], weights: &[f64], g: usize, mode: AdvantageMode) -> [Vec<f64>; 4] {
    let n = values.len() / weights.len();
    let r: Vec<f64> = (0..n)
        .map(|i| {
            weights
                .iter()
                .enumerate()
                .map(|(k, w)| w * values[k * n + i])
                .sum()
        })
        .collect();
    let unbiased = match mode {
        AdvantageMode::GroupNorm { unbiased, .. }
        | AdvantageMode::BatchNorm { unbiased, .. }
        | AdvantageMode::Whiten { unbiased, .. } => unbiased,
        _ => true,
    };
    let batch_std = |unbiased| std(&r, unbiased);
    let batch_std = [batch_std(false), batch_std(true)];
    let (batch_mean, batch_flat) = (mean(&r), r.iter().all(|&x| x == r[0]));
    let (mut adv, mut means, mut stds) = (vec![], vec![], vec![]);
    for group in r.chunks(g) {
        let flat = group.iter().all(|&x| x == group[0]);
        let m = if flat { group[0] } else { mean(group) };
        means.push(m);
        stds.push(if flat { 0.0 } else { std(group, unbiased) });
        for (i, &ri) in group.iter().enumerate() {
            adv.push(match mode {
                AdvantageMode::None => ri,
                AdvantageMode::Whiten { .. } if batch_flat || r.len() == 1 => 0.0,
                AdvantageMode::Whiten { eps, unbiased } => {
                    (ri - batch_mean) / (batch_std[unbiased as usize] + eps as f64)
                }
                _ if flat => 0.0,
                AdvantageMode::GroupNorm { eps, unbiased } => (ri - m) / (std(group, unbiased) + eps as f64),
                AdvantageMode::GroupMean => ri - m,
                AdvantageMode::BatchNorm { eps, unbiased } => {
                    (ri - m) / (batch_std[unbiased as usize] + eps as f64)
                }
                AdvantageMode::LeaveOneOut => {
                    let others: Vec<f64> = (0..g).filter(|&j| j != i).map(|j| group[j]).collect();
                    ri - mean(&others)
                }
            });
        }
    }
    [adv, r, means, stds]
}

/// Rewards drawn from a few levels (so some groups are flat) or continuous.
fn rewards(rng: &mut Rng, n: usize, discrete: bool) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if discrete {
                [0.0f32, 0.5, 1.0][rng.below(3)]
            } else {
                rng.normal() as f32 * 3.0 + 1.0
            }
        })
        .collect()
}

fn check(p: usize, g: usize, weights: Option<&[f32]>, discrete: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    let k = weights.map_or(1, <[f32]>::len);
    let values = rewards(&mut rng, k * p * g, discrete);
    let w64 = weights.map_or(vec![1.0], widen);
    for mode in ADVANTAGE_MODES {
        let rw = Rewards {
            values: &values[..],
            weights,
            group_size: g,
        };
        let got = group_advantages(&rw, mode).unwrap();
        let [adv, r, means, stds] = reference(&widen(&values), &w64, g, mode);
        let what = format!("{mode:?} P={p} G={g} K={k} discrete={discrete}");
        assert_close(&format!("advantages {what}"), &got.advantages, &adv, 1e-6, 1e-6);
        assert_close(&format!("rewards {what}"), &got.rewards, &r, 0.0, 1e-7);
        assert_close(&format!("group_mean {what}"), &got.group_mean, &means, 1e-7, 1e-7);
        assert_close(&format!("group_std {what}"), &got.group_std, &stds, 1e-7, 1e-6);
    }
}

#[test]
fn every_mode_matches_f64_reference() {
    let shapes = [
        (1, 1),
        (3, 1),
        (1, 2),
        (1, 5),
        (7, 5),
        (4, 8),
        (13, 3),
        (1, 64),
        (100, 16),
        (2000, 7),
    ];
    for (i, &(p, g)) in shapes.iter().enumerate() {
        for discrete in [false, true] {
            let seed = 100 + i as u64;
            check(p, g, None, discrete, seed);
            // R1-SGG's format, node and edge rewards.
            check(p, g, Some(&[1.0, 2.0, 5.0]), discrete, seed);
            check(p, g, Some(&[0.3, -1.7]), discrete, seed);
        }
    }
}

#[test]
fn a_million_rewards_match_the_reference() {
    check(131_072, 8, None, false, 7);
    check(131_072, 8, None, true, 8);
}

#[test]
fn flat_groups_and_singletons_give_exact_zeros() {
    // Group 0 holds 0.1 three times: sum / 3 != 0.1 in floating point, so
    // only the exact max == min test gives 0. Group 1 has a tiny spread
    // (adjacent f32 values), which is real and must be normalized.
    let tiny = f32::from_bits(1.0f32.to_bits() + 1);
    let values = [0.1f32, 0.1, 0.1, 1.0, tiny, 1.0];
    for mode in ADVANTAGE_MODES {
        let out = group_advantages(&Rewards::new(&values, 3), mode).unwrap();
        if mode == AdvantageMode::None {
            assert_eq!(out.advantages, values);
            continue;
        }
        if matches!(mode, AdvantageMode::Whiten { .. }) {
            continue; // no group baseline: the reference test covers it
        }
        assert_eq!(&out.advantages[..3], &[0.0; 3], "{mode:?}");
        assert_eq!((out.group_mean[0], out.group_std[0]), (0.1, 0.0), "{mode:?}");
        assert!(out.advantages[3..].iter().all(|a| a.is_finite()), "{mode:?}");
        assert!(out.advantages[4] > 0.0 && out.group_std[1] > 0.0, "{mode:?}");
    }
    // Groups of one, and a batch with no spread at all.
    for values in [vec![0.3f32, -2.0, 7.5], vec![4.0f32; 12]] {
        for g in [1, 3] {
            for mode in ADVANTAGE_MODES {
                let out = group_advantages(&Rewards::new(&values, g), mode).unwrap();
                let want = if mode == AdvantageMode::None {
                    values.clone()
                } else {
                    vec![0.0; values.len()]
                };
                let whiten = matches!(mode, AdvantageMode::Whiten { .. });
                if (g == 1 && !whiten) || values[0] == 4.0 {
                    assert_eq!(out.advantages, want, "{mode:?} G={g}");
                    assert!(out.group_std.iter().all(|&s| s == 0.0));
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Group-centered advantages sum to 0 in each group, and leave-one-out
    /// is the centered reward scaled by G / (G - 1).
    #[test]
    fn group_identities(p in 1usize..20, g in 1usize..12, seed in any::<u64>(), discrete in any::<bool>()) {
        let mut rng = Rng::new(seed);
        let values = rewards(&mut rng, p * g, discrete);
        let rw = Rewards::new(&values, g);
        let norm = group_advantages(&rw, AdvantageMode::default()).unwrap();
        let centered = group_advantages(&rw, AdvantageMode::GroupMean).unwrap();
        let loo = group_advantages(&rw, AdvantageMode::LeaveOneOut).unwrap();
        for grp in 0..p {
            let span = grp * g..(grp + 1) * g;
            for adv in [&norm.advantages, &centered.advantages] {
                let sum: f64 = adv[span.clone()].iter().map(|&a| a as f64).sum();
                prop_assert!(sum.abs() < 1e-5 * g as f64, "group {} sums to {}", grp, sum);
            }
            for i in span {
                let want = if g == 1 { 0.0 } else { centered.advantages[i] as f64 * g as f64 / (g - 1) as f64 };
                prop_assert!((loo.advantages[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
            }
        }
    }
}

#[test]
fn broadcast_repeats_per_sequence_values() {
    let per_seq = [1.5f32, -2.0, 0.25];
    let padded = broadcast_to_tokens(&per_seq, &SeqLayout::Padded { batch: 3, seq_len: 2 }).unwrap();
    assert_eq!(padded, [1.5, 1.5, -2.0, -2.0, 0.25, 0.25]);
    let cu = [0u32, 3, 3, 4];
    let packed = broadcast_to_tokens(&per_seq, &SeqLayout::Packed { cu_seqlens: &cu }).unwrap();
    assert_eq!(packed, [1.5, 1.5, 1.5, 0.25]);

    let op_err = |per_seq: &[f32], cu: &[u32]| {
        broadcast_to_tokens(per_seq, &SeqLayout::Packed { cu_seqlens: cu }).unwrap_err()
    };
    assert!(matches!(
        op_err(&per_seq[..2], &cu),
        Error::ShapeMismatch { what: "per_seq", .. }
    ));
    assert!(matches!(
        op_err(&per_seq, &[1, 2, 3, 4]),
        Error::InvalidLayout { .. }
    ));
    assert!(matches!(
        op_err(&per_seq, &[0, 2, 1, 4]),
        Error::InvalidLayout { .. }
    ));
    assert!(matches!(op_err(&[], &[0]), Error::Empty { .. }));
    assert!(matches!(
        op_err(&[1.0, f32::NAN, 0.0], &cu),
        Error::NonFinite {
            what: "per_seq",
            index: 1,
            ..
        }
    ));
}

fn err(values: &[f32], weights: Option<&[f32]>, g: usize, mode: AdvantageMode) -> Error {
    group_advantages(
        &Rewards {
            values,
            weights,
            group_size: g,
        },
        mode,
    )
    .unwrap_err()
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mode = AdvantageMode::default();
    let ok = [1.0f32; 12];
    assert!(matches!(
        err(&[], None, 2, mode),
        Error::Empty { what: "values", .. }
    ));
    assert!(matches!(
        err(&ok, None, 0, mode),
        Error::InvalidParameter {
            name: "group_size",
            ..
        }
    ));
    assert!(matches!(err(&ok, None, 5, mode), Error::InvalidLayout { .. }));
    // 12 values cannot be 3 components of groups of 3, nor 5 of anything.
    assert!(matches!(
        err(&ok, Some(&[1.0, 2.0, 5.0]), 3, mode),
        Error::InvalidLayout { .. }
    ));
    assert!(matches!(
        err(&ok, Some(&[1.0; 5]), 1, mode),
        Error::InvalidLayout { .. }
    ));
    assert!(matches!(
        err(&ok, Some(&[]), 2, mode),
        Error::Empty { what: "weights", .. }
    ));
    for bad in [f32::NAN, f32::INFINITY] {
        assert!(matches!(
            err(&ok, Some(&[1.0, bad]), 2, mode),
            Error::NonFinite {
                what: "weights",
                index: 1,
                ..
            }
        ));
        let mut values = ok;
        values[7] = bad;
        assert!(matches!(
            err(&values, None, 3, mode),
            Error::NonFinite {
                what: "values",
                index: 7,
                ..
            }
        ));
    }
    for eps in [-1e-4f32, f32::NAN, f32::INFINITY] {
        for mode in [
            AdvantageMode::GroupNorm { eps, unbiased: true },
            AdvantageMode::BatchNorm { eps, unbiased: false },
        ] {
            assert!(matches!(
                err(&ok, None, 3, mode),
                Error::InvalidParameter { name: "eps", .. }
            ));
        }
    }
    // Finite rewards whose weighted sum leaves f32's range.
    assert!(matches!(
        err(&[3e38, 1.0, 3e38, 1.0], Some(&[1.0, 1.0]), 2, mode),
        Error::NonFinite {
            what: "weighted rewards",
            index: 0,
            ..
        }
    ));
}

/// An independent f64 model of the settings beyond the mode, written from
/// TRL's and verl's definitions: NaN components left out of the weighted
/// sum, unscorable completions (every component NaN) out of every mean and
/// std with advantage 0, per-component group z-scores first
/// (`NormalizeThenSum`), verl's mean 0 / std 1 for groups of one.
fn reference_cfg(values: &[f64], weights: &[f64], g: usize, cfg: &AdvantageConfig) -> Vec<f64> {
    let k = weights.len();
    let n = values.len() / k;
    let scored = |xs: &[f64]| -> Vec<f64> { xs.iter().copied().filter(|x| !x.is_nan()).collect() };
    // (mean, std) of the scored values; None when fewer than two or no spread.
    let spread = |xs: &[f64], unbiased: bool| -> Option<(f64, f64)> {
        let s = scored(xs);
        (s.len() >= 2 && s.iter().any(|&x| x != s[0])).then(|| (mean(&s), std(&s, unbiased)))
    };
    let mut r = vec![0.0; n];
    for i in 0..n {
        let mut any = false;
        for kk in 0..k {
            let v = values[kk * n + i];
            if v.is_nan() {
                continue;
            }
            any = true;
            let z = match cfg.aggregation {
                RewardAggregation::SumThenNormalize => v,
                RewardAggregation::NormalizeThenSum { eps } => {
                    let p = i / g;
                    match spread(&values[kk * n + p * g..kk * n + (p + 1) * g], true) {
                        Some((m, s)) => (v - m) / (s + eps as f64),
                        None => 0.0,
                    }
                }
            };
            r[i] += weights[kk] * z;
        }
        if !any {
            r[i] = f64::NAN;
        }
    }
    let batch = |unbiased| spread(&r, unbiased);
    (0..n)
        .map(|i| {
            let (p, ri) = (i / g, r[i]);
            if ri.is_nan() {
                return 0.0;
            }
            let group = &r[p * g..(p + 1) * g];
            let verl_one = g == 1 && cfg.singletons == Singletons::Verl;
            match cfg.mode {
                AdvantageMode::None => ri,
                AdvantageMode::Whiten { eps, unbiased } => {
                    batch(unbiased).map_or(0.0, |(m, s)| (ri - m) / (s + eps as f64))
                }
                AdvantageMode::GroupNorm { eps, .. } if verl_one => ri / (1.0 + eps as f64),
                AdvantageMode::BatchNorm { eps, unbiased } if verl_one => {
                    batch(unbiased).map_or(0.0, |(_, s)| ri / (s + eps as f64))
                }
                _ if verl_one => ri,
                AdvantageMode::GroupNorm { eps, unbiased } => {
                    spread(group, unbiased).map_or(0.0, |(m, s)| (ri - m) / (s + eps as f64))
                }
                AdvantageMode::GroupMean => spread(group, true).map_or(0.0, |(m, _)| ri - m),
                AdvantageMode::BatchNorm { eps, unbiased } => match (spread(group, true), batch(unbiased)) {
                    (Some((m, _)), Some((_, s))) => (ri - m) / (s + eps as f64),
                    _ => 0.0,
                },
                AdvantageMode::LeaveOneOut => {
                    let others: Vec<f64> = (0..g).filter(|&j| j != i % g).map(|j| group[j]).collect();
                    let others = scored(&others);
                    if spread(group, true).is_none() {
                        0.0
                    } else {
                        ri - mean(&others)
                    }
                }
            }
        })
        .collect()
}

/// Every combination of the settings on random rewards with NaN
/// components, unscorable completions and groups with one scored
/// completion, against [`reference_cfg`].
#[test]
fn every_setting_matches_f64_reference_with_nan_rewards() {
    let mut rng = Rng::new(55);
    for &(p, g, k) in &[
        (1usize, 1usize, 1usize),
        (5, 1, 2),
        (3, 4, 1),
        (7, 3, 3),
        (4, 6, 2),
        (2, 9, 1),
        // Past the op's threshold for running groups in parallel.
        (1500, 7, 2),
    ] {
        for discrete in [false, true] {
            let mut values = rewards(&mut rng, k * p * g, discrete);
            let n = p * g;
            for v in values.iter_mut() {
                if rng.uniform() < 0.2 {
                    *v = f32::NAN;
                }
            }
            if n > 2 {
                // One unscorable completion.
                for kk in 0..k {
                    values[kk * n + 1] = f32::NAN;
                }
            }
            let weights: Vec<f32> = (0..k).map(|_| rng.range(-2.0, 3.0) as f32).collect();
            for mode in ADVANTAGE_MODES {
                for aggregation in [
                    RewardAggregation::SumThenNormalize,
                    RewardAggregation::NormalizeThenSum { eps: 1e-4 },
                ] {
                    for singletons in [Singletons::Zero, Singletons::Verl] {
                        let cfg = AdvantageConfig {
                            mode,
                            aggregation,
                            nan_rewards: NanRewards::Skip,
                            singletons,
                        };
                        let rw = Rewards::new(&values, g).with_weights(&weights);
                        let got = group_advantages(&rw, cfg).unwrap();
                        let want = reference_cfg(&widen(&values), &widen(&weights), g, &cfg);
                        let what = format!("{cfg:?} P={p} G={g} K={k} discrete={discrete}");
                        assert_close(&what, &got.advantages, &want, 1e-6, 1e-5);
                    }
                }
            }
            // Without NaN, Skip changes nothing.
            let clean: Vec<f32> = values.iter().map(|v| if v.is_nan() { 0.5 } else { *v }).collect();
            for mode in ADVANTAGE_MODES {
                let rw = Rewards::new(&clean, g).with_weights(&weights);
                let skip = AdvantageConfig {
                    nan_rewards: NanRewards::Skip,
                    ..mode.into()
                };
                let a = group_advantages(&rw, mode).unwrap();
                let b = group_advantages(&rw, skip).unwrap();
                assert_eq!(a.advantages, b.advantages, "{mode:?}");
            }
        }
    }
}

/// TRL 1.16's rewards -> advantages code (`_generate_and_score_completions`,
/// every `scale_rewards` and `multi_objective_aggregation`, NaN rewards) and
/// verl's `compute_grpo_outcome_advantage` (with and without
/// `norm_adv_by_std_in_grpo`), `compute_rloo_outcome_advantage` and
/// `compute_rloo_vectorized_outcome_advantage`, from
/// `tests/fixtures/advantages_reference.json`.
#[test]
fn trl_and_verl_advantages_match_their_code() {
    let fx = fixture("advantages_reference.json");
    for case in fx["trl"].as_array().unwrap() {
        let (values, weights, g) = trl_case(case);
        for (key, cfg) in trl_settings() {
            let got = group_advantages(&Rewards::new(&values, g).with_weights(&weights), cfg).unwrap();
            let want = fixture_f64s(&case["advantages"][key]);
            let what = format!("TRL {key} {}", case["name"]);
            assert_close(&what, &got.advantages, &want, 1e-6, 1e-5);
        }
    }
    for case in fx["verl"].as_array().unwrap() {
        let values: Vec<f32> = fixture_f64s(&case["rewards"]).iter().map(|&x| x as f32).collect();
        let g = case["group_size"].as_u64().unwrap() as usize;
        for (key, cfg) in verl_settings() {
            let got = group_advantages(&Rewards::new(&values, g), cfg).unwrap();
            let want = fixture_f64s(&case["advantages"][key]);
            let what = format!("verl {key} {}", case["name"]);
            assert_close(&what, &got.advantages, &want, 1e-6, 1e-5);
        }
    }
}

#[test]
fn unscorable_completions_are_marked_and_get_zero() {
    let values = [1.0f32, f32::NAN, 3.0, f32::NAN, f32::NAN, f32::NAN];
    let cfg = AdvantageConfig {
        nan_rewards: NanRewards::Skip,
        ..AdvantageMode::default().into()
    };
    let out = group_advantages(&Rewards::new(&values, 3), cfg).unwrap();
    assert_eq!(out.advantages[1], 0.0);
    assert!(out.rewards[1].is_nan() && out.rewards[0] == 1.0);
    assert_eq!(out.group_mean[0], 2.0);
    assert!(out.group_mean[1].is_nan(), "no scored completion");
    assert_eq!(&out.advantages[3..], &[0.0; 3]);
    // An infinite reward is still an error, and NaN is one by default.
    let mut inf = values;
    inf[2] = f32::INFINITY;
    assert!(matches!(
        group_advantages(&Rewards::new(&inf, 3), cfg).unwrap_err(),
        Error::NonFinite {
            what: "values",
            index: 2,
            ..
        }
    ));
    assert!(matches!(
        group_advantages(&Rewards::new(&values, 3), AdvantageMode::default()).unwrap_err(),
        Error::NonFinite {
            what: "values",
            index: 1,
            ..
        }
    ));
}
