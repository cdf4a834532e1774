//! The random inputs of extreme magnitude (proptest strategies) that both
//! extreme-input suites draw, the CPU ops' (`tests/cpu/extreme_inputs.rs`)
//! and the candle ops' (`tests/candle/extreme_inputs.rs`): finite values of
//! any magnitude, logit rows, LM-head rows, padded batches, and the configs
//! of the log-prob and policy-loss ops. Strategies only the CPU suite draws
//! are its own.

use grpo_kernels::{Aggregation, ImportanceLevel, KlEstimator, LogProbConfig, PolicyLossConfig};
use proptest::prelude::*;

/// A finite f32 of any magnitude.
pub fn extreme() -> impl Strategy<Value = f32> {
    let huge = (1e30f32..=f32::MAX, any::<bool>()).prop_map(|(x, neg)| if neg { -x } else { x });
    prop_oneof![
        3 => -10.0f32..10.0,
        2 => huge,
        1 => prop::sample::select(vec![0.0, -0.0, f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-45, -1e-45, 1e-38]),
        2 => any::<u32>().prop_map(f32::from_bits).prop_filter("finite", |x| x.is_finite()),
    ]
}

/// A positive finite f32 of any magnitude (a temperature, a normalizer).
pub fn positive() -> impl Strategy<Value = f32> {
    prop_oneof![
        2 => 0.05f32..4.0,
        1 => extreme().prop_map(f32::abs).prop_filter("> 0", |&x| x > 0.0),
    ]
}

pub fn extremes(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(extreme(), n)
}

/// Every log-prob config: temperatures of any magnitude, with and without entropy.
pub fn logprob_cfg() -> impl Strategy<Value = LogProbConfig> {
    (positive(), any::<bool>()).prop_map(|(temperature, entropy)| LogProbConfig {
        temperature,
        entropy,
        ignore_index: Some(-100),
    })
}

/// Logit rows `[rows, vocab]`, valid targets (some ignored), a random mask.
#[derive(Debug, Clone)]
pub struct Rows {
    pub logits: Vec<f32>,
    pub targets: Vec<i64>,
    pub mask: Vec<u8>,
    pub vocab: usize,
}

pub fn rows() -> impl Strategy<Value = Rows> {
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

/// An LM head's rows: hidden `[n, h]`, weight `[v, h]`, an optional bias.
#[derive(Debug, Clone)]
pub struct Head {
    pub hidden: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub targets: Vec<i64>,
    pub h: usize,
}

pub fn head() -> impl Strategy<Value = Head> {
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

/// The KL estimators both suites draw.
pub const ESTIMATORS: [KlEstimator; 4] = [
    KlEstimator::K1,
    KlEstimator::K2,
    KlEstimator::K3,
    KlEstimator::LowVarK3,
];

pub fn policy_cfg() -> impl Strategy<Value = PolicyLossConfig> {
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
pub struct Batch {
    pub s: usize,
    pub logp: Vec<f32>,
    pub old: Vec<f32>,
    pub reference: Vec<f32>,
    pub adv: Vec<f32>,
    pub mask: Vec<u8>,
    pub grad: Vec<f32>,
}

pub fn batch() -> impl Strategy<Value = Batch> {
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
