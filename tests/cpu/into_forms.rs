//! The `_into` forms write what their allocating forms return, into
//! buffers that start as NaN (so an element left unwritten shows), and
//! refuse buffers of the wrong length with a typed error.

use crate::common::Rng;
use grpo_kernels::{
    broadcast_to_tokens, broadcast_to_tokens_into, fused_linear_logprobs, fused_linear_logprobs_backward,
    fused_linear_logprobs_backward_into, fused_linear_logprobs_into, group_advantages, group_advantages_into,
    kl_divergence, kl_divergence_backward, kl_divergence_backward_into, kl_divergence_into, policy_loss,
    policy_loss_backward, policy_loss_backward_into, policy_loss_into, sample, sample_into, token_logprobs,
    token_logprobs_backward, token_logprobs_backward_into, token_logprobs_into, Advantage, AdvantageConfig,
    AdvantageMode, Error, FusedLinearConfig, GroupAdvantagesOut, KlEstimator, KlInputs, LinearGradsOut,
    LinearRows, LogProbConfig, LogProbGrads, LogProbsOut, LogitRows, NanRewards, PolicyLossConfig,
    PolicyLossInputs, PolicyLossStats, RewardAggregation, Rewards, SampleInputs, SamplesOut, SamplingConfig,
    SeqLayout,
};

fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn kl_into_equals_allocating() {
    let mut rng = Rng::new(1);
    let n = 100_003;
    let logp: Vec<f32> = (0..n).map(|_| (rng.normal() - 3.0) as f32).collect();
    let reference: Vec<f32> = (0..n).map(|_| (rng.normal() - 3.0) as f32).collect();
    let grad: Vec<f32> = rng.normals(n, 1.0);
    let inputs = KlInputs::new(&logp, &reference);
    for est in [
        KlEstimator::K1,
        KlEstimator::K2,
        KlEstimator::K3,
        KlEstimator::LowVarK3,
    ] {
        let mut out = vec![f32::NAN; n];
        kl_divergence_into(&inputs, est, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&kl_divergence(&inputs, est).unwrap()));
        let mut d = vec![f32::NAN; n];
        kl_divergence_backward_into(&inputs, est, &grad, &mut d).unwrap();
        assert_eq!(
            bits(&d),
            bits(&kl_divergence_backward(&inputs, est, &grad).unwrap())
        );
    }
    let mut short = vec![0.0; n - 1];
    assert_eq!(
        kl_divergence_into(&inputs, KlEstimator::K3, &mut short).unwrap_err(),
        Error::ShapeMismatch {
            op: "kl_divergence",
            what: "out",
            expected: n,
            got: n - 1
        }
    );
    assert!(matches!(
        kl_divergence_backward_into(&inputs, KlEstimator::K3, &grad, &mut short).unwrap_err(),
        Error::ShapeMismatch { what: "dlogp", .. }
    ));
}

#[test]
fn policy_loss_into_equals_allocating() {
    let mut rng = Rng::new(2);
    let (s, t) = (37, 61);
    let n = s * t;
    let logp: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.3 - 2.0) as f32).collect();
    let old: Vec<f32> = logp.iter().map(|&x| x + (rng.normal() * 0.2) as f32).collect();
    let reference: Vec<f32> = logp.iter().map(|&x| x + (rng.normal() * 0.2) as f32).collect();
    let adv: Vec<f32> = rng.normals(s, 1.0);
    let mask: Vec<u8> = (0..n).map(|i| (i % 7 != 0) as u8).collect();
    let grad_tok: Vec<f32> = rng.normals(n, 0.1);
    let layout = || SeqLayout::Padded { batch: s, seq_len: t };
    let inputs = PolicyLossInputs::new(&logp, Advantage::per_sequence(&adv), layout())
        .with_old(&old)
        .with_ref(&reference)
        .with_mask(&mask);
    let cfg = PolicyLossConfig {
        beta: 0.04,
        ..PolicyLossConfig::default()
    };
    let want = policy_loss(&inputs, &cfg).unwrap();
    let (mut per_token, mut summary) = (vec![f32::NAN; n], vec![f32::NAN; PolicyLossStats::SUMMARY_LEN]);
    policy_loss_into(&inputs, &cfg, &mut per_token, &mut summary).unwrap();
    assert_eq!(bits(&per_token), bits(&want.per_token));
    assert_eq!(bits(&summary), bits(&want.summary));
    let mut d = vec![f32::NAN; n];
    policy_loss_backward_into(&inputs, &cfg, 0.5, Some(&grad_tok), &mut d).unwrap();
    assert_eq!(
        bits(&d),
        bits(&policy_loss_backward(&inputs, &cfg, 0.5, Some(&grad_tok)).unwrap())
    );
    assert!(matches!(
        policy_loss_into(&inputs, &cfg, &mut per_token, &mut summary[1..]).unwrap_err(),
        Error::ShapeMismatch {
            what: "summary (output)",
            ..
        }
    ));
    assert!(matches!(
        policy_loss_backward_into(&inputs, &cfg, 1.0, None, &mut d[1..]).unwrap_err(),
        Error::ShapeMismatch {
            what: "dlogp (output)",
            ..
        }
    ));
}

#[test]
fn token_logprobs_into_equals_allocating() {
    let mut rng = Rng::new(3);
    let (n, v) = (67, 1031);
    let logits: Vec<f32> = rng.normals(n * v, 2.0);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let mask: Vec<u8> = (0..n).map(|i| (i % 5 != 2) as u8).collect();
    let rows = LogitRows::new(&logits, &targets, v).with_mask(&mask);
    for entropy in [false, true] {
        let cfg = LogProbConfig {
            temperature: 0.8,
            entropy,
            ignore_index: None,
        };
        let want = token_logprobs(&rows, &cfg).unwrap();
        let (mut logp, mut ent, mut lse) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        let mut out = LogProbsOut {
            logp: &mut logp,
            entropy: entropy.then_some(&mut ent[..]),
            lse: &mut lse,
        };
        token_logprobs_into(&rows, &cfg, &mut out).unwrap();
        assert_eq!(bits(&logp), bits(&want.logp));
        assert_eq!(bits(&lse), bits(&want.lse));
        if entropy {
            assert_eq!(bits(&ent), bits(want.entropy.as_ref().unwrap()));
        }
        let g: Vec<f32> = rng.normals(n, 1.0);
        let grads = LogProbGrads {
            logp: &g[..],
            entropy: None,
            lse: None,
        };
        let mut d = vec![f32::NAN; n * v];
        token_logprobs_backward_into(&rows, &cfg, &want.saved(), &grads, &mut d).unwrap();
        assert_eq!(
            bits(&d),
            bits(&token_logprobs_backward(&rows, &cfg, &want.saved(), &grads).unwrap())
        );
        assert!(matches!(
            token_logprobs_backward_into(&rows, &cfg, &want.saved(), &grads, &mut d[1..]).unwrap_err(),
            Error::ShapeMismatch {
                what: "dlogits (output)",
                ..
            }
        ));
    }
    let cfg = LogProbConfig::default();
    let (mut logp, mut lse, mut ent) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut out = LogProbsOut {
        logp: &mut logp,
        entropy: Some(&mut ent),
        lse: &mut lse,
    };
    // An entropy buffer without `entropy: true`.
    assert!(matches!(
        token_logprobs_into(
            &rows,
            &LogProbConfig {
                entropy: false,
                ..cfg
            },
            &mut out
        )
        .unwrap_err(),
        Error::Unsupported { .. }
    ));
}

/// The fused linear log-probs and their backward: NaN-filled buffers are
/// written in full, and the per-thread working buffers carry nothing from
/// one call to the next (a large call, a small one with a bias, the large
/// one again give the allocating forms' bits each time).
#[test]
fn fused_linear_into_equals_allocating() {
    let mut rng = Rng::new(4);
    let cfg = FusedLinearConfig {
        chunk_rows: 16,
        chunk_vocab: 256,
        logprob: LogProbConfig {
            temperature: 0.9,
            entropy: true,
            ignore_index: None,
        },
    };
    let mut case = |n: usize, v: usize, h: usize, bias: bool| {
        let hidden: Vec<f32> = rng.normals(n * h, 1.0);
        let weight: Vec<f32> = rng.normals(v * h, 0.3);
        let b: Vec<f32> = rng.normals(v, 0.5);
        let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
        let mask: Vec<u8> = (0..n).map(|i| (i % 7 != 3) as u8).collect();
        let g: Vec<f32> = rng.normals(n, 1.0);
        let ge: Vec<f32> = rng.normals(n, 0.1);
        let mut rows = LinearRows::new(&hidden, &weight, &targets, h).with_mask(&mask);
        if bias {
            rows = rows.with_bias(&b);
        }
        let want = fused_linear_logprobs(&rows, &cfg).unwrap();
        let (mut logp, mut ent, mut lse) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        fused_linear_logprobs_into(
            &rows,
            &cfg,
            &mut LogProbsOut {
                logp: &mut logp,
                entropy: Some(&mut ent),
                lse: &mut lse,
            },
        )
        .unwrap();
        assert_eq!(bits(&logp), bits(&want.logp));
        assert_eq!(bits(&lse), bits(&want.lse));
        assert_eq!(bits(&ent), bits(want.entropy.as_ref().unwrap()));

        let grads = LogProbGrads {
            logp: &g[..],
            entropy: Some(&ge[..]),
            lse: None,
        };
        let want_grad = fused_linear_logprobs_backward(&rows, &cfg, &want.saved(), &grads).unwrap();
        let (mut dh, mut dw, mut db) = (vec![f32::NAN; n * h], vec![f32::NAN; v * h], vec![f32::NAN; v]);
        let mut out = LinearGradsOut {
            hidden: &mut dh,
            weight: &mut dw,
            bias: bias.then_some(&mut db[..]),
        };
        fused_linear_logprobs_backward_into(&rows, &cfg, &want.saved(), &grads, &mut out).unwrap();
        assert_eq!(bits(&dh), bits(&want_grad.hidden));
        assert_eq!(bits(&dw), bits(&want_grad.weight));
        if bias {
            assert_eq!(bits(&db), bits(want_grad.bias.as_ref().unwrap()));
        }
        // A bias gradient buffer exactly when there is a bias; lengths.
        let mut wrong = LinearGradsOut {
            hidden: &mut dh,
            weight: &mut dw,
            bias: (!bias).then_some(&mut db[..]),
        };
        assert!(matches!(
            fused_linear_logprobs_backward_into(&rows, &cfg, &want.saved(), &grads, &mut wrong).unwrap_err(),
            Error::Unsupported { .. }
        ));
        let mut short = LinearGradsOut {
            hidden: &mut dh[1..],
            weight: &mut dw,
            bias: bias.then_some(&mut db[..]),
        };
        assert!(matches!(
            fused_linear_logprobs_backward_into(&rows, &cfg, &want.saved(), &grads, &mut short).unwrap_err(),
            Error::ShapeMismatch {
                what: "dhidden (output)",
                ..
            }
        ));
        assert!(matches!(
            fused_linear_logprobs_into(
                &rows,
                &cfg,
                &mut LogProbsOut {
                    logp: &mut logp[1..],
                    entropy: Some(&mut ent),
                    lse: &mut lse,
                },
            )
            .unwrap_err(),
            Error::ShapeMismatch {
                what: "logp (output)",
                ..
            }
        ));
    };
    case(53, 700, 24, false);
    case(9, 130, 8, true);
    case(53, 700, 24, false);
}

/// `sample_into` writes the allocating form's draws, and reports the first
/// faulty row as it does.
#[test]
fn sample_into_equals_allocating() {
    let mut rng = Rng::new(5);
    let (b, v) = (37, 509);
    let mut logits: Vec<f32> = rng.normals(b * v, 3.0);
    let cfg = SamplingConfig {
        temperature: 0.7,
        top_k: 50,
        top_p: 0.9,
        seed: 11,
        ..SamplingConfig::default()
    };
    let want = sample(&SampleInputs::new(&logits, v), &cfg).unwrap();
    let (mut tokens, mut logp) = (vec![u32::MAX; b], vec![f32::NAN; b]);
    let mut out = SamplesOut {
        tokens: &mut tokens,
        logp: &mut logp,
    };
    sample_into(&SampleInputs::new(&logits, v), &cfg, &mut out).unwrap();
    assert_eq!(tokens, want.tokens);
    assert_eq!(bits(&logp), bits(&want.logp));
    for row in [30, 12] {
        logits[row * v + 7] = f32::NAN;
    }
    let err = |r: Result<(), Error>| r.unwrap_err();
    let want_err = sample(&SampleInputs::new(&logits, v), &cfg).unwrap_err();
    assert!(
        matches!(want_err, Error::NonFinite { index: 12, .. }),
        "{want_err:?}"
    );
    let mut out = SamplesOut {
        tokens: &mut tokens,
        logp: &mut logp,
    };
    assert_eq!(
        err(sample_into(&SampleInputs::new(&logits, v), &cfg, &mut out)),
        want_err
    );
    let mut short = SamplesOut {
        tokens: &mut tokens[1..],
        logp: &mut logp,
    };
    assert!(matches!(
        err(sample_into(&SampleInputs::new(&logits, v), &cfg, &mut short)),
        Error::ShapeMismatch {
            what: "tokens (output)",
            ..
        }
    ));
}

/// `group_advantages_into` and `broadcast_to_tokens_into` write what their
/// allocating forms return (every setting that changes the outputs), and
/// refuse outputs of the wrong length.
#[test]
fn advantages_into_equal_allocating() {
    let mut rng = Rng::new(6);
    let (p, g, k) = (13, 5, 2);
    let mut values: Vec<f32> = rng.normals(k * p * g, 1.0);
    values[7] = f32::NAN;
    let weights = [0.7f32, 1.3];
    let rewards = Rewards::new(&values, g).with_weights(&weights);
    for cfg in [
        AdvantageConfig {
            nan_rewards: NanRewards::Skip,
            ..AdvantageConfig::default()
        },
        AdvantageConfig {
            nan_rewards: NanRewards::Skip,
            aggregation: RewardAggregation::NormalizeThenSum { eps: 1e-4 },
            mode: AdvantageMode::Whiten {
                eps: 1e-4,
                unbiased: true,
            },
            ..AdvantageConfig::default()
        },
    ] {
        let want = group_advantages(&rewards, cfg).unwrap();
        let (mut adv, mut r, mut mean, mut std) = (
            vec![f32::NAN; p * g],
            vec![0.5f32; p * g],
            vec![f32::NAN; p],
            vec![f32::NAN; p],
        );
        let mut out = GroupAdvantagesOut {
            advantages: &mut adv,
            rewards: &mut r,
            group_mean: &mut mean,
            group_std: &mut std,
        };
        group_advantages_into(&rewards, cfg, &mut out).unwrap();
        assert_eq!(bits(&adv), bits(&want.advantages));
        assert_eq!(bits(&r), bits(&want.rewards));
        assert_eq!(bits(&mean), bits(&want.group_mean));
        assert_eq!(bits(&std), bits(&want.group_std));
        let mut short = GroupAdvantagesOut {
            advantages: &mut adv,
            rewards: &mut r,
            group_mean: &mut mean[1..],
            group_std: &mut std,
        };
        assert!(matches!(
            group_advantages_into(&rewards, cfg, &mut short).unwrap_err(),
            Error::ShapeMismatch {
                what: "group_mean (output)",
                ..
            }
        ));
    }
    let per_seq: Vec<f32> = rng.normals(4, 1.0);
    let cu = [0u32, 3, 3, 10, 12];
    for layout in [
        SeqLayout::Packed { cu_seqlens: &cu[..] },
        SeqLayout::Padded { batch: 4, seq_len: 5 },
    ] {
        let want = broadcast_to_tokens(&per_seq, &layout).unwrap();
        let mut out = vec![f32::NAN; want.len()];
        broadcast_to_tokens_into(&per_seq, &layout, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&want));
        assert!(matches!(
            broadcast_to_tokens_into(&per_seq, &layout, &mut out[1..]).unwrap_err(),
            Error::ShapeMismatch { what: "out", .. }
        ));
    }
}
