//! Every op, fed random finite inputs of any magnitude (ordinary values,
//! values up to `±f32::MAX`, subnormals, zeros, random bit patterns) and
//! parameters to match, either fails with a typed error of the kind the
//! crate's rule allows for finite inputs (`src/error.rs`: a result beyond
//! its type's range, a parameter out of range) or returns finite outputs.
//! Never a panic, never a NaN or infinity handed back as a result. The
//! candle ops and their backward, on inputs drawn alike (the strategies both
//! draw are `common::extreme`'s), are `tests/candle/extreme_inputs.rs`.

use crate::common::extreme::{
    batch, extreme, extremes, head, logprob_cfg, policy_cfg, positive, rows, Head, Rows, ESTIMATORS,
};
use grpo_kernels::{
    broadcast_to_tokens, fused_linear_logprobs, fused_linear_logprobs_backward, group_advantages,
    kl_divergence, kl_divergence_backward, policy_loss, policy_loss_backward, sample, token_logprobs,
    token_logprobs_backward, token_logprobs_backward_inplace, Advantage, AdvantageMode, Error, Float,
    FusedLinearConfig, ImportanceLevel, KlInputs, LinearRows, LogProbConfig, LogProbGrads, LogitRows,
    PolicyLossConfig, PolicyLossInputs, PolicyObjective, Rewards, SampleInputs, SamplingConfig, SeqLayout,
};
use half::{bf16, f16};
use proptest::prelude::*;

/// `xs` in `T`, clamped to `T`'s range so that every value stays finite.
fn to<T: Float>(xs: &[f32]) -> Vec<T> {
    xs.iter()
        .map(|&x| T::from_f32(x.clamp(-T::MAX, T::MAX)))
        .collect()
}

fn finite<T: Float>(xs: &[T]) -> bool {
    xs.iter().all(|x| x.to_f32().is_finite())
}

/// An error finite inputs may give: a parameter out of range, or a result
/// named in `results` that does not fit its type. (Never the inputs'
/// fault: they are finite.)
#[track_caller]
fn allowed(e: &Error, results: &[&str]) {
    let ok = match e {
        Error::InvalidParameter { .. } => true,
        Error::NonFinite { what, .. } => results.contains(what),
        _ => false,
    };
    assert!(ok, "{e:?} (allowed: parameters and {results:?})");
}

fn logprobs<T: Float>(r: &Rows, cfg: &LogProbConfig, g: &[f32]) {
    let logits = to::<T>(&r.logits);
    let rows = LogitRows {
        logits: &logits[..],
        targets: &r.targets[..],
        mask: Some(&r.mask[..]),
        vocab: r.vocab,
    };
    let out = match token_logprobs(&rows, cfg) {
        Ok(out) => out,
        Err(e) => return allowed(&e, &["logits / temperature", "logp"]),
    };
    let outs = [&out.logp, &out.lse, out.entropy.as_ref().unwrap_or(&out.lse)];
    assert!(outs.iter().all(|o| finite(o)), "{out:?}");
    let n = r.targets.len();
    let grads = LogProbGrads {
        logp: &g[..n],
        entropy: cfg.entropy.then(|| &g[n..2 * n]),
        lse: Some(&g[2 * n..3 * n]),
    };
    let mut inplace = logits.clone();
    let r2 = token_logprobs_backward_inplace(
        &mut inplace,
        &r.targets,
        Some(&r.mask),
        r.vocab,
        cfg,
        &out.saved(),
        &grads,
    );
    match token_logprobs_backward(&rows, cfg, &out.saved(), &grads) {
        Ok(d) => {
            assert!(finite(&d));
            assert_eq!(r2, Ok(()));
            assert_eq!(inplace, d);
        }
        Err(e) => {
            allowed(&e, &["dlogits"]);
            assert_eq!(r2, Err(e));
            assert_eq!(inplace, logits, "in place, on error: untouched");
        }
    }
}

proptest! {
    #[test]
    fn token_logprobs_and_backward(r in rows(), cfg in logprob_cfg(), g in extremes(12)) {
        logprobs::<f32>(&r, &cfg, &g);
        logprobs::<bf16>(&r, &cfg, &g);
        logprobs::<f16>(&r, &cfg, &g);
    }
}

fn fused<T: Float>(x: &Head, cfg: &FusedLinearConfig, g: &[f32]) {
    let (hidden, weight, bias) = (
        to::<T>(&x.hidden),
        to::<T>(&x.weight),
        x.bias.as_deref().map(to::<T>),
    );
    let rows = LinearRows {
        hidden: &hidden[..],
        weight: &weight[..],
        bias: bias.as_deref(),
        targets: &x.targets[..],
        mask: None,
        hidden_size: x.h,
    };
    // Finite inputs, but their products may overflow: "logits" names those.
    let out = match fused_linear_logprobs(&rows, cfg) {
        Ok(out) => out,
        Err(e) => return allowed(&e, &["logits", "logp"]),
    };
    assert!(finite(&out.logp) && finite(&out.lse), "{out:?}");
    let n = x.targets.len();
    let grads = LogProbGrads {
        logp: &g[..n],
        entropy: cfg.logprob.entropy.then(|| &g[n..2 * n]),
        lse: Some(&g[2 * n..3 * n]),
    };
    match fused_linear_logprobs_backward(&rows, cfg, &out.saved(), &grads) {
        Ok(d) => assert!(finite(&d.hidden) && finite(&d.weight) && finite(&d.bias.unwrap_or_default())),
        Err(e) => allowed(&e, &["dlogits", "dhidden", "dweight", "dbias"]),
    }
}

proptest! {
    #[test]
    fn fused_linear_and_backward(
        x in head(),
        logprob in logprob_cfg(),
        chunks in (1usize..3, 1usize..3),
        g in extremes(9),
    ) {
        let cfg = FusedLinearConfig { logprob, chunk_rows: chunks.0, chunk_vocab: chunks.1 };
        fused::<f32>(&x, &cfg, &g);
        fused::<bf16>(&x, &cfg, &g);
        fused::<f16>(&x, &cfg, &g);
    }
}

fn advantage_mode() -> impl Strategy<Value = AdvantageMode> {
    let eps = prop_oneof![Just(0.0f32), Just(1e-4), positive()];
    prop_oneof![
        (eps.clone(), any::<bool>()).prop_map(|(eps, unbiased)| AdvantageMode::GroupNorm { eps, unbiased }),
        Just(AdvantageMode::GroupMean),
        (eps, any::<bool>()).prop_map(|(eps, unbiased)| AdvantageMode::BatchNorm { eps, unbiased }),
        Just(AdvantageMode::LeaveOneOut),
        Just(AdvantageMode::None),
    ]
}

proptest! {
    #[test]
    fn group_advantages_and_broadcast(
        (values, weights, g) in (1usize..4, 1usize..4, 1usize..5).prop_flat_map(|(k, p, g)| {
            (extremes(k * p * g), prop::option::of(extremes(k)), Just(g))
        }),
        mode in advantage_mode(),
        seq_len in 1usize..4,
    ) {
        // Without weights, the K components are read as K times the groups.
        let rewards = Rewards { values: &values[..], weights: weights.as_deref(), group_size: g };
        match group_advantages(&rewards, mode) {
            Ok(out) => {
                for o in [&out.advantages, &out.rewards, &out.group_mean, &out.group_std] {
                    prop_assert!(finite(o), "{o:?}");
                }
                let layout = SeqLayout::Padded { batch: out.advantages.len(), seq_len };
                let tokens = broadcast_to_tokens(&out.advantages, &layout).unwrap();
                prop_assert!(finite(&tokens));
            }
            Err(e) => allowed(&e, &["weighted rewards", "advantages", "group_std"]),
        }
    }
}

proptest! {
    #[test]
    fn kl_and_backward(x in (1usize..20).prop_flat_map(|n| (extremes(n), extremes(n), extremes(n)))) {
        let (logp, ref_logp, grad) = x;
        let inputs = KlInputs::new(&logp, &ref_logp);
        for est in ESTIMATORS {
            match kl_divergence(&inputs, est) {
                Ok(kl) => prop_assert!(finite(&kl), "{est:?} {kl:?}"),
                Err(e) => allowed(&e, &["kl"]),
            }
            match kl_divergence_backward(&inputs, est, &grad) {
                Ok(d) => prop_assert!(finite(&d), "{est:?} {d:?}"),
                Err(e) => allowed(&e, &["dlogp"]),
            }
        }
    }
}

proptest! {
    #[test]
    fn policy_loss_and_backward(b in batch(), cfg in policy_cfg(), with in (any::<bool>(), any::<bool>())) {
        let n = b.logp.len();
        let inputs = PolicyLossInputs {
            logp: &b.logp[..],
            old_logp: with.0.then_some(&b.old[..]),
            ref_logp: with.1.then_some(&b.reference[..]),
            advantages: Advantage::PerSequence(&b.adv[..]),
            mask: Some(&b.mask[..]),
            layout: SeqLayout::Padded { batch: b.s, seq_len: n / b.s },
            pg_weights: None,
        };
        match policy_loss(&inputs, &cfg) {
            Ok(out) => prop_assert!(finite(&out.per_token) && finite(&out.summary), "{out:?}"),
            // "ratio": a sequence's mean log-ratio of extremes (differences
            // overflowing to +inf and -inf in one sequence) has no value.
            Err(e) => allowed(&e, &["per_token", "kl", "ratio", "loss"]),
        }
        match policy_loss_backward(&inputs, &cfg, b.grad[n], Some(&b.grad[..n])) {
            Ok(d) => prop_assert!(finite(&d), "{d:?}"),
            Err(e) => allowed(&e, &["dlogp"]),
        }
    }
}

/// Every objective, with extreme parameters too.
fn objective() -> impl Strategy<Value = PolicyObjective> {
    prop_oneof![
        prop::option::of(positive()).prop_map(|delta| PolicyObjective::Clip { delta }),
        (positive(), positive()).prop_map(|(a, b)| PolicyObjective::Cispo {
            min_ratio: a.min(b),
            max_ratio: a.max(b),
        }),
        (positive(), positive()).prop_map(|(tau_pos, tau_neg)| PolicyObjective::Sapo { tau_pos, tau_neg }),
        (extreme(), positive(), extreme(), positive()).prop_map(|(k_pos, lambda_pos, k_neg, lambda_neg)| {
            PolicyObjective::Vespo {
                k_pos,
                lambda_pos,
                k_neg,
                lambda_neg,
            }
        }),
    ]
}

proptest! {
    /// The objectives and options with extreme inputs: a typed error or
    /// finite outputs.
    #[test]
    fn policy_objectives_and_options(
        b in batch(),
        cfg in policy_cfg(),
        objective in objective(),
        opts in (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
    ) {
        let n = b.logp.len();
        let weights: Vec<f32> = b.old.iter().map(|x| x.abs()).collect();
        let cfg = PolicyLossConfig {
            objective,
            dual_clip: cfg.dual_clip.filter(|_| matches!(objective, PolicyObjective::Clip { .. })),
            importance: if matches!(objective, PolicyObjective::Vespo { .. }) {
                ImportanceLevel::Token
            } else {
                cfg.importance
            },
            log_ratio_clamp: if opts.0 { f32::INFINITY } else { cfg.log_ratio_clamp },
            kl_bias_correction: opts.1,
            exclude_empty_seqs: opts.2,
            ..cfg
        };
        let inputs = PolicyLossInputs {
            logp: &b.logp[..],
            old_logp: Some(&b.old[..]),
            ref_logp: Some(&b.reference[..]),
            advantages: Advantage::PerSequence(&b.adv[..]),
            mask: Some(&b.mask[..]),
            layout: SeqLayout::Padded { batch: b.s, seq_len: n / b.s },
            pg_weights: opts.3.then_some(&weights[..]),
        };
        match policy_loss(&inputs, &cfg) {
            Ok(out) => prop_assert!(finite(&out.per_token) && finite(&out.summary), "{out:?}"),
            Err(e) => allowed(&e, &["per_token", "kl", "ratio", "loss"]),
        }
        match policy_loss_backward(&inputs, &cfg, b.grad[n], Some(&b.grad[..n])) {
            Ok(d) => prop_assert!(finite(&d), "{d:?}"),
            Err(e) => allowed(&e, &["dlogp"]),
        }
    }
}

fn sampling_cfg() -> impl Strategy<Value = SamplingConfig> {
    (
        prop_oneof![1 => Just(0.0f32), 4 => positive()],
        0usize..8,
        prop_oneof![Just(1.0f32), 0.01f32..=1.0],
        prop_oneof![Just(0.0f32), 0.0f32..=1.0],
        any::<u64>(),
    )
        .prop_map(|(temperature, top_k, top_p, min_p, seed)| SamplingConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            step: 0,
        })
}

fn draw<T: Float>(logits: &[f32], vocab: usize, cfg: &SamplingConfig) {
    let logits = to::<T>(logits);
    match sample(&SampleInputs::new(&logits, vocab), cfg) {
        Ok(s) => {
            assert!(finite(&s.logp), "{s:?}");
            assert!(s.tokens.iter().all(|&t| (t as usize) < vocab));
        }
        Err(e) => allowed(&e, &["logits / temperature"]),
    }
}

proptest! {
    #[test]
    fn sampling(
        (logits, vocab) in (1usize..4, 1usize..7).prop_flat_map(|(b, v)| (extremes(b * v), Just(v))),
        cfg in sampling_cfg(),
    ) {
        draw::<f32>(&logits, vocab, &cfg);
        draw::<bf16>(&logits, vocab, &cfg);
        draw::<f16>(&logits, vocab, &cfg);
    }
}
