//! The policy-gradient losses of GRPO and its successors (PPO's clipped
//! surrogate, TRL's two-sided "delta" clipping, CISPO, SAPO, VESPO, GSPO)
//! with an optional KL penalty and the aggregations used by TRL, verl and
//! DAPO; each setting of TRL 1.16's `GRPOTrainer` and of verl's policy
//! losses (commit b178a3c) maps to one configuration (table below).
//!
//! For token `t` of sequence `s`, with mask `m_t`, advantage `A_t`,
//! policy-gradient weight `pw_t` (1 without `pg_weights`) and
//! `C = log_ratio_clamp` (`+inf`: no clamp):
//!
//! ```text
//! lr_t   = logp_t - old_t                      (old = detached logp when absent: ratio 1)
//! Token:     r_t = exp(clamp(lr_t, -C, C))
//! Sequence:  r_t = exp(clamp(mean_{t' in s, m = 1} lr_t', -C, C))    (GSPO-token)
//! pg_t   = PolicyObjective:
//!   Clip { delta }:  -min(min(r_t, delta) A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
//!                    if dual clip c and A_t < 0:  pg_t = min(pg_t, -c A_t)
//!   Cispo { min_ratio, max_ratio }:  -sg(clamp(r_t, min_ratio, max_ratio)) A_t logp_t
//!   Sapo { tau_pos, tau_neg }:       -sigmoid(tau (r_t - 1)) 4 / tau A_t,  tau = tau_pos iff A_t > 0
//!   Vespo { k, lambda by A_t >= 0 }: -sg(phi_s) A_t logp_t,
//!        log w_s = clamp(sum_{t' in s, m = 1} clamp(lr_t', -20, 20), ln 1e-8, 20),
//!        phi_s   = exp(lambda + k log w_s - lambda w_s)   (0 if not finite; lambda >= 1e-4)
//! kl_t   = KlEstimator::value(ref_t - logp_t), times r_t with kl_bias_correction
//! l_t    = pw_t pg_t + beta kl_t
//! loss   = sum_t m_t w_t l_t
//! ```
//!
//! **Gradient.** `d r_t / d logp_t = r_t` at both importance levels: at the
//! sequence level the ratio's value is the sequence's, but its gradient flows
//! only through the token's own log-prob, `r_t = sg(r_s) exp(logp_t -
//! sg(logp_t))` (verl's `gspo` loss, "GSPO-token" in Zheng et al., "Group
//! Sequence Policy Optimization", 2025), and it is 0 where the log-ratio is
//! clamped (strictly beyond `C`). `Clip`'s `pg_t` takes the gradient of the
//! larger term, each term's clamp passing it inside its bounds (inclusive,
//! as `torch.clamp`; a tie splits it, as `torch.min`): `-A_t r_t` where the
//! unclipped term is taken with `r <= delta`, 0 where the ratio is clipped
//! (`r < 1 - eps_low` with `A < 0`, or `r > 1 + eps_high` with `A > 0`), beyond
//! `delta`, or where the dual clip binds. CISPO's and VESPO's gradient is
//! their detached weight, `-w A_t`; SAPO's `-A_t 4 s (1 - s) r_t` with `s`
//! the sigmoid. With the bias correction the KL term's derivative is
//! `r_t (dkl_t + kl_t)` (TRL does not detach the ratio). `pw_t` is detached.
//! The backward returns `dlogp_t = m_t (grad_loss w_t + grad_per_token_t) dl_t/dlogp_t`.
//!
//! **Aggregation** (`S` sequences, `L_s` masked-in tokens of sequence `s`,
//! `M` in all):
//!
//! | [`Aggregation`] | `w_t` | used by |
//! |---|---|---|
//! | `TokenMean { normalizer }` | `1 / normalizer`, default `max(1, M)` | DAPO, TRL "bnpo"/"dapo"/"cispo"/"vespo", verl "token-mean"; with `normalizer = loss_scale_factor`: verl "seq-mean-token-sum-norm" |
//! | `SeqMeanTokenMean` | `1 / (S max(1, L_s))` | GRPO paper, TRL "grpo"/"sapo", verl "seq-mean-token-mean" |
//! | `SeqMeanTokenSum` | `1 / S` | verl "seq-mean-token-sum", TRL "luspo" |
//! | `SeqMeanTokenSumNorm { constant }` | `1 / (S constant)` | Dr. GRPO, TRL "dr_grpo" (constant = max completion length); *not* verl's "seq-mean-token-sum-norm", which divides by its constant only |
//!
//! `S` counts every sequence of the layout, empty or fully masked ones too
//! (as TRL's `.mean()` over the batch does), or with
//! [`PolicyLossConfig::exclude_empty_seqs`] only those with a masked-in token
//! (verl's `agg_loss`; at least 1). A multi-GPU trainer passes the global
//! token count as `normalizer`.
//!
//! **Statistics** (means over masked-in tokens, 0 when there are none):
//! clip fractions as TRL logs them (`clip_ratio/low_mean`, `high_mean`; for
//! CISPO its `cispo_clip_ratio` is `clip_frac_high`, the ratio above
//! `max_ratio` with `A > 0`; SAPO and VESPO clip nothing), the dual-clip
//! fraction as verl's `pg_clipfrac_lower`, mean and max ratio, mean KL
//! (reported whenever `ref_logp` is given, also with `beta = 0`; the
//! bias-corrected value with the correction); then the sequence-level clip
//! fractions of TRL's `masked_seq_mean` (mean over all `S` sequences of each
//! one's fraction: TRL's `clip_ratio/*_mean` at the sequence level; the
//! smallest low and largest high fraction over non-empty sequences: TRL's
//! `clip_ratio/low_min` and `high_max`) and the divisor `S`. They are
//! returned with the loss in one small buffer, [`PolicyLoss::summary`], in a
//! fixed order ([`PolicyLossStats::LOSS`] and the other index constants), so
//! a CUDA kernel can write them all to one device buffer.
//!
//! **Reproducing TRL 1.16 and verl** (proven by the fixtures of
//! `tests/fixtures/policy_loss_reference.py`, which call TRL's own
//! `GRPOTrainer._compute_loss` and verl's functions copied verbatim):
//!
//! | Reference setting | Configuration |
//! |---|---|
//! | TRL `loss_type="grpo"` | `Clip { delta: None }`, `SeqMeanTokenMean`, `log_ratio_clamp: f32::INFINITY` |
//! | TRL `"bnpo"` | as "grpo" with `TokenMean { normalizer: None }` |
//! | TRL `"dr_grpo"` | as "grpo" with `SeqMeanTokenSumNorm { constant: max_completion_length }` |
//! | TRL `"dapo"` | as "grpo" with `TokenMean`, `normalizer` = `num_items_in_batch / num_processes` (`None` on one process) |
//! | TRL `"luspo"` | as "grpo" with `SeqMeanTokenSum` (with `importance_sampling_level="sequence"`: `ImportanceLevel::Sequence`) |
//! | TRL `"cispo"` | `Cispo { min_ratio: 0.0, max_ratio: epsilon_high }`, `TokenMean` as "dapo" |
//! | TRL `"sapo"` | `Sapo { tau_pos: sapo_temperature_pos, tau_neg: sapo_temperature_neg }`, `SeqMeanTokenMean` |
//! | TRL `"vespo"` | `Vespo { k_pos, lambda_pos, k_neg, lambda_neg }` (`vespo_*`), `TokenMean` as "dapo" |
//! | TRL `epsilon` / `epsilon_high` | `eps_low` / `eps_high` |
//! | TRL `delta` | `Clip { delta: Some(delta) }` |
//! | TRL `importance_sampling_level="sequence"` | `ImportanceLevel::Sequence` |
//! | TRL `beta` (k3) | `beta`, `KlEstimator::K3`, `ref_logp` |
//! | TRL `use_bias_correction_kl` | `kl_bias_correction: true` |
//! | TRL off-policy mask, `top_entropy_quantile` mask, vLLM `importance_sampling_ratio` | their product as `PolicyLossInputs::pg_weights` |
//! | verl `policy_loss="vanilla"` (`clip_ratio_low/high/c`) | `Clip { delta: None }`, `eps_low/high`, `dual_clip: Some(clip_ratio_c)`, clamp 20 |
//! | verl `"gspo"` | `Clip`, `ImportanceLevel::Sequence`, `log_ratio_clamp: 10.0`, `SeqMeanTokenMean`, `exclude_empty_seqs` |
//! | verl `"sapo"` (`tau_pos/neg`) | `Sapo`, clamp 20, `SeqMeanTokenMean`, `exclude_empty_seqs` |
//! | verl `"cispo"` | `Cispo { min_ratio: 1 - clip_ratio_low, max_ratio: 1 + clip_ratio_high }`, clamp 20 |
//! | verl `rollout_is_weights` | `pg_weights` |
//! | verl `use_kl_loss`, `kl_loss_type`, `kl_loss_coef` | `ref_logp`, `kl` (`"low_var_kl"`: `LowVarK3`), `beta` |
//! | verl `loss_agg_mode` "token-mean" / "seq-mean-token-mean" / "seq-mean-token-sum" | `TokenMean` / `SeqMeanTokenMean` / `SeqMeanTokenSum`, `exclude_empty_seqs: true` |
//! | verl "seq-mean-token-sum-norm" | `TokenMean { normalizer: Some(loss_scale_factor) }` (default: the padded length `T`) |
//!
//! Deliberate differences: the default clamp 20 (verl's; TRL clamps
//! nothing: set `f32::INFINITY`); verl's `gspo` clamps the log-ratio above
//! only (at 10; this crate on both sides); at the sequence level the SAPO
//! ratio's and the bias correction's gradient is GSPO-token's (each token's
//! own log-prob), which equals TRL's for per-sequence advantages and
//! uniform weights within a sequence but not with per-token advantages or
//! `pg_weights`; `clip_frac_low_seq_min` skips empty sequences, which TRL
//! counts (as 0) at the sequence level; VESPO's `importance_sampling_ratio`
//! input to the gamma weights (TRL, with vLLM) is not taken; VESPO is
//! token-level only. verl's CISPO `pg_clipfrac` (any ratio outside the
//! bounds) is not reported.
//!
//! **Masking and non-finite values** (the crate's [rule](crate::error)).
//! Masked-out tokens are never read: NaN there is fine, and their loss and
//! gradient are 0. So is the advantage of a sequence with no masked-in
//! token. A NaN or infinity in `logp`, `old_logp`, `ref_logp`, the
//! advantages, `pg_weights` (or the backward's `grad_per_token`) at a masked-in token is
//! an [`Error::NonFinite`] naming the first such token (or sequence, for
//! per-sequence advantages); so is a non-finite `grad_loss` (`index: 0`).
//! Finite inputs of extreme magnitude can still overflow f32 (`r A` with
//! `r` up to `e^C` and a huge advantage, a `k2` of a huge `d`, a sum of
//! large token losses, a ratio beyond f32 without a clamp): the first
//! token whose KL estimate, ratio or loss is not finite is `NonFinite` with
//! `what: "kl"`, `"ratio"` or `"per_token"` (in that order), a loss that
//! overflows in the aggregation is `what: "loss"` (`index: 0`), and the
//! backward's first non-finite gradient is `what: "dlogp"`.
//!
//! **Parameters.** `eps_low` lies in `[0, 1]` (the lower bound `1 - eps_low`
//! is a ratio; `eps_low = 1` turns lower clipping off), `eps_high >= 0`, the
//! dual clip `c > 1` (verl's `clip_ratio_c`, typically 3),
//! `log_ratio_clamp` in `(0, 88]` (so that the ratio `e^C` fits f32, whose
//! largest `e^x` is at `x = 88.72`) or `+inf` (no clamp: a ratio beyond f32
//! is then a `NonFinite` loss; `+inf` rather than an `Option` because an
//! infinite clamp *is* no clamp, on the GPU too, and the field keeps its
//! type), `beta >= 0`, and `ref_logp` is required when `beta != 0`; the
//! dual clip is `Clip`'s only; `delta > 0`; CISPO's `0 <= min_ratio <=
//! max_ratio`; SAPO's temperatures `> 0`; VESPO's `k` finite and `lambda >=
//! 0`, at the token level only ([`Error::Unsupported`] with
//! `ImportanceLevel::Sequence`). `pg_weights` must be `>= 0` at masked-in
//! tokens ([`Error::InvalidParameter`] on the host; the CUDA kernels report
//! a negative or non-finite one as non-finite data at its token).
//!
//! The CPU kernel runs one rayon task per run of sequences, each in
//! 2048-token blocks of 16-lane f32 accumulators, reduced to f64 per
//! block and combined in sequence order: the result does not depend on the
//! thread count.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{check, Error, Result};
use crate::memory::{opt_len, Host, Memory};
use crate::ops::kl::KlEstimator;
use crate::ops::layout::SeqLayout;
use crate::ops::math::{self, multiversion, MulAdd, BLOCK, LANES};

pub(crate) const OP: &str = "policy_loss";
pub(crate) const OP_BWD: &str = "policy_loss_backward";

/// Tokens per parallel task (rayon splits no finer).
const MIN_TASK_TOKENS: usize = 1 << 14;

/// The largest `log_ratio_clamp`: `e^88` is 1.7e38, and `e^88.73` overflows f32.
const MAX_LOG_RATIO_CLAMP: f64 = 88.0;

/// Advantages, per sequence or per token.
pub enum Advantage<'a, M: Memory = Host> {
    /// `[S]`: one value for every token of a sequence (GRPO's outcome advantages).
    PerSequence(M::Buf<'a, f32>),
    /// `[N]`: one value per token.
    PerToken(M::Buf<'a, f32>),
}

impl<'a> Advantage<'a, Host> {
    /// `[S]` advantages, one per sequence.
    pub fn per_sequence(values: &'a [f32]) -> Self {
        Advantage::PerSequence(values)
    }

    /// `[N]` advantages, one per token.
    pub fn per_token(values: &'a [f32]) -> Self {
        Advantage::PerToken(values)
    }
}

/// Where the importance ratio is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportanceLevel {
    /// Per token: `r_t = exp(logp_t - old_t)` (PPO, GRPO).
    #[default]
    Token,
    /// Per sequence, from the masked mean log-ratio (GSPO-token).
    Sequence,
}

/// How per-token losses sum to the loss; see the [module docs](self) for
/// which TRL `loss_type` and verl `loss_agg_mode` each reproduces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregation {
    /// `sum l / normalizer`, default `max(1, M)`.
    TokenMean {
        /// Token count to divide by, `> 0`; `None`: this batch's masked-in count.
        normalizer: Option<f32>,
    },
    /// Mean over sequences of each sequence's token mean.
    SeqMeanTokenMean,
    /// Mean over sequences of each sequence's token sum.
    SeqMeanTokenSum,
    /// Mean over sequences of each sequence's token sum divided by
    /// `constant`: Dr. GRPO, TRL's `dr_grpo` (`sum / (S constant)`). verl's
    /// `seq-mean-token-sum-norm` (`sum / loss_scale_factor`, no `S`) is
    /// `TokenMean { normalizer: Some(loss_scale_factor) }` instead.
    SeqMeanTokenSumNorm {
        /// Divisor of every sequence's sum, `> 0` (the max completion length).
        constant: f32,
    },
}

impl Default for Aggregation {
    /// GRPO's `SeqMeanTokenMean`.
    fn default() -> Self {
        Aggregation::SeqMeanTokenMean
    }
}

impl Aggregation {
    fn validate(self, op: &'static str) -> Result<()> {
        match self {
            Aggregation::TokenMean { normalizer: Some(x) } => {
                check::param(op, "normalizer", x as f64, x > 0.0, "finite and > 0")
            }
            Aggregation::SeqMeanTokenSumNorm { constant } => {
                check::param(op, "constant", constant as f64, constant > 0.0, "finite and > 0")
            }
            _ => Ok(()),
        }
    }

    /// The weight `w_t` of every masked-in token of a sequence with
    /// `seq_tokens` of them, in a batch of `seqs` sequences and `tokens`
    /// masked-in tokens.
    #[inline]
    pub fn weight(self, seq_tokens: usize, seqs: usize, tokens: usize) -> f64 {
        let s = seqs as f64;
        match self {
            Aggregation::TokenMean { normalizer } => {
                1.0 / normalizer.map_or(tokens.max(1) as f64, |x| x as f64)
            }
            Aggregation::SeqMeanTokenMean => 1.0 / (s * seq_tokens.max(1) as f64),
            Aggregation::SeqMeanTokenSum => 1.0 / s,
            Aggregation::SeqMeanTokenSumNorm { constant } => 1.0 / (s * constant as f64),
        }
    }
}

/// The per-token policy-gradient term `pg_t` (see the [module docs](self)
/// for the formulas and the TRL 1.16 / verl settings each reproduces).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PolicyObjective {
    /// PPO's clipped surrogate `-min(r' A, clip(r, 1 - eps_low, 1 + eps_high) A)`
    /// with `r' = min(r, delta)` (TRL's two-sided GRPO, `GRPOConfig.delta`;
    /// `None`: `r' = r`, plain PPO/GRPO/DAPO/GSPO, verl's `vanilla`/`gspo`).
    Clip {
        /// Upper bound of the unclipped ratio, finite and `> 0` (TRL
        /// recommends `> 1 + eps_high`); `None`: off.
        delta: Option<f32>,
    },
    /// CISPO (MiniMax-M1): `-sg(clamp(r, min_ratio, max_ratio)) A logp`, the
    /// clipped ratio a detached weight. TRL's `cispo`: `min_ratio = 0`,
    /// `max_ratio = epsilon_high`; verl's `cispo`: `min_ratio = 1 -
    /// clip_ratio_low`, `max_ratio = 1 + clip_ratio_high`.
    Cispo {
        /// Lower bound of the weight, finite and `>= 0`.
        min_ratio: f32,
        /// Upper bound of the weight, finite and `>= min_ratio`.
        max_ratio: f32,
    },
    /// SAPO (soft adaptive policy optimization): `-sigmoid(tau (r - 1)) 4 / tau A`,
    /// `tau = tau_pos` where `A > 0`, else `tau_neg` (TRL's `sapo` with
    /// `sapo_temperature_pos/neg`, verl's `sapo` with `tau_pos/neg`).
    Sapo {
        /// Temperature for `A > 0`, finite and `> 0`.
        tau_pos: f32,
        /// Temperature for `A <= 0`, finite and `> 0`.
        tau_neg: f32,
    },
    /// VESPO (TRL's `vespo`, `get_gamma_weights`): `-sg(phi_s) A logp` with
    /// the sequence weight `phi = e^lambda w^k e^(-lambda w)` of
    /// `log w = clamp(sum_{t in s, m = 1} clamp(lr_t, -20, 20), ln 1e-8, 20)`
    /// (`k, lambda` by the sign of `A >= 0`, `lambda` floored at 1e-4, a
    /// non-finite `phi` read as 0). Token-level importance only.
    Vespo {
        /// `k` for `A >= 0` (TRL `vespo_k_pos`, 2), finite.
        k_pos: f32,
        /// `lambda` for `A >= 0` (TRL `vespo_lambda_pos`, 3), finite and `>= 0`.
        lambda_pos: f32,
        /// `k` for `A < 0` (TRL `vespo_k_neg`, 3), finite.
        k_neg: f32,
        /// `lambda` for `A < 0` (TRL `vespo_lambda_neg`, 2), finite and `>= 0`.
        lambda_neg: f32,
    },
}

impl Default for PolicyObjective {
    /// `Clip { delta: None }`.
    fn default() -> Self {
        PolicyObjective::Clip { delta: None }
    }
}

/// VESPO's per-token log-ratio clamp and the clamp of the sequence sum
/// (TRL 1.16 `get_gamma_weights`).
pub(crate) const VESPO_TOKEN_CLAMP: f32 = 20.0;
/// `ln(1e-8)`, VESPO's lower bound of `log w`.
pub(crate) const VESPO_LOG_W_MIN: f32 = -18.420_681;
/// TRL's floor on VESPO's `lambda`.
const VESPO_LAMBDA_MIN: f32 = 1e-4;

impl PolicyObjective {
    fn validate(self, op: &'static str) -> Result<()> {
        match self {
            PolicyObjective::Clip { delta: Some(d) } => {
                check::param(op, "delta", d as f64, d > 0.0, "finite and > 0")
            }
            PolicyObjective::Clip { delta: None } => Ok(()),
            PolicyObjective::Cispo { min_ratio, max_ratio } => {
                check::param(
                    op,
                    "min_ratio",
                    min_ratio as f64,
                    min_ratio >= 0.0,
                    "finite and >= 0",
                )?;
                check::param(
                    op,
                    "max_ratio",
                    max_ratio as f64,
                    max_ratio >= min_ratio,
                    "finite and >= min_ratio",
                )
            }
            PolicyObjective::Sapo { tau_pos, tau_neg } => {
                check::param(op, "tau_pos", tau_pos as f64, tau_pos > 0.0, "finite and > 0")?;
                check::param(op, "tau_neg", tau_neg as f64, tau_neg > 0.0, "finite and > 0")
            }
            PolicyObjective::Vespo {
                k_pos,
                lambda_pos,
                k_neg,
                lambda_neg,
            } => {
                check::param(op, "k_pos", k_pos as f64, true, "finite")?;
                check::param(op, "k_neg", k_neg as f64, true, "finite")?;
                check::param(
                    op,
                    "lambda_pos",
                    lambda_pos as f64,
                    lambda_pos >= 0.0,
                    "finite and >= 0",
                )?;
                check::param(
                    op,
                    "lambda_neg",
                    lambda_neg as f64,
                    lambda_neg >= 0.0,
                    "finite and >= 0",
                )
            }
        }
    }

    /// Whether `pg_t` needs a sequence-level sum (VESPO's `log w`).
    pub(crate) fn is_sequence_weighted(self) -> bool {
        matches!(self, PolicyObjective::Vespo { .. })
    }
}

/// Parameters of [`policy_loss`] and its backward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossConfig {
    /// The policy-gradient term; default PPO/GRPO clipping.
    pub objective: PolicyObjective,
    /// Lower clip: the ratio is clipped below at `1 - eps_low`; in `[0, 1]`
    /// (used by `Clip` and by the clip statistics).
    pub eps_low: f32,
    /// Upper clip: the ratio is clipped above at `1 + eps_high` (DAPO's
    /// clip-higher uses 0.28); `>= 0`.
    pub eps_high: f32,
    /// Dual clip `c > 1` (Ye et al., 2020; verl's `clip_ratio_c`): for
    /// `A < 0` the loss is at most `-c A`. `Clip` only.
    pub dual_clip: Option<f32>,
    /// Log-ratios are clamped to `[-log_ratio_clamp, log_ratio_clamp]`
    /// before `exp` (verl: 20); in `(0, 88]`, so that `e^clamp` fits f32, or
    /// `f32::INFINITY`: no clamp, exactly as TRL (a ratio beyond f32 is then
    /// a `NonFinite` error, not a silently capped value).
    pub log_ratio_clamp: f32,
    /// Token or sequence importance ratio.
    pub importance: ImportanceLevel,
    /// KL penalty coefficient, `>= 0`; non-zero needs `ref_logp`.
    pub beta: f32,
    /// KL estimator of the penalty (and of the reported mean KL).
    pub kl: KlEstimator,
    /// TRL's `use_bias_correction_kl`: the KL term is `kl_t r_t`, the ratio
    /// differentiated too (`d/dlogp = r (dkl + kl)`).
    pub kl_bias_correction: bool,
    /// How token losses sum to the loss.
    pub aggregation: Aggregation,
    /// verl's convention for the `SeqMean*` aggregations: `S` counts only
    /// sequences with a masked-in token (`false`: every sequence, as TRL's
    /// `.mean()`).
    pub exclude_empty_seqs: bool,
}

impl Default for PolicyLossConfig {
    /// GRPO as R1-SGG trains it: `Clip` with `eps = 0.2` both sides, no dual
    /// clip, clamp 20, token ratios, `beta = 0` (k3 when enabled, no bias
    /// correction), sequence-mean of token-means over every sequence.
    fn default() -> Self {
        Self {
            objective: PolicyObjective::default(),
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            log_ratio_clamp: 20.0,
            importance: ImportanceLevel::Token,
            beta: 0.0,
            kl: KlEstimator::K3,
            kl_bias_correction: false,
            aggregation: Aggregation::SeqMeanTokenMean,
            exclude_empty_seqs: false,
        }
    }
}

/// One token's loss, its derivative and what the statistics count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TokenLoss {
    /// `l_t = pw_t pg_t + beta kl_t`.
    pub loss: f32,
    /// `dl_t / dlogp_t`.
    pub grad: f32,
    /// The importance ratio `r_t` (after the log-ratio clamp).
    pub ratio: f32,
    /// `kl_t` (times `r_t` with the bias correction).
    pub kl: f32,
    /// `r` below the objective's lower bound and `A < 0`.
    pub clip_low: bool,
    /// `r` above the objective's upper bound and `A > 0`.
    pub clip_high: bool,
    /// `A < 0` and the dual-clip bound `-c A` binds.
    pub dual_clip: bool,
}

/// One token's inputs to [`PolicyLossConfig::token_loss`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenIn {
    /// The (unclamped) importance log-ratio: the token's, or its sequence's mean.
    pub log_ratio: f32,
    /// `A_t`.
    pub adv: f32,
    /// `ref_logp - logp` (0 without a reference model).
    pub d_ref: f32,
    /// `logp_t` (CISPO's and VESPO's `pg` is linear in it).
    pub logp: f32,
    /// The detached weight of `pg_t` (1 when absent).
    pub pg_weight: f32,
    /// VESPO's clamped sequence `log w` (unused otherwise).
    pub seq_log_w: f32,
}

impl PolicyLossConfig {
    pub(crate) fn validate(&self, op: &'static str, has_ref: bool) -> Result<()> {
        let (lo, hi) = (self.eps_low as f64, self.eps_high as f64);
        check::param(
            op,
            "eps_low",
            lo,
            (0.0..=1.0).contains(&lo),
            "finite and in [0, 1]",
        )?;
        check::param(op, "eps_high", hi, hi >= 0.0, "finite and >= 0")?;
        if let Some(c) = self.dual_clip {
            check::param(op, "dual_clip", c as f64, c > 1.0, "finite and > 1")?;
            check::param(
                op,
                "dual_clip",
                c as f64,
                matches!(self.objective, PolicyObjective::Clip { .. }),
                "None unless the objective is Clip",
            )?;
        }
        let clamp = self.log_ratio_clamp as f64;
        if clamp != f64::INFINITY {
            check::param(
                op,
                "log_ratio_clamp",
                clamp,
                clamp > 0.0 && clamp <= MAX_LOG_RATIO_CLAMP,
                "in (0, 88] (e^clamp must fit f32) or +inf (no clamp)",
            )?;
        }
        let beta = self.beta as f64;
        check::param(op, "beta", beta, beta >= 0.0, "finite and >= 0")?;
        check::param(
            op,
            "beta",
            beta,
            beta == 0.0 || has_ref,
            "0 when `ref_logp` is None",
        )?;
        self.objective.validate(op)?;
        if self.objective.is_sequence_weighted() && self.importance == ImportanceLevel::Sequence {
            return Err(Error::Unsupported {
                op,
                reason: "VESPO weighs sequences itself: use ImportanceLevel::Token".into(),
            });
        }
        self.aggregation.validate(op)
    }

    /// `S`, the sequence count of the `SeqMean*` aggregations, from every
    /// sequence's masked-in count: all sequences, or with
    /// `exclude_empty_seqs` those with a token (at least 1).
    pub(crate) fn seq_divisor(&self, counts: impl ExactSizeIterator<Item = usize>) -> usize {
        if self.exclude_empty_seqs {
            counts.filter(|&c| c > 0).count().max(1)
        } else {
            counts.len()
        }
    }

    /// The loss of one token (see the module docs).
    #[inline(always)]
    pub(crate) fn token_loss<M: MulAdd>(&self, x: TokenIn) -> TokenLoss {
        let (log_ratio, adv) = (x.log_ratio, x.adv);
        let c = self.log_ratio_clamp;
        let clamped = log_ratio > c || log_ratio < -c;
        let lr = if log_ratio > c { c } else { log_ratio };
        let lr = if lr < -c { -c } else { lr };
        // Without a clamp, a ratio beyond f32 is infinite (`math::exp` caps).
        let ratio = if lr > MAX_LOG_RATIO_CLAMP as f32 + 0.5 {
            f32::INFINITY
        } else {
            math::exp::<M>(lr)
        };
        // d r / dlogp = r, or 0 where the log-ratio is clamped.
        let dratio = if clamped { 0.0 } else { ratio };

        let (mut clip_low, mut clip_high, mut dual_clip) = (false, false, false);
        let (pg, pg_grad) = match self.objective {
            PolicyObjective::Clip { delta } => {
                let (lo, hi) = (1.0 - self.eps_low, 1.0 + self.eps_high);
                let clipped_ratio = if ratio < lo { lo } else { ratio };
                let clipped_ratio = if clipped_ratio > hi { hi } else { clipped_ratio };
                clip_low = ratio < lo && adv < 0.0;
                clip_high = ratio > hi && adv > 0.0;
                let delta = delta.unwrap_or(f32::INFINITY);
                let capped = if ratio > delta { delta } else { ratio };
                // -min(r' A, clip(r) A) = max(-r' A, -clip(r) A); each term's
                // gradient flows where its clamp passes (bounds inclusive, as
                // torch.clamp), a tie splits it (as torch.min).
                let (unclipped, clipped) = (-adv * capped, -adv * clipped_ratio);
                let d_unclipped = if ratio <= delta { -adv * dratio } else { 0.0 };
                let d_clipped = if ratio >= lo && ratio <= hi {
                    -adv * dratio
                } else {
                    0.0
                };
                let (pg, grad) = if unclipped > clipped {
                    (unclipped, d_unclipped)
                } else if clipped > unclipped {
                    (clipped, d_clipped)
                } else {
                    (unclipped, 0.5 * (d_unclipped + d_clipped))
                };
                let dual_bound = -self.dual_clip.unwrap_or(f32::INFINITY) * adv;
                dual_clip = adv < 0.0 && pg > dual_bound;
                if dual_clip {
                    (dual_bound, 0.0)
                } else {
                    (pg, grad)
                }
            }
            PolicyObjective::Cispo { min_ratio, max_ratio } => {
                clip_low = ratio < min_ratio && adv < 0.0;
                clip_high = ratio > max_ratio && adv > 0.0;
                let w = if ratio < min_ratio { min_ratio } else { ratio };
                let w = if w > max_ratio { max_ratio } else { w };
                (-w * adv * x.logp, -w * adv)
            }
            PolicyObjective::Sapo { tau_pos, tau_neg } => {
                let tau = if adv > 0.0 { tau_pos } else { tau_neg };
                // s = sigmoid(z) = 1 / (1 + e^-z); 1 - s = e^-z s where s
                // is near 1 (no cancellation); d/dr (s 4 / tau) = 4 s (1 - s).
                let e = math::exp::<M>(-tau * (ratio - 1.0));
                let s = 1.0 / (1.0 + e);
                let one_minus_s = if e < 1.0 { e * s } else { 1.0 - s };
                (-s * (4.0 / tau) * adv, -adv * 4.0 * s * one_minus_s * dratio)
            }
            PolicyObjective::Vespo {
                k_pos,
                lambda_pos,
                k_neg,
                lambda_neg,
            } => {
                let (k, lambda) = if adv >= 0.0 {
                    (k_pos, lambda_pos)
                } else {
                    (k_neg, lambda_neg)
                };
                let lambda = if lambda < VESPO_LAMBDA_MIN {
                    VESPO_LAMBDA_MIN
                } else {
                    lambda
                };
                let log_phi = lambda + k * x.seq_log_w - lambda * math::exp::<M>(x.seq_log_w);
                // e^log_phi overflowing is TRL's posinf, read as 0.
                let phi = if log_phi > MAX_LOG_RATIO_CLAMP as f32 {
                    0.0
                } else {
                    math::exp::<M>(log_phi)
                };
                (-phi * adv * x.logp, -phi * adv)
            }
        };

        let kl = self.kl.value_with::<M>(x.d_ref);
        let dkl = self.kl.grad_logp_with::<M>(x.d_ref);
        let (kl, dkl) = if self.kl_bias_correction {
            (kl * ratio, dkl * ratio + kl * dratio)
        } else {
            (kl, dkl)
        };
        TokenLoss {
            loss: x.pg_weight * pg + self.beta * kl,
            grad: x.pg_weight * pg_grad + self.beta * dkl,
            ratio,
            kl,
            clip_low,
            clip_high,
            dual_clip,
        }
    }
}

/// Inputs of [`policy_loss`], `N` tokens in `S` sequences.
pub struct PolicyLossInputs<'a, M: Memory = Host> {
    /// `[N]` log-probs of the sampled tokens under the policy (differentiated).
    pub logp: M::Buf<'a, f32>,
    /// `[N]` log-probs under the sampling policy; `None`: on-policy, the
    /// detached `logp` (ratio 1, gradient `r`).
    pub old_logp: Option<M::Buf<'a, f32>>,
    /// `[N]` log-probs under the reference model, for the KL term.
    pub ref_logp: Option<M::Buf<'a, f32>>,
    /// Per-sequence `[S]` or per-token `[N]` advantages.
    pub advantages: Advantage<'a, M>,
    /// `[N]`: 0 = padding (never read), any other value = 1; `None`: every token counts.
    pub mask: Option<M::Buf<'a, u8>>,
    /// `[N]` detached weights of the policy-gradient term only, finite and
    /// `>= 0` at masked-in tokens: `l_t = pw_t pg_t + beta kl_t`, as TRL
    /// multiplies `per_token_loss` by its off-policy mask, entropy mask and
    /// vLLM importance-sampling ratio before adding `beta * kl`; `None`: 1.
    pub pg_weights: Option<M::Buf<'a, f32>>,
    /// How the `N` tokens group into sequences.
    pub layout: SeqLayout<'a, M>,
}

impl<M: Memory> PolicyLossInputs<'_, M> {
    /// Checks every length and the parameters; returns `(N, S)`.
    pub(crate) fn validate(&self, op: &'static str, cfg: &PolicyLossConfig) -> Result<(usize, usize)> {
        let n = M::len(&self.logp);
        check::non_empty(op, "logp", n)?;
        let seqs = self.layout.validate_shape(op, n)?;
        if let Some(len) = opt_len::<M, f32>(&self.old_logp) {
            check::len(op, "old_logp", n, len)?;
        }
        if let Some(len) = opt_len::<M, f32>(&self.ref_logp) {
            check::len(op, "ref_logp", n, len)?;
        }
        if let Some(len) = opt_len::<M, u8>(&self.mask) {
            check::len(op, "mask", n, len)?;
        }
        if let Some(len) = opt_len::<M, f32>(&self.pg_weights) {
            check::len(op, "pg_weights", n, len)?;
        }
        match &self.advantages {
            Advantage::PerSequence(a) => check::len(op, "advantages (per sequence)", seqs, M::len(a))?,
            Advantage::PerToken(a) => check::len(op, "advantages (per token)", n, M::len(a))?,
        }
        cfg.validate(op, self.ref_logp.is_some())?;
        Ok((n, seqs))
    }
}

impl<'a> PolicyLossInputs<'a, Host> {
    /// On-policy inputs with no reference model and no mask.
    pub fn new(logp: &'a [f32], advantages: Advantage<'a>, layout: SeqLayout<'a>) -> Self {
        Self {
            logp,
            old_logp: None,
            ref_logp: None,
            advantages,
            mask: None,
            pg_weights: None,
            layout,
        }
    }

    /// The same inputs with the sampling policy's log-probs.
    pub fn with_old(self, old_logp: &'a [f32]) -> Self {
        Self {
            old_logp: Some(old_logp),
            ..self
        }
    }

    /// The same inputs with the reference model's log-probs.
    pub fn with_ref(self, ref_logp: &'a [f32]) -> Self {
        Self {
            ref_logp: Some(ref_logp),
            ..self
        }
    }

    /// The same inputs with a mask (0 = padding).
    pub fn with_mask(self, mask: &'a [u8]) -> Self {
        Self {
            mask: Some(mask),
            ..self
        }
    }

    /// The same inputs with detached weights of the policy-gradient term.
    pub fn with_pg_weights(self, pg_weights: &'a [f32]) -> Self {
        Self {
            pg_weights: Some(pg_weights),
            ..self
        }
    }

    /// Full host validation of lengths, parameters and offsets; returns
    /// each sequence's token range.
    fn validate_host(&self, op: &'static str, cfg: &PolicyLossConfig) -> Result<Vec<Range<usize>>> {
        let (n, _) = self.validate(op, cfg)?;
        self.layout.validate(op, n)?;
        Ok(self.layout.ranges().collect())
    }

    /// Sequence `s`'s inputs, with absent ones resolved: `old = logp` gives
    /// log-ratio 0, `ref = logp` gives `d = 0` (KL 0, gradient 0).
    fn seq<'b>(&'b self, s: usize, range: Range<usize>, grad_per_token: Option<&'b [f32]>) -> SeqData<'b> {
        let logp = &self.logp[range.clone()];
        SeqData {
            logp,
            old: self.old_logp.map_or(logp, |o| &o[range.clone()]),
            ref_logp: self.ref_logp.map_or(logp, |r| &r[range.clone()]),
            adv: match self.advantages {
                Advantage::PerSequence(a) => SeqAdv::Const(a[s]),
                Advantage::PerToken(a) => SeqAdv::Tokens(&a[range.clone()]),
            },
            mask: self.mask.map(|m| &m[range.clone()]),
            pg_weights: self.pg_weights.map(|w| &w[range.clone()]),
            grad_per_token: grad_per_token.map(|g| &g[range]),
        }
    }

    /// Every token's importance ratio `r_t` (for the error path).
    fn ratios(&self, cfg: &PolicyLossConfig, ranges: &[Range<usize>]) -> Vec<f32> {
        let mut out = vec![0.0; self.logp.len()];
        for range in ranges {
            let old = |t: usize| self.old_logp.map_or(self.logp[t], |o| o[t]);
            let active: Vec<usize> = range
                .clone()
                .filter(|&t| self.mask.is_none_or(|m| m[t] != 0))
                .collect();
            let mean = active
                .iter()
                .map(|&t| (self.logp[t] - old(t)) as f64)
                .sum::<f64>()
                / active.len().max(1) as f64;
            for &t in &active {
                let log_ratio = match cfg.importance {
                    ImportanceLevel::Token => self.logp[t] - old(t),
                    ImportanceLevel::Sequence => mean as f32,
                };
                let x = TokenIn {
                    log_ratio,
                    adv: 0.0,
                    d_ref: 0.0,
                    logp: 0.0,
                    pg_weight: 1.0,
                    seq_log_w: 0.0,
                };
                out[t] = cfg.token_loss::<math::Baseline>(x).ratio;
            }
        }
        out
    }

    /// Errors on the first non-finite value (or negative `pg_weights`) read
    /// at a masked-in token, else
    /// on the first non-finite value of `results` (`(what, values)`, `[N]`
    /// each) at one (run only once a kernel has seen one: the kernels check
    /// as they go).
    fn check_finite(
        &self,
        op: &'static str,
        ranges: &[Range<usize>],
        grad_per_token: Option<&[f32]>,
        results: &[(&'static str, &[f32])],
    ) -> Result<()> {
        let bad = |x: f32| !x.is_finite();
        for (s, range) in ranges.iter().enumerate() {
            for t in range.clone() {
                if self.mask.is_some_and(|m| m[t] == 0) {
                    continue;
                }
                let found = if bad(self.logp[t]) {
                    Some(("logp", t))
                } else if self.old_logp.is_some_and(|o| bad(o[t])) {
                    Some(("old_logp", t))
                } else if self.ref_logp.is_some_and(|r| bad(r[t])) {
                    Some(("ref_logp", t))
                } else if self.pg_weights.is_some_and(|w| bad(w[t])) {
                    Some(("pg_weights", t))
                } else if let Some(w) = self.pg_weights.filter(|w| w[t] < 0.0) {
                    // A weight is a parameter of the loss: a negative one is
                    // refused as such (the kernels flag it with the non-finite).
                    return Err(Error::InvalidParameter {
                        op,
                        name: "pg_weights",
                        value: w[t] as f64,
                        expected: "finite and >= 0 at masked-in tokens",
                    });
                } else if grad_per_token.is_some_and(|g| bad(g[t])) {
                    Some(("grad_per_token", t))
                } else {
                    match self.advantages {
                        Advantage::PerSequence(a) if bad(a[s]) => Some(("advantages (per sequence)", s)),
                        Advantage::PerToken(a) if bad(a[t]) => Some(("advantages (per token)", t)),
                        _ => None,
                    }
                };
                if let Some((what, index)) = found {
                    return Err(Error::NonFinite { op, what, index });
                }
            }
        }
        let active = |t: &usize| self.mask.is_none_or(|m| m[*t] != 0);
        for &(what, values) in results {
            if let Some(index) = (0..values.len()).filter(active).find(|&t| !values[t].is_finite()) {
                return Err(Error::NonFinite { op, what, index });
            }
        }
        Ok(())
    }
}

/// Results of [`policy_loss`].
#[derive(Debug, Clone)]
pub struct PolicyLoss<M: Memory = Host> {
    /// `[N]`: `m_t l_t`, unweighted.
    pub per_token: M::Owned<f32>,
    /// `[PolicyLossStats::SUMMARY_LEN]`: the loss and statistics in the
    /// order of [`PolicyLossStats`]'s index constants, loss first.
    pub summary: M::Owned<f32>,
}

impl PolicyLoss<Host> {
    /// The aggregated loss.
    pub fn loss(&self) -> f32 {
        self.summary[PolicyLossStats::LOSS]
    }

    /// The summary buffer as named fields.
    pub fn stats(&self) -> PolicyLossStats {
        PolicyLossStats::from_summary(&self.summary)
    }
}

/// The loss and statistics of a batch; every field but `loss` and `tokens`
/// is a mean over masked-in tokens (0 when there are none).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyLossStats {
    /// The aggregated loss.
    pub loss: f32,
    /// Fraction with `r < 1 - eps_low` and `A < 0` (TRL's `clip_ratio/low_mean`).
    pub clip_frac_low: f32,
    /// Fraction with `r > 1 + eps_high` and `A > 0` (TRL's `clip_ratio/high_mean`).
    pub clip_frac_high: f32,
    /// Fraction with `A < 0` where the dual clip binds (verl's `pg_clipfrac_lower`).
    pub dual_clip_frac: f32,
    /// Mean importance ratio.
    pub ratio_mean: f32,
    /// Largest importance ratio (0 with no tokens).
    pub ratio_max: f32,
    /// Mean KL estimate (0 without `ref_logp`).
    pub kl_mean: f32,
    /// Number of masked-in tokens `M`.
    pub tokens: f32,
    /// Mean over all `S` sequences of each one's fraction of tokens counted
    /// by `clip_frac_low` (0 for an empty one): TRL's `clip_ratio/low_mean`
    /// at `importance_sampling_level="sequence"`.
    pub clip_frac_low_seq: f32,
    /// As `clip_frac_low_seq`, of `clip_frac_high`'s tokens (TRL's
    /// `clip_ratio/high_mean` at the sequence level).
    pub clip_frac_high_seq: f32,
    /// Smallest fraction of a non-empty sequence's tokens counted by
    /// `clip_frac_low` (TRL's `clip_ratio/low_min`); 0 with no tokens.
    pub clip_frac_low_seq_min: f32,
    /// Largest fraction of a non-empty sequence's tokens counted by
    /// `clip_frac_high` (TRL's `clip_ratio/high_max`); 0 with no tokens.
    pub clip_frac_high_seq_max: f32,
    /// `S`, the sequences the `SeqMean*` aggregations divide by: all, or
    /// with `exclude_empty_seqs` those with a masked-in token (at least 1).
    pub seqs: f32,
}

impl PolicyLossStats {
    /// Index of [`Self::loss`] in the summary buffer.
    pub const LOSS: usize = 0;
    /// Index of [`Self::clip_frac_low`].
    pub const CLIP_FRAC_LOW: usize = 1;
    /// Index of [`Self::clip_frac_high`].
    pub const CLIP_FRAC_HIGH: usize = 2;
    /// Index of [`Self::dual_clip_frac`].
    pub const DUAL_CLIP_FRAC: usize = 3;
    /// Index of [`Self::ratio_mean`].
    pub const RATIO_MEAN: usize = 4;
    /// Index of [`Self::ratio_max`].
    pub const RATIO_MAX: usize = 5;
    /// Index of [`Self::kl_mean`].
    pub const KL_MEAN: usize = 6;
    /// Index of [`Self::tokens`].
    pub const TOKENS: usize = 7;
    /// Index of [`Self::clip_frac_low_seq`].
    pub const CLIP_FRAC_LOW_SEQ: usize = 8;
    /// Index of [`Self::clip_frac_high_seq`].
    pub const CLIP_FRAC_HIGH_SEQ: usize = 9;
    /// Index of [`Self::clip_frac_low_seq_min`].
    pub const CLIP_FRAC_LOW_SEQ_MIN: usize = 10;
    /// Index of [`Self::clip_frac_high_seq_max`].
    pub const CLIP_FRAC_HIGH_SEQ_MAX: usize = 11;
    /// Index of [`Self::seqs`].
    pub const SEQS: usize = 12;
    /// Length of the summary buffer.
    pub const SUMMARY_LEN: usize = 13;

    /// The fields, in summary order.
    pub fn to_summary(&self) -> [f32; Self::SUMMARY_LEN] {
        [
            self.loss,
            self.clip_frac_low,
            self.clip_frac_high,
            self.dual_clip_frac,
            self.ratio_mean,
            self.ratio_max,
            self.kl_mean,
            self.tokens,
            self.clip_frac_low_seq,
            self.clip_frac_high_seq,
            self.clip_frac_low_seq_min,
            self.clip_frac_high_seq_max,
            self.seqs,
        ]
    }

    /// Reads a summary buffer (of at least [`Self::SUMMARY_LEN`] values).
    pub fn from_summary(s: &[f32]) -> Self {
        Self {
            loss: s[Self::LOSS],
            clip_frac_low: s[Self::CLIP_FRAC_LOW],
            clip_frac_high: s[Self::CLIP_FRAC_HIGH],
            dual_clip_frac: s[Self::DUAL_CLIP_FRAC],
            ratio_mean: s[Self::RATIO_MEAN],
            ratio_max: s[Self::RATIO_MAX],
            kl_mean: s[Self::KL_MEAN],
            tokens: s[Self::TOKENS],
            clip_frac_low_seq: s[Self::CLIP_FRAC_LOW_SEQ],
            clip_frac_high_seq: s[Self::CLIP_FRAC_HIGH_SEQ],
            clip_frac_low_seq_min: s[Self::CLIP_FRAC_LOW_SEQ_MIN],
            clip_frac_high_seq_max: s[Self::CLIP_FRAC_HIGH_SEQ_MAX],
            seqs: s[Self::SEQS],
        }
    }
}

/// The loss, its per-token terms and statistics.
///
/// Errors: empty `logp`; an invalid layout; a length that disagrees with `N`
/// (`old_logp`, `ref_logp`, `mask`, `pg_weights`, per-token advantages) or
/// `S` (per-sequence advantages); a parameter out of range (see the module
/// docs); a non-finite input at a masked-in token, or a negative
/// `pg_weights` there (`InvalidParameter`, the first by position).
pub fn policy_loss(inputs: &PolicyLossInputs<'_>, cfg: &PolicyLossConfig) -> Result<PolicyLoss> {
    let mut per_token = vec![0.0f32; inputs.logp.len()];
    let mut summary = vec![0.0f32; PolicyLossStats::SUMMARY_LEN];
    policy_loss_into(inputs, cfg, &mut per_token, &mut summary)?;
    Ok(PolicyLoss { per_token, summary })
}

/// [`policy_loss`] into caller-provided buffers: `per_token` `[N]` and
/// `summary` `[PolicyLossStats::SUMMARY_LEN]`, every element written
/// (unspecified after an error). With the buffers reused, a loop of calls
/// allocates nothing beyond a few per-sequence values. Errors: those of
/// [`policy_loss`], and the buffers' lengths.
pub fn policy_loss_into(
    inputs: &PolicyLossInputs<'_>,
    cfg: &PolicyLossConfig,
    per_token: &mut [f32],
    summary: &mut [f32],
) -> Result<()> {
    let ranges = inputs.validate_host(OP, cfg)?;
    check::len(OP, "per_token (output)", inputs.logp.len(), per_token.len())?;
    check::len(
        OP,
        "summary (output)",
        PolicyLossStats::SUMMARY_LEN,
        summary.len(),
    )?;
    let outs = split_by_ranges(per_token, &ranges);
    let sums: Vec<SeqSums> = ranges
        .par_iter()
        .zip(outs)
        .enumerate()
        .with_min_len(min_seqs_per_task(&ranges))
        .map(|(s, (range, out))| seq_forward(cfg, &inputs.seq(s, range.clone(), None), out))
        .collect();
    if sums.iter().any(|s| !s.finite) {
        // Only on the error path: the KL estimates and ratios (a ratio
        // beyond f32 without a clamp), to name an overflowing one.
        let kl: Vec<f32> = inputs.ref_logp.map_or_else(Vec::new, |r| {
            r.iter()
                .zip(inputs.logp)
                .map(|(&r, &l)| cfg.kl.value_with::<math::Baseline>(r - l))
                .collect()
        });
        let ratio = inputs.ratios(cfg, &ranges);
        inputs.check_finite(
            OP,
            &ranges,
            None,
            &[("kl", &kl), ("ratio", &ratio), ("per_token", per_token)],
        )?;
    }

    let tokens: usize = sums.iter().map(|s| s.tokens).sum();
    let seqs = cfg.seq_divisor(sums.iter().map(|s| s.tokens));
    let mut total = SeqSums::default();
    let mut loss = 0.0f64;
    let mut seq_clip = SeqClipStats::default();
    for s in &sums {
        loss += cfg.aggregation.weight(s.tokens, seqs, tokens) * s.loss;
        total.merge(s);
        seq_clip.add(s.tokens, s.clip_low, s.clip_high);
    }
    let (clip_frac_low_seq, clip_frac_high_seq, clip_frac_low_seq_min, clip_frac_high_seq_max) =
        seq_clip.finish(ranges.len());
    let mean = |x: f64| {
        if tokens == 0 {
            0.0
        } else {
            (x / tokens as f64) as f32
        }
    };
    let stats = PolicyLossStats {
        loss: loss as f32,
        clip_frac_low: mean(total.clip_low),
        clip_frac_high: mean(total.clip_high),
        dual_clip_frac: mean(total.dual_clip),
        ratio_mean: mean(total.ratio),
        ratio_max: if tokens == 0 { 0.0 } else { total.ratio_max },
        kl_mean: mean(total.kl),
        tokens: tokens as f32,
        clip_frac_low_seq,
        clip_frac_high_seq,
        clip_frac_low_seq_min,
        clip_frac_high_seq_max,
        seqs: seqs as f32,
    };
    if !stats.loss.is_finite() {
        return Err(Error::NonFinite {
            op: OP,
            what: "loss",
            index: 0,
        });
    }
    summary.copy_from_slice(&stats.to_summary());
    Ok(())
}

/// `dL/dlogp` for `L = grad_loss * loss + sum_t grad_per_token_t * per_token_t`:
/// `dlogp_t = m_t (grad_loss w_t + grad_per_token_t) dl_t/dlogp_t`, `[N]`.
///
/// Errors: as [`policy_loss`] (but for the loss's own overflow), plus a
/// non-finite `grad_loss`, `grad_per_token`'s length or a non-finite value
/// at a masked-in token, and a gradient that overflows (`what: "dlogp"`).
pub fn policy_loss_backward(
    inputs: &PolicyLossInputs<'_>,
    cfg: &PolicyLossConfig,
    grad_loss: f32,
    grad_per_token: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let mut dlogp = vec![0.0f32; inputs.logp.len()];
    policy_loss_backward_into(inputs, cfg, grad_loss, grad_per_token, &mut dlogp)?;
    Ok(dlogp)
}

/// [`policy_loss_backward`] into a caller's buffer `dlogp` `[N]`, every
/// element written (unspecified after an error). Errors: those of
/// [`policy_loss_backward`], and `dlogp`'s length.
pub fn policy_loss_backward_into(
    inputs: &PolicyLossInputs<'_>,
    cfg: &PolicyLossConfig,
    grad_loss: f32,
    grad_per_token: Option<&[f32]>,
    dlogp: &mut [f32],
) -> Result<()> {
    let ranges = inputs.validate_host(OP_BWD, cfg)?;
    let n = inputs.logp.len();
    check::len(OP_BWD, "dlogp (output)", n, dlogp.len())?;
    if !grad_loss.is_finite() {
        return Err(Error::NonFinite {
            op: OP_BWD,
            what: "grad_loss",
            index: 0,
        });
    }
    if let Some(g) = grad_per_token {
        check::len(OP_BWD, "grad_per_token", n, g.len())?;
    }
    let min_seqs = min_seqs_per_task(&ranges);
    // Token weights need every sequence's masked-in count first.
    let counts: Vec<usize> = ranges
        .par_iter()
        .enumerate()
        .with_min_len(min_seqs)
        .map(|(s, range)| inputs.seq(s, range.clone(), None).tokens())
        .collect();
    let tokens = counts.iter().sum();
    let seqs = cfg.seq_divisor(counts.iter().copied());

    let outs = split_by_ranges(dlogp, &ranges);
    let finite = ranges
        .par_iter()
        .zip(outs)
        .zip(&counts)
        .enumerate()
        .with_min_len(min_seqs)
        .map(|(s, ((range, out), &count))| {
            let seq = inputs.seq(s, range.clone(), grad_per_token);
            let w = cfg.aggregation.weight(count, seqs, tokens) as f32;
            seq_backward(cfg, &seq, grad_loss * w, out)
        })
        .reduce(|| true, |a, b| a && b);
    if !finite {
        inputs.check_finite(OP_BWD, &ranges, grad_per_token, &[("dlogp", dlogp)])?;
    }
    Ok(())
}

/// Sequences per rayon task, so that a task holds about `MIN_TASK_TOKENS`.
fn min_seqs_per_task(ranges: &[Range<usize>]) -> usize {
    let tokens = ranges.last().map_or(0, |r| r.end);
    (MIN_TASK_TOKENS * ranges.len() / tokens.max(1)).max(1)
}

/// `buf` cut into the given consecutive ranges (which start at 0 and
/// cover it, as validated layouts do).
fn split_by_ranges<'b>(mut buf: &'b mut [f32], ranges: &[Range<usize>]) -> Vec<&'b mut [f32]> {
    ranges
        .iter()
        .map(|r| {
            let (head, tail) = std::mem::take(&mut buf).split_at_mut(r.len());
            buf = tail;
            head
        })
        .collect()
}

/// A sequence's advantage source.
#[derive(Clone, Copy)]
enum SeqAdv<'a> {
    Const(f32),
    Tokens(&'a [f32]),
}

/// One sequence's inputs, absent ones resolved (see `PolicyLossInputs::seq`).
struct SeqData<'a> {
    logp: &'a [f32],
    old: &'a [f32],
    ref_logp: &'a [f32],
    adv: SeqAdv<'a>,
    mask: Option<&'a [u8]>,
    pg_weights: Option<&'a [f32]>,
    grad_per_token: Option<&'a [f32]>,
}

/// `LANES` consecutive tokens, loaded for the branch-free lane loops; lanes
/// past the sequence's end are inactive.
struct Lanes {
    logp: [f32; LANES],
    old: [f32; LANES],
    ref_logp: [f32; LANES],
    adv: [f32; LANES],
    pg_weight: [f32; LANES],
    grad: [f32; LANES],
    active: [bool; LANES],
}

impl SeqData<'_> {
    fn len(&self) -> usize {
        self.logp.len()
    }

    /// Number of masked-in tokens.
    fn tokens(&self) -> usize {
        self.mask
            .map_or(self.len(), |m| m.iter().map(|&x| (x != 0) as usize).sum())
    }

    /// Tokens `at..at + LANES` (fewer at the end).
    #[inline(always)]
    fn load(&self, at: usize) -> Lanes {
        // A constant length for full chunks, so the copies become vector moves.
        match self.len() - at {
            k if k >= LANES => self.load_span(at, LANES),
            k => self.load_span(at, k),
        }
    }

    #[inline(always)]
    fn load_span(&self, at: usize, k: usize) -> Lanes {
        let mut x = Lanes {
            logp: [0.0; LANES],
            old: [0.0; LANES],
            ref_logp: [0.0; LANES],
            adv: [0.0; LANES],
            pg_weight: [1.0; LANES],
            grad: [0.0; LANES],
            active: [false; LANES],
        };
        let span = at..at + k;
        x.logp[..k].copy_from_slice(&self.logp[span.clone()]);
        x.old[..k].copy_from_slice(&self.old[span.clone()]);
        x.ref_logp[..k].copy_from_slice(&self.ref_logp[span.clone()]);
        match self.adv {
            SeqAdv::Const(a) => x.adv[..k].fill(a),
            SeqAdv::Tokens(a) => x.adv[..k].copy_from_slice(&a[span.clone()]),
        }
        if let Some(w) = self.pg_weights {
            x.pg_weight[..k].copy_from_slice(&w[span.clone()]);
        }
        if let Some(g) = self.grad_per_token {
            x.grad[..k].copy_from_slice(&g[span.clone()]);
        }
        match self.mask {
            None => x.active[..k].fill(true),
            Some(m) => {
                for (a, &mi) in x.active[..k].iter_mut().zip(&m[span]) {
                    *a = mi != 0;
                }
            }
        }
        x
    }

    /// Writes the first `min(LANES, len - at)` lanes of `values` at `at`.
    #[inline(always)]
    fn store(out: &mut [f32], at: usize, values: &[f32; LANES]) {
        match out.len() - at {
            k if k >= LANES => out[at..at + LANES].copy_from_slice(values),
            k => out[at..at + k].copy_from_slice(&values[..k]),
        }
    }

    /// `(masked-in tokens, their sum of log-ratios each clamped to
    /// `[-clamp, clamp]`)`.
    #[inline(always)]
    fn log_ratio_sum(&self, clamp: f32) -> (usize, f64) {
        let (mut tokens, mut sum) = (0usize, 0.0f64);
        for block in (0..self.len()).step_by(BLOCK) {
            let mut acc = [0.0f32; LANES];
            let mut count = [0u32; LANES];
            for at in (block..self.len().min(block + BLOCK)).step_by(LANES) {
                let x = self.load(at);
                for i in 0..LANES {
                    let lr = x.logp[i] - x.old[i];
                    let lr = if lr > clamp { clamp } else { lr };
                    let lr = if lr < -clamp { -clamp } else { lr };
                    acc[i] += if x.active[i] { lr } else { 0.0 };
                    count[i] += x.active[i] as u32;
                }
            }
            sum += acc.iter().map(|&v| v as f64).sum::<f64>();
            tokens += count.iter().sum::<u32>() as usize;
        }
        (tokens, sum)
    }

    /// The masked-in token count and the sequence-level values of `cfg`'s
    /// loss, from one pass over the sequence where it needs one.
    #[inline(always)]
    fn context(&self, cfg: &PolicyLossConfig) -> (usize, SeqContext) {
        if cfg.importance == ImportanceLevel::Sequence {
            let (tokens, sum) = self.log_ratio_sum(f32::INFINITY);
            let log_ratio = (sum / tokens.max(1) as f64) as f32;
            (
                tokens,
                SeqContext {
                    log_ratio: Some(log_ratio),
                    log_w: 0.0,
                },
            )
        } else if cfg.objective.is_sequence_weighted() {
            let (tokens, sum) = self.log_ratio_sum(VESPO_TOKEN_CLAMP);
            let log_w = (sum as f32).clamp(VESPO_LOG_W_MIN, VESPO_TOKEN_CLAMP);
            (
                tokens,
                SeqContext {
                    log_ratio: None,
                    log_w,
                },
            )
        } else {
            (
                self.tokens(),
                SeqContext {
                    log_ratio: None,
                    log_w: 0.0,
                },
            )
        }
    }

    /// The inputs of lane `i`'s [`PolicyLossConfig::token_loss`].
    #[inline(always)]
    fn token_in(x: &Lanes, i: usize, ctx: SeqContext) -> TokenIn {
        TokenIn {
            log_ratio: ctx.log_ratio.unwrap_or(x.logp[i] - x.old[i]),
            adv: x.adv[i],
            d_ref: x.ref_logp[i] - x.logp[i],
            logp: x.logp[i],
            pg_weight: x.pg_weight[i],
            seq_log_w: ctx.log_w,
        }
    }

    /// Whether every input of lane `i` is finite, or the lane is inactive.
    #[inline(always)]
    fn lane_finite(x: &Lanes, i: usize) -> bool {
        let all = x.logp[i].is_finite()
            & x.old[i].is_finite()
            & x.ref_logp[i].is_finite()
            & x.adv[i].is_finite()
            & x.pg_weight[i].is_finite()
            & (x.pg_weight[i] >= 0.0)
            & x.grad[i].is_finite();
        all | !x.active[i]
    }
}

/// A sequence's values of the loss: its mean log-ratio at the sequence
/// level (GSPO), VESPO's `log w`.
#[derive(Clone, Copy)]
struct SeqContext {
    log_ratio: Option<f32>,
    log_w: f32,
}

/// Sequence-level clip statistics, as TRL's `masked_seq_mean`: each
/// sequence's fraction of clipped tokens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeqClipStats {
    low_sum: f64,
    high_sum: f64,
    low_min: f64,
    high_max: f64,
}

impl Default for SeqClipStats {
    fn default() -> Self {
        Self {
            low_sum: 0.0,
            high_sum: 0.0,
            low_min: f64::INFINITY,
            high_max: f64::NEG_INFINITY,
        }
    }
}

impl SeqClipStats {
    /// Adds a sequence of `tokens` masked-in tokens, `low` and `high` of them clipped.
    pub(crate) fn add(&mut self, tokens: usize, low: f64, high: f64) {
        if tokens == 0 {
            return;
        }
        let (low, high) = (low / tokens as f64, high / tokens as f64);
        self.low_sum += low;
        self.high_sum += high;
        self.low_min = self.low_min.min(low);
        self.high_max = self.high_max.max(high);
    }

    /// `(low mean, high mean, low min, high max)` over `seqs` sequences
    /// (empty ones count 0 in the means and are skipped by min and max;
    /// all 0 when every sequence is empty).
    pub(crate) fn finish(&self, seqs: usize) -> (f32, f32, f32, f32) {
        let mean = |x: f64| (x / seqs.max(1) as f64) as f32;
        let bound = |x: f64| if x.is_finite() { x as f32 } else { 0.0 };
        (
            mean(self.low_sum),
            mean(self.high_sum),
            bound(self.low_min),
            bound(self.high_max),
        )
    }
}

/// A sequence's sums, in f64.
#[derive(Debug, Clone, Copy, Default)]
struct SeqSums {
    tokens: usize,
    loss: f64,
    clip_low: f64,
    clip_high: f64,
    dual_clip: f64,
    ratio: f64,
    ratio_max: f32,
    kl: f64,
    finite: bool,
}

impl SeqSums {
    fn merge(&mut self, o: &SeqSums) {
        self.loss += o.loss;
        self.clip_low += o.clip_low;
        self.clip_high += o.clip_high;
        self.dual_clip += o.dual_clip;
        self.ratio += o.ratio;
        self.ratio_max = self.ratio_max.max(o.ratio_max);
        self.kl += o.kl;
    }
}

/// Per-lane f32 sums of one block.
struct LaneSums {
    loss: [f32; LANES],
    clip_low: [f32; LANES],
    clip_high: [f32; LANES],
    dual_clip: [f32; LANES],
    ratio: [f32; LANES],
    ratio_max: [f32; LANES],
    kl: [f32; LANES],
    finite: [bool; LANES],
}

impl LaneSums {
    fn new() -> Self {
        Self {
            loss: [0.0; LANES],
            clip_low: [0.0; LANES],
            clip_high: [0.0; LANES],
            dual_clip: [0.0; LANES],
            ratio: [0.0; LANES],
            ratio_max: [0.0; LANES],
            kl: [0.0; LANES],
            finite: [true; LANES],
        }
    }

    /// Adds the lanes into `sums`.
    fn flush(&self, sums: &mut SeqSums) {
        let total = |xs: &[f32; LANES]| xs.iter().map(|&v| v as f64).sum::<f64>();
        sums.loss += total(&self.loss);
        sums.clip_low += total(&self.clip_low);
        sums.clip_high += total(&self.clip_high);
        sums.dual_clip += total(&self.dual_clip);
        sums.ratio += total(&self.ratio);
        sums.kl += total(&self.kl);
        sums.ratio_max = self.ratio_max.iter().copied().fold(sums.ratio_max, f32::max);
        sums.finite &= self.finite.iter().all(|&f| f);
    }
}

/// `$call` with `$cfg` rebound to a copy whose objective is its variant by
/// construction: the objective's `match` then folds away inside the loops,
/// which vectorize (one copy per objective; a general path cost CISPO,
/// SAPO and VESPO six to nine times Clip's time). A macro for the reason of
/// `with_fixed_kl!`.
macro_rules! with_fixed_objective {
    ($cfg:ident, $call:expr) => {
        match $cfg.objective {
            PolicyObjective::Clip { delta } => {
                let $cfg = &PolicyLossConfig {
                    objective: PolicyObjective::Clip { delta },
                    ..*$cfg
                };
                $call
            }
            PolicyObjective::Cispo { min_ratio, max_ratio } => {
                let $cfg = &PolicyLossConfig {
                    objective: PolicyObjective::Cispo { min_ratio, max_ratio },
                    ..*$cfg
                };
                $call
            }
            PolicyObjective::Sapo { tau_pos, tau_neg } => {
                let $cfg = &PolicyLossConfig {
                    objective: PolicyObjective::Sapo { tau_pos, tau_neg },
                    ..*$cfg
                };
                $call
            }
            PolicyObjective::Vespo {
                k_pos,
                lambda_pos,
                k_neg,
                lambda_neg,
            } => {
                let $cfg = &PolicyLossConfig {
                    objective: PolicyObjective::Vespo {
                        k_pos,
                        lambda_pos,
                        k_neg,
                        lambda_neg,
                    },
                    ..*$cfg
                };
                $call
            }
        }
    };
}

/// `$call` with `$cfg` rebound to a copy whose KL estimator is a constant
/// to the optimizer: the estimator's `match` folds away inside the loops,
/// which then vectorize (one copy per estimator). A macro, not a closure:
/// a closure would be compiled apart from the `multiversion!` copy that
/// calls it, without its target features.
macro_rules! with_fixed_kl {
    ($cfg:ident, $call:expr) => {
        match $cfg.kl {
            KlEstimator::K1 => {
                let $cfg = &PolicyLossConfig {
                    kl: KlEstimator::K1,
                    ..*$cfg
                };
                with_fixed_objective!($cfg, $call)
            }
            KlEstimator::K2 => {
                let $cfg = &PolicyLossConfig {
                    kl: KlEstimator::K2,
                    ..*$cfg
                };
                with_fixed_objective!($cfg, $call)
            }
            KlEstimator::K3 => {
                let $cfg = &PolicyLossConfig {
                    kl: KlEstimator::K3,
                    ..*$cfg
                };
                with_fixed_objective!($cfg, $call)
            }
            KlEstimator::LowVarK3 => {
                let $cfg = &PolicyLossConfig {
                    kl: KlEstimator::LowVarK3,
                    ..*$cfg
                };
                with_fixed_objective!($cfg, $call)
            }
            // The other estimators (`kl::with_estimator!` lists them all), unfolded.
            _ => $call,
        }
    };
}

multiversion! {
    /// One sequence's loss terms into `out` (`m_t l_t`) and its sums.
    fn seq_forward(cfg: &PolicyLossConfig, seq: &SeqData<'_>, out: &mut [f32]) -> SeqSums {
        with_fixed_kl!(cfg, forward_lanes::<Mad>(cfg, seq, out))
    }
}

multiversion! {
    /// One sequence's `dlogp` into `out`, each token's weight being
    /// `scale = grad_loss * w_s`; whether every read input was finite.
    fn seq_backward(cfg: &PolicyLossConfig, seq: &SeqData<'_>, scale: f32, out: &mut [f32]) -> bool {
        with_fixed_kl!(cfg, backward_lanes::<Mad>(cfg, seq, scale, out))
    }
}

/// The body of [`seq_forward`].
#[inline(always)]
fn forward_lanes<M: MulAdd>(cfg: &PolicyLossConfig, seq: &SeqData<'_>, out: &mut [f32]) -> SeqSums {
    let (tokens, ctx) = seq.context(cfg);
    let mut sums = SeqSums {
        tokens,
        finite: true,
        ..SeqSums::default()
    };
    for block in (0..seq.len()).step_by(BLOCK) {
        let mut acc = LaneSums::new();
        for at in (block..seq.len().min(block + BLOCK)).step_by(LANES) {
            let x = seq.load(at);
            let mut terms = [0.0f32; LANES];
            for (i, term) in terms.iter_mut().enumerate() {
                let t = cfg.token_loss::<M>(SeqData::token_in(&x, i, ctx));
                let on = x.active[i];
                let count = |flag: bool| (on & flag) as u32 as f32;
                *term = if on { t.loss } else { 0.0 };
                acc.loss[i] += *term;
                acc.clip_low[i] += count(t.clip_low);
                acc.clip_high[i] += count(t.clip_high);
                acc.dual_clip[i] += count(t.dual_clip);
                acc.ratio[i] += if on { t.ratio } else { 0.0 };
                acc.ratio_max[i] = if on && t.ratio > acc.ratio_max[i] {
                    t.ratio
                } else {
                    acc.ratio_max[i]
                };
                acc.kl[i] += if on { t.kl } else { 0.0 };
                let results_finite = t.loss.is_finite() & t.kl.is_finite() & t.ratio.is_finite();
                acc.finite[i] &= SeqData::lane_finite(&x, i) & (results_finite | !on);
            }
            SeqData::store(out, at, &terms);
        }
        acc.flush(&mut sums);
    }
    sums
}

/// The body of [`seq_backward`].
#[inline(always)]
fn backward_lanes<M: MulAdd>(cfg: &PolicyLossConfig, seq: &SeqData<'_>, scale: f32, out: &mut [f32]) -> bool {
    let ctx = if cfg.importance == ImportanceLevel::Sequence || cfg.objective.is_sequence_weighted() {
        seq.context(cfg).1
    } else {
        SeqContext {
            log_ratio: None,
            log_w: 0.0,
        }
    };
    let mut finite = [true; LANES];
    for at in (0..seq.len()).step_by(LANES) {
        let x = seq.load(at);
        let mut grads = [0.0f32; LANES];
        for i in 0..LANES {
            let t = cfg.token_loss::<M>(SeqData::token_in(&x, i, ctx));
            grads[i] = if x.active[i] {
                (scale + x.grad[i]) * t.grad
            } else {
                0.0
            };
            finite[i] &= SeqData::lane_finite(&x, i) & grads[i].is_finite();
        }
        SeqData::store(out, at, &grads);
    }
    finite.iter().all(|&f| f)
}
