//! Every op, fed random finite inputs of any magnitude (ordinary values,
//! values up to `±f32::MAX`, subnormals, zeros, random bit patterns) and
//! parameters to match, either fails with a typed error of the kind the
//! crate's rule allows for finite inputs (`src/error.rs`: a result beyond
//! its type's range, a parameter out of range) or returns finite outputs.
//! Never a panic, never a NaN or infinity handed back as a result. With
//! feature `candle`, the candle ops and their backward too.

use grpo_kernels::{
    broadcast_to_tokens, fused_linear_logprobs, fused_linear_logprobs_backward, group_advantages,
    kl_divergence, kl_divergence_backward, policy_loss, policy_loss_backward, sample, token_logprobs,
    token_logprobs_backward, token_logprobs_backward_inplace, Advantage, AdvantageMode, Aggregation, Error,
    Float, FusedLinearConfig, ImportanceLevel, KlEstimator, KlInputs, LinearRows, LogProbConfig,
    LogProbGrads, LogitRows, PolicyLossConfig, PolicyLossInputs, PolicyObjective, Rewards, SampleInputs,
    SamplingConfig, SeqLayout,
};
use half::{bf16, f16};
use proptest::prelude::*;

/// A finite f32 of any magnitude.
fn extreme() -> impl Strategy<Value = f32> {
    let huge = (1e30f32..=f32::MAX, any::<bool>()).prop_map(|(x, neg)| if neg { -x } else { x });
    prop_oneof![
        3 => -10.0f32..10.0,
        2 => huge,
        1 => prop::sample::select(vec![0.0, -0.0, f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-45, -1e-45, 1e-38]),
        2 => any::<u32>().prop_map(f32::from_bits).prop_filter("finite", |x| x.is_finite()),
    ]
}

/// A positive finite f32 of any magnitude (a temperature, a normalizer).
fn positive() -> impl Strategy<Value = f32> {
    prop_oneof![
        2 => 0.05f32..4.0,
        1 => extreme().prop_map(f32::abs).prop_filter("> 0", |&x| x > 0.0),
    ]
}

fn extremes(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(extreme(), n)
}

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

/// Every log-prob config: temperatures of any magnitude, with and without entropy.
fn logprob_cfg() -> impl Strategy<Value = LogProbConfig> {
    (positive(), any::<bool>()).prop_map(|(temperature, entropy)| LogProbConfig {
        temperature,
        entropy,
        ignore_index: Some(-100),
    })
}

/// Logit rows `[rows, vocab]`, valid targets (some ignored), a random mask.
#[derive(Debug, Clone)]
struct Rows {
    logits: Vec<f32>,
    targets: Vec<i64>,
    mask: Vec<u8>,
    vocab: usize,
}

fn rows() -> impl Strategy<Value = Rows> {
    (1usize..4, 1usize..6).prop_flat_map(|(n, vocab)| {
        (
            extremes(n * vocab),
            prop::collection::vec(prop_oneof![9 => 0..vocab as i64, 1 => Just(-100i64)], n),
            prop::collection::vec(prop_oneof![4 => Just(1u8), 1 => Just(0u8)], n),
        )
            .prop_map(move |(logits, targets, mask)| Rows {
                logits,
                targets,
                mask,
                vocab,
            })
    })
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

/// An LM head's rows: hidden `[n, h]`, weight `[v, h]`, an optional bias.
#[derive(Debug, Clone)]
struct Head {
    hidden: Vec<f32>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    targets: Vec<i64>,
    h: usize,
}

fn head() -> impl Strategy<Value = Head> {
    (1usize..4, 1usize..4, 1usize..5).prop_flat_map(|(n, h, v)| {
        (
            extremes(n * h),
            extremes(v * h),
            prop::option::of(extremes(v)),
            prop::collection::vec(0..v as i64, n),
        )
            .prop_map(move |(hidden, weight, bias, targets)| Head {
                hidden,
                weight,
                bias,
                targets,
                h,
            })
    })
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

const ESTIMATORS: [KlEstimator; 4] = [
    KlEstimator::K1,
    KlEstimator::K2,
    KlEstimator::K3,
    KlEstimator::LowVarK3,
];

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

fn policy_cfg() -> impl Strategy<Value = PolicyLossConfig> {
    let aggregation = prop_oneof![
        prop::option::of(positive()).prop_map(|normalizer| Aggregation::TokenMean { normalizer }),
        Just(Aggregation::SeqMeanTokenMean),
        Just(Aggregation::SeqMeanTokenSum),
        positive().prop_map(|constant| Aggregation::SeqMeanTokenSumNorm { constant }),
    ];
    (
        (0.0f32..=1.0, positive(), prop::option::of(1.01f32..10.0)),
        (
            prop_oneof![0.1f32..=88.0, Just(88.0)],
            prop_oneof![Just(0.0f32), positive()],
        ),
        (0..4usize, any::<bool>(), aggregation),
    )
        .prop_map(
            |((eps_low, eps_high, dual_clip), (log_ratio_clamp, beta), (kl, seq, aggregation))| {
                PolicyLossConfig {
                    eps_low,
                    eps_high,
                    dual_clip,
                    log_ratio_clamp,
                    importance: if seq {
                        ImportanceLevel::Sequence
                    } else {
                        ImportanceLevel::Token
                    },
                    beta,
                    kl: ESTIMATORS[kl],
                    aggregation,
                    ..Default::default()
                }
            },
        )
}

/// A padded batch `[s, t]`: log-probs of the policy, of the sampler, of the
/// reference; per-sequence advantages; a mask; upstream gradients.
#[derive(Debug, Clone)]
struct Batch {
    s: usize,
    logp: Vec<f32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<u8>,
    grad: Vec<f32>,
}

fn batch() -> impl Strategy<Value = Batch> {
    (1usize..3, 1usize..5).prop_flat_map(|(s, t)| {
        let n = s * t;
        (
            (extremes(n), extremes(n), extremes(n)),
            (
                extremes(s),
                prop::collection::vec(prop_oneof![4 => Just(1u8), 1 => Just(0u8)], n),
            ),
            extremes(n + 1),
        )
            .prop_map(move |((logp, old, reference), (adv, mask), grad)| Batch {
                s,
                logp,
                old,
                reference,
                adv,
                mask,
                grad,
            })
    })
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

#[cfg(feature = "candle")]
mod candle {
    //! The candle ops, forward and `backward()` with upstream gradients of
    //! any magnitude: a typed error (this crate's, wrapped) or finite
    //! outputs and gradients.
    use candle_core::{DType, Device, Tensor, Var};
    use grpo_kernels::candle as ops;

    use super::*;

    type CResult<T> = candle_core::Result<T>;

    fn tensor(xs: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(xs.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// `sum(x * g)`: its gradient with respect to `x` is `g`.
    fn weighted(x: &Tensor, g: &[f32]) -> CResult<Tensor> {
        (x * tensor(&g[..x.elem_count()], x.dims()))?.sum_all()
    }

    /// Ok: every tensor finite. Err: this crate's error (candle wraps it).
    #[track_caller]
    fn check(r: CResult<Vec<Tensor>>) {
        match r {
            Ok(ts) => {
                for t in ts {
                    let v = t
                        .flatten_all()
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
                }
            }
            Err(mut e) => {
                if let candle_core::Error::WithBacktrace { inner, .. } = e {
                    e = *inner;
                }
                assert!(
                    matches!(e, candle_core::Error::Wrapped(_)),
                    "candle's own error: {e:?}"
                );
            }
        }
    }

    fn logprob_step(r: &Rows, cfg: &LogProbConfig, g: &[f32]) -> CResult<Vec<Tensor>> {
        let n = r.targets.len();
        let logits = Var::from_tensor(&tensor(&r.logits, &[n, r.vocab]))?;
        let targets = Tensor::new(&r.targets[..], &Device::Cpu)?;
        let mask = Tensor::new(&r.mask[..], &Device::Cpu)?;
        let out = ops::token_logprobs(&logits, &targets, Some(&mask), cfg)?;
        let mut loss = (weighted(&out.logp, g)? + weighted(&out.lse, &g[n..])?)?;
        if let Some(h) = &out.entropy {
            loss = (loss + weighted(h, &g[2 * n..])?)?;
        }
        let grads = loss.backward()?;
        Ok(vec![out.logp, out.lse, grads.get(&logits).unwrap().clone()])
    }

    fn fused_step(x: &Head, cfg: &FusedLinearConfig, g: &[f32]) -> CResult<Vec<Tensor>> {
        let n = x.targets.len();
        let hidden = Var::from_tensor(&tensor(&x.hidden, &[n, x.h]))?;
        let weight = Var::from_tensor(&tensor(&x.weight, &[x.weight.len() / x.h, x.h]))?;
        let targets = Tensor::new(&x.targets[..], &Device::Cpu)?;
        let out = ops::fused_linear_logprobs(&hidden, &weight, &targets, None, cfg)?;
        let grads = (weighted(&out.logp, g)? + weighted(&out.lse, &g[n..])?)?.backward()?;
        Ok(vec![
            out.logp,
            grads.get(&hidden).unwrap().clone(),
            grads.get(&weight).unwrap().clone(),
        ])
    }

    fn kl_step(x: &[f32], est: KlEstimator) -> CResult<Vec<Tensor>> {
        let n = x.len() / 3;
        let logp = Var::from_tensor(&tensor(&x[..n], &[n]))?;
        let kl = ops::kl_divergence(&logp, &tensor(&x[n..2 * n], &[n]), est)?;
        let grads = weighted(&kl, &x[2 * n..])?.backward()?;
        Ok(vec![kl, grads.get(&logp).unwrap().clone()])
    }

    fn policy_step(b: &Batch, cfg: &PolicyLossConfig) -> CResult<Vec<Tensor>> {
        let shape = [b.s, b.logp.len() / b.s];
        let logp = Var::from_tensor(&tensor(&b.logp, &shape))?;
        let (old, reference) = (tensor(&b.old, &shape), tensor(&b.reference, &shape));
        let (adv, mask) = (
            tensor(&b.adv, &[b.s]),
            Tensor::from_vec(b.mask.clone(), &shape[..], &Device::Cpu)?,
        );
        let inputs = ops::PolicyLossTensors {
            old_logp: Some(&old),
            ref_logp: (cfg.beta > 0.0).then_some(&reference),
            advantages: &adv,
            mask: Some(&mask),
            cu_seqlens: None,
            pg_weights: None,
        };
        let out = ops::policy_loss(&logp, &inputs, cfg)?;
        let n = b.logp.len();
        let loss = (out.loss.affine(b.grad[n] as f64, 0.0)? + weighted(&out.per_token, &b.grad)?)?;
        let grads = loss.backward()?;
        Ok(vec![out.loss, out.per_token, grads.get(&logp).unwrap().clone()])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn candle_ops_and_backward(
            r in rows(),
            x in head(),
            b in batch(),
            logprob in logprob_cfg(),
            policy in policy_cfg(),
            g in extremes(12),
            est in 0..4usize,
        ) {
            check(logprob_step(&r, &logprob, &g));
            let fused = FusedLinearConfig { logprob, ..FusedLinearConfig::default() };
            check(fused_step(&x, &fused, &g));
            check(kl_step(&g[..9], ESTIMATORS[est]));
            check(policy_step(&b, &policy));
            let rewards = tensor(&g[..4], &[2, 2]);
            check(ops::group_advantages(&rewards, None, AdvantageMode::LeaveOneOut)
                .map(|a| vec![a.advantages, a.group_std]));
            let cfg = SamplingConfig { temperature: logprob.temperature, ..SamplingConfig::default() };
            check(ops::sample(&tensor(&r.logits, &[r.targets.len(), r.vocab]), &cfg).map(|(_, logp)| vec![logp]));
        }
    }
}
