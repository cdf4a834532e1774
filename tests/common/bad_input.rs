//! The bad-input cases of every op family, as data: each holds its inputs
//! and the error it must give (or `None`: it must succeed with finite
//! outputs), so that the CPU, candle and CUDA suites (`bad_input.rs` of
//! `tests/cpu/`, `tests/candle/` and `tests/cuda/`) check the same cases. The
//! kinds follow the crate's rule on non-finite values (`src/error.rs`): a
//! non-finite input or upstream gradient, a result beyond its type's range,
//! a parameter out of range, a size that cannot be allocated.
#![allow(dead_code)]

use grpo_kernels::{
    AdvantageConfig, AdvantageMode, Aggregation, DType, Error, Float, FusedLinearConfig, ImportanceLevel,
    IsMode, KlEstimator, LogProbConfig, NanRewards, PolicyLossConfig, PolicyObjective, RewardAggregation,
    SamplerIsConfig, SamplingConfig, Singletons,
};

/// Runs `$body` with `$t` the float type of a case's `dtype`. (The allows:
/// `dead_code` does not cover macros, and not every binary uses it.)
#[allow(unused_macros)]
macro_rules! for_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            grpo_kernels::DType::F32 => {
                type $t = f32;
                $body
            }
            grpo_kernels::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            grpo_kernels::DType::F16 => {
                type $t = half::f16;
                $body
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use for_dtype;

/// A case's values in `T`, rounded as its `dtype` stores them.
pub fn to<T: Float>(xs: &[f32]) -> Vec<T> {
    xs.iter().map(|&x| T::from_f32(x)).collect()
}

/// `T`'s values in f32 (exact: every `T` widens to f32).
pub fn widened<T: Float>(xs: &[T]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

const NAN: f32 = f32::NAN;
const INF: f32 = f32::INFINITY;
const MAX: f32 = f32::MAX;

fn non_finite(op: &'static str, what: &'static str, index: usize) -> Option<Error> {
    Some(Error::NonFinite { op, what, index })
}

fn bad_param(op: &'static str, name: &'static str, value: f32, expected: &'static str) -> Option<Error> {
    Some(Error::InvalidParameter {
        op,
        name,
        value: value as f64,
        expected,
    })
}

const T_RANGE: &str = "finite and >= 1 / f32::MAX (about 2.9e-39)";

/// Upstream gradients of the log-prob outputs, one per row: `entropy` is
/// given exactly when the forward computes entropies (as candle passes them).
#[derive(Clone)]
pub struct Grads {
    pub logp: Vec<f32>,
    pub entropy: Option<Vec<f32>>,
    pub lse: Vec<f32>,
}

impl Grads {
    fn logp(logp: Vec<f32>) -> Self {
        let n = logp.len();
        Self {
            logp,
            entropy: None,
            lse: vec![0.0; n],
        }
    }
}

/// Token log-probs: the forward, and with `grads` the backward after it.
pub struct LogProbCase {
    pub name: &'static str,
    /// `[rows, vocab]`, rounded to `dtype`.
    pub logits: Vec<f32>,
    pub dtype: DType,
    pub targets: Vec<i64>,
    pub mask: Option<Vec<u8>>,
    pub vocab: usize,
    pub cfg: LogProbConfig,
    pub grads: Option<Grads>,
    pub want: Option<Error>,
}

pub fn logprob_cases() -> Vec<LogProbCase> {
    const FWD: &str = "token_logprobs";
    const BWD: &str = "token_logprobs_backward";
    let cfg = LogProbConfig::default();
    let t = |temperature| LogProbConfig { temperature, ..cfg };
    let case = |name, logits: Vec<f32>, targets: Vec<i64>, cfg, grads, want| LogProbCase {
        name,
        logits,
        dtype: DType::F32,
        targets,
        mask: None,
        vocab: 2,
        cfg,
        grads,
        want,
    };
    let ok_logits = vec![0.5, -1.0, 2.0, 0.25, 1.0, 1.0];
    let entropy_cfg = LogProbConfig { entropy: true, ..cfg };
    vec![
        case(
            "a NaN logit",
            vec![0.0, NAN, 1.0, 2.0],
            vec![0, 1],
            cfg,
            None,
            non_finite(FWD, "logits", 0),
        ),
        case(
            "a row of -inf",
            vec![0.0, 1.0, -INF, -INF],
            vec![0, 1],
            cfg,
            None,
            non_finite(FWD, "logits", 1),
        ),
        case(
            "logits / temperature overflows",
            vec![1.0, 2.0, 10.0, 1.0],
            vec![0, 0],
            t(1e-38),
            None,
            non_finite(FWD, "logits / temperature", 1),
        ),
        case(
            "a temperature whose reciprocal overflows",
            ok_logits[..4].to_vec(),
            vec![0, 0],
            t(1e-39),
            None,
            bad_param(FWD, "temperature", 1e-39, T_RANGE),
        ),
        case(
            "a target of probability 0",
            vec![0.0, 1.0, 0.0, -INF],
            vec![0, 1],
            cfg,
            None,
            non_finite(FWD, "logp", 1),
        ),
        case(
            "a target log-prob below -f32::MAX",
            vec![3e38, -3e38],
            vec![1],
            cfg,
            None,
            non_finite(FWD, "logp", 0),
        ),
        case(
            "a target out of range",
            ok_logits[..4].to_vec(),
            vec![0, 2],
            cfg,
            None,
            Some(Error::TokenOutOfRange {
                op: FWD,
                index: 1,
                token: 2,
                vocab: 2,
            }),
        ),
        case(
            "a NaN grad_logp",
            ok_logits.clone(),
            vec![0, 1, 1],
            cfg,
            Some(Grads::logp(vec![1.0, NAN, 1.0])),
            non_finite(BWD, "grad_logp", 1),
        ),
        LogProbCase {
            mask: Some(vec![1, 0, 1]),
            ..case(
                "an infinite grad_logp at a masked row is never read",
                ok_logits.clone(),
                vec![0, 1, 1],
                cfg,
                Some(Grads::logp(vec![1.0, INF, 1.0])),
                None,
            )
        },
        case(
            "an infinite grad_entropy",
            ok_logits.clone(),
            vec![0, 1, 1],
            entropy_cfg,
            Some(Grads {
                entropy: Some(vec![0.0, 0.0, -INF]),
                ..Grads::logp(vec![1.0; 3])
            }),
            non_finite(BWD, "grad_entropy", 2),
        ),
        case(
            "a NaN grad_lse",
            ok_logits.clone(),
            vec![0, 1, 1],
            cfg,
            Some(Grads {
                lse: vec![0.0, NAN, 0.0],
                ..Grads::logp(vec![1.0; 3])
            }),
            non_finite(BWD, "grad_lse", 1),
        ),
        case(
            "a gradient beyond f32",
            ok_logits.clone(),
            vec![0, 1, 1],
            t(0.5),
            Some(Grads::logp(vec![1.0, 2e38, 1.0])),
            non_finite(BWD, "dlogits", 1),
        ),
        LogProbCase {
            dtype: DType::F16,
            ..case(
                "a gradient beyond f16",
                ok_logits.clone(),
                vec![0, 1, 1],
                cfg,
                Some(Grads::logp(vec![1.0, 1.0, 1e5])),
                non_finite(BWD, "dlogits", 2),
            )
        },
        case(
            "the same gradient fits f32",
            ok_logits,
            vec![0, 1, 1],
            cfg,
            Some(Grads::logp(vec![1.0, 1.0, 1e5])),
            None,
        ),
    ]
}

/// Fused linear log-probs: `hidden [rows, h]`, `weight [vocab, h]`.
pub struct FusedCase {
    pub name: &'static str,
    pub hidden: Vec<f32>,
    pub weight: Vec<f32>,
    /// No candle counterpart: candle's op takes no bias.
    pub bias: Option<Vec<f32>>,
    pub dtype: DType,
    pub targets: Vec<i64>,
    pub h: usize,
    pub cfg: FusedLinearConfig,
    pub grads: Option<Grads>,
    pub want: Option<Error>,
}

pub fn fused_cases() -> Vec<FusedCase> {
    const FWD: &str = "fused_linear_logprobs";
    const BWD: &str = "fused_linear_logprobs_backward";
    let cfg = FusedLinearConfig {
        chunk_rows: 2,
        chunk_vocab: 2,
        ..FusedLinearConfig::default()
    };
    let case = |name, hidden: Vec<f32>, weight: Vec<f32>, grads, want| FusedCase {
        name,
        hidden,
        weight,
        bias: None,
        dtype: DType::F32,
        targets: vec![1, 1],
        h: 1,
        cfg,
        grads,
        want,
    };
    // Logits [3, 0] in both rows, both targeting token 1: dz of column 0 has
    // one sign in both rows, so dW[0] = sum_i dz_i0 h_i grows with h.
    let overflowing = |dtype, h: f32, w0: f32, name| FusedCase {
        dtype,
        ..case(
            name,
            vec![h, h],
            vec![w0, 0.0],
            Some(Grads::logp(vec![1.0, 1.0])),
            non_finite(BWD, "dweight", 0),
        )
    };
    vec![
        case(
            "a NaN weight",
            vec![1.0, 2.0],
            vec![NAN, 1.0],
            None,
            non_finite(FWD, "logits", 0),
        ),
        FusedCase {
            bias: Some(vec![0.0, -INF]),
            ..case(
                "a target banned by a -inf bias",
                vec![1.0, 2.0],
                vec![1.0, 1.0],
                None,
                non_finite(FWD, "logp", 0),
            )
        },
        case(
            "a NaN grad_logp (not a poisoned dW)",
            vec![1.0, 2.0],
            vec![0.5, -0.5],
            Some(Grads::logp(vec![NAN, 1.0])),
            non_finite(BWD, "grad_logp", 0),
        ),
        case(
            "a dz beyond f32",
            vec![1.0, 2.0],
            vec![0.5, -0.5],
            Some(Grads::logp(vec![1.0, 3.3e38])),
            non_finite(BWD, "dlogits", 1),
        ),
        overflowing(DType::F32, 3e38, 1e-38, "dW = dz^T h overflows f32"),
        overflowing(DType::F16, 60000.0, 1e-4, "dW = dz^T h overflows f16"),
    ]
}

/// Group advantages (`broadcast: None`) or a broadcast to tokens.
pub struct AdvCase {
    pub name: &'static str,
    pub values: Vec<f32>,
    pub weights: Option<Vec<f32>>,
    pub group_size: usize,
    pub mode: AdvantageConfig,
    pub want: Option<Error>,
}

impl AdvCase {
    /// Whether the CUDA kernel runs this case's settings (it refuses
    /// `NanRewards::Skip` and `NormalizeThenSum` as unsupported).
    pub fn on_gpu(&self) -> bool {
        self.mode.nan_rewards == NanRewards::Error
            && self.mode.aggregation == RewardAggregation::SumThenNormalize
    }
}

pub fn advantage_cases() -> Vec<AdvCase> {
    const OP: &str = "group_advantages";
    let norm = AdvantageMode::default();
    let case = |name, values: Vec<f32>, group_size, mode: AdvantageMode, want| AdvCase {
        name,
        values,
        weights: None,
        group_size,
        mode: mode.into(),
        want,
    };
    let with = |mode, nan_rewards, aggregation, singletons| AdvantageConfig {
        mode,
        nan_rewards,
        aggregation,
        singletons,
    };
    let sum = RewardAggregation::SumThenNormalize;
    vec![
        case(
            "a NaN reward",
            vec![1.0, 0.0, NAN, 1.0],
            2,
            norm,
            non_finite(OP, "values", 2),
        ),
        AdvCase {
            weights: Some(vec![1.0, 1.0]),
            ..case(
                "a weighted sum beyond f32",
                vec![0.0, 3e38, 1.0, 3e38],
                2,
                norm,
                non_finite(OP, "weighted rewards", 1),
            )
        },
        case(
            "an RLOO spread beyond f32",
            vec![MAX, -MAX, 0.0, 1.0],
            4,
            AdvantageMode::LeaveOneOut,
            non_finite(OP, "advantages", 0),
        ),
        // r - mean = -1.8 MAX, while the std, 0.63 MAX, still fits.
        case(
            "a Dr. GRPO spread beyond f32",
            [vec![MAX; 9], vec![-MAX]].concat(),
            10,
            AdvantageMode::GroupMean,
            non_finite(OP, "advantages", 9),
        ),
        case(
            "a group std beyond f32",
            vec![0.0, 1.0, MAX, -MAX],
            2,
            norm,
            non_finite(OP, "group_std", 1),
        ),
        case(
            "normalized advantages of rewards near f32::MAX are finite",
            vec![MAX, MAX / 2.0, -MAX, -MAX / 2.0],
            2,
            AdvantageMode::BatchNorm {
                eps: 0.0,
                unbiased: true,
            },
            None,
        ),
        case(
            "a negative eps",
            vec![1.0, 0.0],
            2,
            AdvantageMode::GroupNorm {
                eps: -1.0,
                unbiased: true,
            },
            bad_param(OP, "eps", -1.0, "finite and >= 0"),
        ),
        AdvCase {
            mode: with(norm, NanRewards::Skip, sum, Singletons::Zero),
            ..case(
                "an infinite reward with NaN rewards skipped",
                vec![1.0, NAN, INF, 0.0],
                2,
                norm,
                non_finite(OP, "values", 2),
            )
        },
        AdvCase {
            mode: with(
                norm,
                NanRewards::Error,
                RewardAggregation::NormalizeThenSum { eps: -1.0 },
                Singletons::Zero,
            ),
            ..case(
                "a negative normalize_then_sum eps",
                vec![1.0, 0.0],
                2,
                norm,
                bad_param(OP, "aggregation eps", -1.0, "finite and >= 0"),
            )
        },
        case(
            "a negative whitening eps",
            vec![1.0, 0.0],
            2,
            AdvantageMode::Whiten {
                eps: -1.0,
                unbiased: true,
            },
            bad_param(OP, "eps", -1.0, "finite and >= 0"),
        ),
        case(
            "whitened rewards near f32::MAX are finite",
            vec![MAX, -MAX, MAX / 2.0, 0.0],
            2,
            AdvantageMode::Whiten {
                eps: 0.0,
                unbiased: false,
            },
            None,
        ),
        AdvCase {
            mode: with(
                AdvantageMode::GroupNorm {
                    eps: 1e-6,
                    unbiased: true,
                },
                NanRewards::Error,
                sum,
                Singletons::Verl,
            ),
            ..case(
                "verl's groups of one near f32::MAX are finite",
                vec![MAX, -MAX],
                1,
                norm,
                None,
            )
        },
    ]
}

/// Broadcasts of per-sequence values to a padded layout.
pub struct BroadcastCase {
    pub name: &'static str,
    pub per_seq: Vec<f32>,
    pub batch: usize,
    pub seq_len: usize,
    pub want: Option<Error>,
}

pub fn broadcast_cases() -> Vec<BroadcastCase> {
    const OP: &str = "broadcast_to_tokens";
    vec![
        BroadcastCase {
            name: "a NaN value",
            per_seq: vec![1.0, NAN],
            batch: 2,
            seq_len: 3,
            want: non_finite(OP, "per_seq", 1),
        },
        BroadcastCase {
            name: "usize::MAX / 4 tokens",
            per_seq: vec![1.0],
            batch: 1,
            seq_len: usize::MAX / 4,
            want: Some(Error::Allocation {
                op: OP,
                what: "tokens",
                elements: usize::MAX / 4,
            }),
        },
    ]
}

/// KL estimates, and with `grad` the backward.
pub struct KlCase {
    pub name: &'static str,
    pub logp: Vec<f32>,
    pub ref_logp: Vec<f32>,
    pub est: KlEstimator,
    pub grad: Option<Vec<f32>>,
    pub want: Option<Error>,
}

pub fn kl_cases() -> Vec<KlCase> {
    const FWD: &str = "kl_divergence";
    const BWD: &str = "kl_divergence_backward";
    let case = |name, logp: Vec<f32>, ref_logp: Vec<f32>, est, grad, want| KlCase {
        name,
        logp,
        ref_logp,
        est,
        grad,
        want,
    };
    use KlEstimator::{Abs, K1StraightThrough, LowVarK3, LowVarK3StraightThrough, K1, K2, K3};
    vec![
        case(
            "a -inf logp",
            vec![-1.0, -INF],
            vec![-1.0, -1.0],
            K3,
            None,
            non_finite(FWD, "logp", 1),
        ),
        case(
            "k2 of log-probs above 0 overflows",
            vec![-1.0, 1e20],
            vec![-1.0, -1e20],
            K2,
            None,
            non_finite(FWD, "kl", 1),
        ),
        case(
            "k1 of a d beyond f32",
            vec![3e38],
            vec![-3e38],
            K1,
            None,
            non_finite(FWD, "kl", 0),
        ),
        case(
            "k3 at logp -100 saturates, and so does its gradient",
            vec![-100.0],
            vec![0.0],
            K3,
            Some(vec![1.0]),
            None,
        ),
        case(
            "k3's saturated gradient times 2 overflows",
            vec![-1.0, -100.0],
            vec![-1.0, 0.0],
            K3,
            Some(vec![1.0, 2.0]),
            non_finite(BWD, "dlogp", 1),
        ),
        case(
            "a NaN upstream gradient",
            vec![-1.0, -2.0],
            vec![-1.5, -1.0],
            K3,
            Some(vec![NAN, 1.0]),
            non_finite(BWD, "grad", 0),
        ),
        case(
            "verl's low-variance k3 of extreme log-probs is finite",
            vec![-3e38, 0.0],
            vec![0.0, -3e38],
            LowVarK3,
            Some(vec![1e30, -1e30]),
            None,
        ),
        case(
            "abs of a d beyond f32",
            vec![-1.0, 3e38],
            vec![-1.0, -3e38],
            Abs,
            None,
            non_finite(FWD, "kl", 1),
        ),
        case(
            "abs's gradient of extreme log-probs is a sign",
            vec![-2e38, 1e38],
            vec![1e38, -2e38],
            Abs,
            Some(vec![1e30, -1e30]),
            None,
        ),
        case(
            "verl's k3+ gradient -d times a large grad overflows",
            vec![-1.0, -1e20],
            vec![-1.0, 1e20],
            LowVarK3StraightThrough,
            Some(vec![1.0, 1e20]),
            non_finite(BWD, "dlogp", 1),
        ),
        case(
            "verl's k1+ of a NaN ref_logp",
            vec![-1.0, -1.0],
            vec![NAN, -1.0],
            K1StraightThrough,
            Some(vec![1.0, 1.0]),
            non_finite(FWD, "ref_logp", 0),
        ),
    ]
}

/// The policy loss over a padded `[batch, seq_len]` batch, and with
/// `backward` (`grad_loss`, `grad_per_token`) its backward.
pub struct PolicyCase {
    pub name: &'static str,
    pub logp: Vec<f32>,
    pub old_logp: Option<Vec<f32>>,
    pub ref_logp: Option<Vec<f32>>,
    /// Per sequence.
    pub advantages: Vec<f32>,
    pub mask: Option<Vec<u8>>,
    pub batch: usize,
    pub cfg: PolicyLossConfig,
    pub backward: Option<(f32, Vec<f32>)>,
    pub want: Option<Error>,
}

pub fn policy_cases() -> Vec<PolicyCase> {
    const FWD: &str = "policy_loss";
    const BWD: &str = "policy_loss_backward";
    let cfg = PolicyLossConfig::default();
    let case = |name, logp: Vec<f32>, advantages: Vec<f32>, cfg, backward, want| PolicyCase {
        name,
        logp,
        old_logp: None,
        ref_logp: None,
        advantages,
        mask: None,
        batch: 1,
        cfg,
        backward,
        want,
    };
    let logp = vec![-1.0, -2.0];
    vec![
        PolicyCase {
            mask: Some(vec![1, 0, 1, 1]),
            batch: 2,
            ..case(
                "a NaN logp at a masked-in token (a masked-out one is never read)",
                vec![-1.0, NAN, -1.0, NAN],
                vec![1.0, -1.0],
                cfg,
                None,
                non_finite(FWD, "logp", 3),
            )
        },
        case(
            "a log-ratio clamp whose exponential overflows",
            logp.clone(),
            vec![1.0],
            PolicyLossConfig {
                log_ratio_clamp: 88.5,
                ..cfg
            },
            None,
            bad_param(
                FWD,
                "log_ratio_clamp",
                88.5,
                "in (0, 88] (e^clamp must fit f32) or +inf (no clamp)",
            ),
        ),
        case(
            "a two-sided clipping delta of 0",
            logp.clone(),
            vec![1.0],
            PolicyLossConfig {
                objective: PolicyObjective::Clip { delta: Some(0.0) },
                ..cfg
            },
            None,
            bad_param(FWD, "delta", 0.0, "finite and > 0"),
        ),
        case(
            "a CISPO upper bound below its lower bound",
            logp.clone(),
            vec![1.0],
            PolicyLossConfig {
                objective: PolicyObjective::Cispo {
                    min_ratio: 0.8,
                    max_ratio: 0.5,
                },
                ..cfg
            },
            None,
            bad_param(FWD, "max_ratio", 0.5, "finite and >= min_ratio"),
        ),
        case(
            "a SAPO temperature of 0",
            logp.clone(),
            vec![1.0],
            PolicyLossConfig {
                objective: PolicyObjective::Sapo {
                    tau_pos: 1.0,
                    tau_neg: 0.0,
                },
                ..cfg
            },
            None,
            bad_param(FWD, "tau_neg", 0.0, "finite and > 0"),
        ),
        case(
            "a negative VESPO lambda",
            logp.clone(),
            vec![1.0],
            PolicyLossConfig {
                objective: PolicyObjective::Vespo {
                    k_pos: 2.0,
                    lambda_pos: -1.0,
                    k_neg: 3.0,
                    lambda_neg: 2.0,
                },
                ..cfg
            },
            None,
            bad_param(FWD, "lambda_pos", -1.0, "finite and >= 0"),
        ),
        case(
            "an infinite VESPO k",
            logp.clone(),
            vec![1.0],
            PolicyLossConfig {
                objective: PolicyObjective::Vespo {
                    k_pos: 2.0,
                    lambda_pos: 3.0,
                    k_neg: f32::INFINITY,
                    lambda_neg: 2.0,
                },
                ..cfg
            },
            None,
            bad_param(FWD, "k_neg", f32::INFINITY, "finite"),
        ),
        case(
            "a dual clip with the SAPO objective",
            logp.clone(),
            vec![1.0],
            PolicyLossConfig {
                objective: PolicyObjective::Sapo {
                    tau_pos: 1.0,
                    tau_neg: 1.05,
                },
                dual_clip: Some(3.0),
                ..cfg
            },
            None,
            bad_param(FWD, "dual_clip", 3.0, "None unless the objective is Clip"),
        ),
        case(
            "VESPO with sequence-level importance ratios",
            logp.clone(),
            vec![1.0],
            PolicyLossConfig {
                objective: PolicyObjective::Vespo {
                    k_pos: 2.0,
                    lambda_pos: 3.0,
                    k_neg: 3.0,
                    lambda_neg: 2.0,
                },
                importance: ImportanceLevel::Sequence,
                ..cfg
            },
            None,
            Some(Error::Unsupported {
                op: FWD,
                reason: "VESPO weighs sequences itself: use ImportanceLevel::Token".into(),
            }),
        ),
        PolicyCase {
            old_logp: Some(vec![-11.0, -2.0]),
            ..case(
                "a ratio e^10 times an advantage of -1e38",
                logp.clone(),
                vec![-1e38],
                PolicyLossConfig {
                    log_ratio_clamp: 88.0,
                    ..cfg
                },
                None,
                non_finite(FWD, "per_token", 0),
            )
        },
        PolicyCase {
            ref_logp: Some(vec![-1.0, -1e20]),
            ..case(
                "a k2 KL beyond f32, beta 0",
                logp.clone(),
                vec![1.0],
                PolicyLossConfig {
                    kl: KlEstimator::K2,
                    ..cfg
                },
                None,
                non_finite(FWD, "kl", 1),
            )
        },
        case(
            "finite token losses whose sum overflows",
            logp.clone(),
            vec![-3e38],
            PolicyLossConfig {
                aggregation: Aggregation::SeqMeanTokenSum,
                ..cfg
            },
            None,
            non_finite(FWD, "loss", 0),
        ),
        case(
            "a NaN grad_loss",
            logp.clone(),
            vec![1.0],
            cfg,
            Some((NAN, vec![0.0; 2])),
            non_finite(BWD, "grad_loss", 0),
        ),
        PolicyCase {
            mask: Some(vec![1, 0]),
            ..case(
                "a NaN grad_per_token at a masked-out token is never read",
                logp.clone(),
                vec![1.0],
                cfg,
                Some((1.0, vec![0.0, NAN])),
                None,
            )
        },
        case(
            "an infinite grad_per_token",
            logp.clone(),
            vec![1.0],
            cfg,
            Some((1.0, vec![0.0, -INF])),
            non_finite(BWD, "grad_per_token", 1),
        ),
        case(
            "a gradient beyond f32",
            logp,
            vec![10.0],
            cfg,
            Some((3e38, vec![0.0; 2])),
            non_finite(BWD, "dlogp", 0),
        ),
    ]
}

/// Sampling from `[rows, vocab]` logits.
pub struct SampleCase {
    pub name: &'static str,
    pub logits: Vec<f32>,
    pub vocab: usize,
    pub cfg: SamplingConfig,
    pub want: Option<Error>,
}

pub fn sample_cases() -> Vec<SampleCase> {
    const OP: &str = "sample";
    let cfg = SamplingConfig::default();
    let t = |temperature| SamplingConfig { temperature, ..cfg };
    let case = |name, logits: Vec<f32>, cfg, want| SampleCase {
        name,
        logits,
        vocab: 2,
        cfg,
        want,
    };
    vec![
        case(
            "a NaN logit",
            vec![0.0, 1.0, NAN, 1.0],
            cfg,
            non_finite(OP, "logits", 1),
        ),
        case("a +inf logit", vec![INF, 1.0], cfg, non_finite(OP, "logits", 0)),
        case(
            "logits / temperature overflows",
            vec![10.0, 1.0],
            t(1e-38),
            non_finite(OP, "logits / temperature", 0),
        ),
        case(
            "a temperature whose reciprocal overflows",
            vec![10.0, 1.0],
            t(1e-39),
            bad_param(
                OP,
                "temperature",
                1e-39,
                "0 (greedy) or finite and >= 1 / f32::MAX (about 2.9e-39)",
            ),
        ),
        case(
            "top-p 0",
            vec![1.0, 2.0],
            SamplingConfig { top_p: 0.0, ..cfg },
            bad_param(OP, "top_p", 0.0, "in (0, 1]"),
        ),
        // Up to 2e38: the CUDA kernels' base-2 softmax state holds x log2(e).
        case("greedy over extreme logits", vec![2e38, -2e38], t(0.0), None),
    ]
}

/// Which correction a [`CorrectionCase`] runs.
#[derive(Debug, Clone, Copy)]
pub enum Correction {
    SamplerIs(SamplerIsConfig),
    OffPolicy {
        threshold: f32,
    },
    /// `logp` holds the entropies.
    Entropy {
        top_quantile: f64,
    },
}

/// A correction over a padded `[batch, N / batch]` batch.
pub struct CorrectionCase {
    pub name: &'static str,
    /// The trainer's log-probs, or the entropies.
    pub logp: Vec<f32>,
    pub sampler_logp: Vec<f32>,
    pub mask: Option<Vec<u8>>,
    pub advantages: Vec<f32>,
    pub batch: usize,
    pub op: Correction,
    pub want: Option<Error>,
}

pub fn correction_cases() -> Vec<CorrectionCase> {
    const IS: &str = "sampler_is_weights";
    const OPSM: &str = "off_policy_mask";
    const ENT: &str = "high_entropy_mask";
    let case =
        |name, logp: Vec<f32>, sampler_logp: Vec<f32>, mask: Option<Vec<u8>>, op, want| CorrectionCase {
            name,
            logp,
            sampler_logp,
            mask,
            advantages: vec![1.0, -1.0],
            batch: 2,
            op,
            want,
        };
    let is = |mode, clip_min, clip_max| {
        Correction::SamplerIs(SamplerIsConfig {
            mode,
            clip_min,
            clip_max,
        })
    };
    let default_is = Correction::SamplerIs(SamplerIsConfig::default());
    let lp = || vec![-1.0f32, -0.5, -2.0, -0.3];
    let on = || Some(vec![1u8, 1, 1, 1]);
    vec![
        case(
            "IS: clip_min > clip_max",
            lp(),
            lp(),
            on(),
            is(IsMode::TokenTruncate, Some(1.0), Some(0.5)),
            bad_param(IS, "clip_max", 0.5, "finite and >= clip_min"),
        ),
        case(
            "IS: a negative clip_min",
            lp(),
            lp(),
            on(),
            is(IsMode::TokenMask, Some(-1.0), None),
            bad_param(IS, "clip_min", -1.0, "finite and >= 0"),
        ),
        case(
            "IS: a truncate mode without bounds",
            lp(),
            lp(),
            on(),
            is(IsMode::SequenceTruncate, None, None),
            Some(Error::Unsupported {
                op: IS,
                reason: "a truncate mode needs clip_min or clip_max (TRL's torch.clamp with neither raises)"
                    .into(),
            }),
        ),
        case(
            "IS: a NaN trainer log-prob at a masked-in token",
            vec![-1.0, NAN, -2.0, -0.3],
            lp(),
            on(),
            default_is,
            non_finite(IS, "logp", 1),
        ),
        case(
            "IS: an infinite sampler log-prob at a masked-in token",
            lp(),
            vec![-1.0, -0.5, -INF, -0.3],
            on(),
            default_is,
            non_finite(IS, "sampler_logp", 2),
        ),
        case(
            "IS: NaN sampler log-probs (not scored) and NaN padding are accepted",
            vec![-1.0, -0.5, NAN, -0.3],
            vec![NAN, -0.5, INF, NAN],
            Some(vec![1, 1, 0, 1]),
            is(IsMode::SequenceMask, Some(0.5), None),
            None,
        ),
        case(
            "IS: a sequence ratio beyond f32 with no upper bound",
            vec![0.0, 0.0, -1.0, -1.0],
            vec![-60.0, -60.0, -1.0, -1.0],
            on(),
            is(IsMode::SequenceMask, Some(0.5), None),
            non_finite(IS, "weights", 0),
        ),
        case(
            "IS: sampler_logp shorter than logp",
            lp(),
            vec![-1.0, -0.5, -2.0],
            on(),
            default_is,
            Some(Error::ShapeMismatch {
                op: IS,
                what: "sampler_logp",
                expected: 4,
                got: 3,
            }),
        ),
        CorrectionCase {
            advantages: vec![1.0, NAN],
            ..case(
                "OPSM: a NaN advantage",
                lp(),
                lp(),
                on(),
                Correction::OffPolicy { threshold: 0.1 },
                non_finite(OPSM, "advantages", 1),
            )
        },
        CorrectionCase {
            advantages: vec![1.0, -1.0, 0.5],
            ..case(
                "OPSM: one advantage too many",
                lp(),
                lp(),
                on(),
                Correction::OffPolicy { threshold: 0.1 },
                Some(Error::ShapeMismatch {
                    op: OPSM,
                    what: "advantages",
                    expected: 2,
                    got: 3,
                }),
            )
        },
        case(
            "OPSM: an infinite threshold",
            lp(),
            lp(),
            on(),
            Correction::OffPolicy { threshold: INF },
            bad_param(OPSM, "threshold", INF, "finite"),
        ),
        case(
            "OPSM: a NaN current log-prob at a masked-in token",
            vec![-1.0, -0.5, -2.0, NAN],
            lp(),
            on(),
            Correction::OffPolicy { threshold: 0.1 },
            non_finite(OPSM, "logp", 3),
        ),
        case(
            "entropy: a quantile above 1",
            vec![0.1, 0.2, 0.3, 0.4],
            vec![0.0; 4],
            None,
            Correction::Entropy { top_quantile: 1.5 },
            bad_param(ENT, "top_quantile", 1.5, "in [0, 1]"),
        ),
        case(
            "entropy: a negative quantile",
            vec![0.1, 0.2, 0.3, 0.4],
            vec![0.0; 4],
            None,
            Correction::Entropy { top_quantile: -0.25 },
            bad_param(ENT, "top_quantile", -0.25, "in [0, 1]"),
        ),
        case(
            "entropy: a NaN at a masked-in token",
            vec![0.1, 0.2, NAN, 0.4],
            vec![0.0; 4],
            on(),
            Correction::Entropy { top_quantile: 0.2 },
            non_finite(ENT, "entropy", 2),
        ),
        case(
            "entropy: NaN in padding is never read",
            vec![0.1, NAN, 0.3, 0.4],
            vec![0.0; 4],
            Some(vec![1, 0, 1, 1]),
            Correction::Entropy { top_quantile: 0.2 },
            None,
        ),
    ]
}

/// The op a CUDA kernel names in its status word: the family's forward
/// (`Gpu::check` reports the forward's and backward's faults alike).
pub fn cuda_op(op: &'static str) -> &'static str {
    match op {
        "token_logprobs_backward" => "token_logprobs",
        "fused_linear_logprobs_backward" => "fused_linear_logprobs",
        "kl_divergence_backward" => "kl_divergence",
        "policy_loss_backward" => "policy_loss",
        "broadcast_to_tokens" => "group_advantages",
        "sampler_is_weights" | "off_policy_mask" | "high_entropy_mask" => "corrections",
        other => other,
    }
}
