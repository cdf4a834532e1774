//! Group advantages against an f64 reference for every mode, degenerate
//! groups, properties, token broadcasting, and every bad input.

use crate::common::{assert_close, widen, Rng, ADVANTAGE_MODES};
use grpo_kernels::{broadcast_to_tokens, group_advantages, AdvantageMode, Error, Rewards, SeqLayout};
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
        AdvantageMode::GroupNorm { unbiased, .. } | AdvantageMode::BatchNorm { unbiased, .. } => unbiased,
        _ => true,
    };
    let batch_std = |unbiased| std(&r, unbiased);
    let batch_std = [batch_std(false), batch_std(true)];
    let (mut adv, mut means, mut stds) = (vec![], vec![], vec![]);
    for group in r.chunks(g) {
        let flat = group.iter().all(|&x| x == group[0]);
        let m = if flat { group[0] } else { mean(group) };
        means.push(m);
        stds.push(if flat { 0.0 } else { std(group, unbiased) });
        for (i, &ri) in group.iter().enumerate() {
            adv.push(match mode {
                AdvantageMode::None => ri,
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
                if g == 1 || values[0] == 4.0 {
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
