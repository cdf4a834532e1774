//! CUDA group advantages and token broadcasting against the CPU ops: every
//! mode, weighted components, flat groups and groups of one (exactly 0 on
//! both, or verl's convention), TRL's NaN rewards and normalize_then_sum,
//! a NaN-poisoned memory pool, and the status word for bad data.
#![cfg(feature = "cuda")]

use crate::common::gpu::{down, gpu, poison_pool, up};
use crate::common::{assert_close, Rng, ADVANTAGE_MODES};
use grpo_kernels::cuda::{self, Device};
use grpo_kernels::{
    broadcast_to_tokens, group_advantages, AdvantageConfig, AdvantageMode, DeviceFault, Error, Rewards,
    SeqLayout, Singletons,
};

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// R1-SGG-like rewards: `k` components on a coarse grid (so ties are
/// common), with every third group made flat and the rest random.
fn rewards(rng: &mut Rng, k: usize, p: usize, g: usize) -> Vec<f32> {
    let n = p * g;
    let mut values = vec![0.0f32; k * n];
    for c in 0..k {
        for grp in 0..p {
            let flat = grp % 3 == 0;
            let level = (rng.below(11) as f32) * 0.1;
            for i in 0..g {
                values[c * n + grp * g + i] = if flat {
                    level
                } else {
                    (rng.below(11) as f32) * 0.1 + (rng.normal() * 1e-3) as f32
                };
            }
        }
    }
    values
}

#[test]
#[ignore = "needs a CUDA device"]
fn advantages_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(11);
    let shapes = [(1, 1), (3, 1), (1, 8), (7, 5), (64, 16), (1000, 33), (4096, 64)];
    let weights = [1.0f32, 2.0, 5.0];
    for &(p, g) in &shapes {
        for k in [1, 3] {
            let values = rewards(&mut rng, k, p, g);
            // Every mode, with groups of one at 0 and as verl has them.
            let configs = ADVANTAGE_MODES.iter().flat_map(|&mode| {
                [Singletons::Zero, Singletons::Verl].map(|singletons| AdvantageConfig {
                    mode,
                    singletons,
                    ..AdvantageConfig::default()
                })
            });
            for mode in configs {
                let host = Rewards::new(&values, g);
                let host = if k == 3 { host.with_weights(&weights) } else { host };
                let want = group_advantages(&host, mode).unwrap();

                let d_values = up(&gpu, &values);
                let dev = Rewards::<Device> {
                    values: d_values.as_view(),
                    weights: (k == 3).then_some(&weights[..]),
                    group_size: g,
                };
                poison_pool(&gpu, 4 * p * g + 8 * p);
                let got = cuda::group_advantages(&gpu, &dev, mode).unwrap();
                gpu.check().unwrap();
                let what = format!("{mode:?} P={p} G={g} K={k}");
                let adv = down(&gpu, &got.advantages);
                assert_close(
                    &format!("advantages {what}"),
                    &adv,
                    &widen(&want.advantages),
                    1e-5,
                    1e-5,
                );
                // Flat groups and groups of one are exactly 0 on both sides.
                for (i, (&a, &w)) in adv.iter().zip(&want.advantages).enumerate() {
                    assert!(
                        w != 0.0 || a == 0.0,
                        "advantage {i} of {what}: {a}, want exactly 0"
                    );
                }
                let pairs = [
                    ("rewards", &got.rewards, &want.rewards),
                    ("group_mean", &got.group_mean, &want.group_mean),
                    ("group_std", &got.group_std, &want.group_std),
                ];
                for (name, got, want) in pairs {
                    assert_close(
                        &format!("{name} {what}"),
                        &down(&gpu, got),
                        &widen(want),
                        1e-6,
                        1e-6,
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn broadcast_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(12);
    // Packed, with empty sequences first, inside and last.
    let lens = [0usize, 3, 0, 700, 1, 0, 4099, 0];
    let mut cu = vec![0u32];
    for &l in &lens {
        cu.push(cu.last().unwrap() + l as u32);
    }
    let tokens = *cu.last().unwrap() as usize;
    let per_seq: Vec<f32> = (0..lens.len()).map(|_| rng.normal() as f32).collect();
    let want = broadcast_to_tokens(&per_seq, &SeqLayout::Packed { cu_seqlens: &cu }).unwrap();
    let (d_per_seq, d_cu) = (up(&gpu, &per_seq), up(&gpu, &cu));
    poison_pool(&gpu, tokens);
    let layout: SeqLayout<'_, Device> = SeqLayout::Packed {
        cu_seqlens: d_cu.as_view(),
    };
    let got = cuda::broadcast_to_tokens(&gpu, &d_per_seq.as_view(), &layout, tokens).unwrap();
    gpu.check().unwrap();
    assert_close("packed", &down(&gpu, &got), &widen(&want), 0.0, 0.0);

    let (batch, seq_len) = (lens.len(), 37);
    let want = broadcast_to_tokens(&per_seq, &SeqLayout::Padded { batch, seq_len }).unwrap();
    let layout: SeqLayout<'_, Device> = SeqLayout::Padded { batch, seq_len };
    let got = cuda::broadcast_to_tokens(&gpu, &d_per_seq.as_view(), &layout, batch * seq_len).unwrap();
    gpu.check().unwrap();
    assert_close("padded", &down(&gpu, &got), &widen(&want), 0.0, 0.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_data_is_reported() {
    let gpu = gpu();
    // A NaN reward: named by its index in `values`; its group is NaN.
    let mut values = vec![0.5f32; 3 * 8];
    values[8 + 13] = f32::NAN;
    let weights = [1.0f32, 2.0, 5.0];
    let d_values = up(&gpu, &values);
    let dev = Rewards::<Device> {
        values: d_values.as_view(),
        weights: Some(&weights),
        group_size: 4,
    };
    let got = cuda::group_advantages(&gpu, &dev, AdvantageMode::default()).unwrap();
    match gpu.check() {
        Err(Error::Device {
            op: "group_advantages",
            fault: DeviceFault::NonFinite,
            index: 21,
        }) => {}
        other => panic!("expected a NonFinite fault at 21, got {other:?}"),
    }
    // values[21] is component 2, completion 5: group 1 of the 2 groups of 4.
    let adv = down(&gpu, &got.advantages);
    assert!(adv[4..].iter().all(|a| a.is_nan()), "the NaN's group: {adv:?}");
    assert!(adv[..4].iter().all(|&a| a == 0.0), "the flat group: {adv:?}");

    // Host-side validation is the CPU's.
    let bad = Rewards::<Device> {
        values: d_values.as_view(),
        weights: None,
        group_size: 5,
    };
    assert!(matches!(
        cuda::group_advantages(&gpu, &bad, AdvantageMode::GroupMean),
        Err(Error::InvalidLayout { .. })
    ));

    // Offsets that do not end at `tokens`.
    let cu = up(&gpu, &[0u32, 4, 9]);
    let per_seq = up(&gpu, &[1.0f32, 2.0]);
    let layout: SeqLayout<'_, Device> = SeqLayout::Packed {
        cu_seqlens: cu.as_view(),
    };
    cuda::broadcast_to_tokens(&gpu, &per_seq.as_view(), &layout, 8).unwrap();
    match gpu.check() {
        Err(Error::Device {
            op: "group_advantages",
            fault: DeviceFault::InvalidLayout,
            index: 1,
        }) => {}
        other => panic!("expected an InvalidLayout fault at sequence 1, got {other:?}"),
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn nan_rewards_and_normalize_then_sum_match_cpu() {
    use crate::common::trl_settings;
    let gpu = gpu();
    let mut rng = Rng::new(12);
    let weights = [1.0f32, 2.0, 5.0];
    for &(p, g) in &[(1, 1), (5, 1), (7, 5), (64, 16), (1000, 33)] {
        for k in [1, 3] {
            let mut values = rewards(&mut rng, k, p, g);
            for v in values.iter_mut() {
                if rng.uniform() < 0.2 {
                    *v = f32::NAN;
                }
            }
            for (key, cfg) in trl_settings() {
                for singletons in [Singletons::Zero, Singletons::Verl] {
                    let cfg = AdvantageConfig { singletons, ..cfg };
                    let host = Rewards::new(&values, g);
                    let host = if k == 3 { host.with_weights(&weights) } else { host };
                    let want = group_advantages(&host, cfg).unwrap();
                    let d_values = up(&gpu, &values);
                    let dev = Rewards::<Device> {
                        values: d_values.as_view(),
                        weights: (k == 3).then_some(&weights[..]),
                        group_size: g,
                    };
                    poison_pool(&gpu, 4 * p * g + 8 * p);
                    let got = cuda::group_advantages(&gpu, &dev, cfg).unwrap();
                    gpu.check().unwrap();
                    let what = format!("{key} {singletons:?} P={p} G={g} K={k}");
                    let adv = down(&gpu, &got.advantages);
                    assert_close(
                        &format!("advantages {what}"),
                        &adv,
                        &widen(&want.advantages),
                        1e-5,
                        1e-5,
                    );
                    let std = down(&gpu, &got.group_std);
                    assert_close(
                        &format!("group_std {what}"),
                        &std,
                        &widen(&want.group_std),
                        1e-6,
                        1e-6,
                    );
                    // Unscorable completions are NaN in both, and only they.
                    let r = down(&gpu, &got.rewards);
                    for (i, (a, b)) in r.iter().zip(&want.rewards).enumerate() {
                        assert_eq!(a.is_nan(), b.is_nan(), "reward {i} of {what}");
                    }
                }
            }
        }
    }
}
