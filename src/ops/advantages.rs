//! Group-relative advantages: each completion's reward compared with the
//! other completions of the same prompt, the critic-free baseline of GRPO
//! (Shao et al., "DeepSeekMath", 2024).
//!
//! Rewards are laid out `[P, G]`: the `G` completions of a prompt are
//! contiguous. Several reward components (R1-SGG's format, node and edge
//! rewards, weighted 1, 2, 5) are summed with their weights first:
//! `r_i = sum_k w_k values[k][i]`. With `mean_g` and `std_g` over the group
//! of `r_i`:
//!
//! ```text
//! GroupNorm    A_i = (r_i - mean_g) / (std_g + eps)        GRPO; TRL scale_rewards="group"
//! GroupMean    A_i = r_i - mean_g                          Dr. GRPO (Liu et al., 2025)
//! BatchNorm    A_i = (r_i - mean_g) / (std_batch + eps)    TRL scale_rewards="batch"
//! LeaveOneOut  A_i = r_i - mean_{j != i} r_j               RLOO (Ahmadian et al., 2024)
//!                  = G / (G - 1) (r_i - mean_g)
//! Whiten       A_i = (r_i - mean_batch) / (std_batch + eps)  TRL normalize_then_sum's last step
//! None         A_i = r_i
//! ```
//!
//! **Standard deviations.** `unbiased` divides the sum of squares by `G - 1`
//! (Bessel), as `torch.std` does by default: TRL (`eps = 1e-4`) and verl's
//! `grpo` estimator (`eps = 1e-6`) both use it. `unbiased: false` divides by `G`.
//!
//! **Degenerate groups.** A group whose rewards are all exactly equal
//! (`max == min`, tested exactly rather than `std < tiny`, so a group with a
//! tiny but real spread is still normalized), a group of one (`G = 1`) and,
//! with [`NanRewards::Skip`], a group with fewer than two scored
//! completions get advantage exactly 0 in every mode but `None` and
//! `Whiten`, never NaN, and report `std_g = 0`. TRL and verl compute
//! `(r - mean) / (0 + eps)` there, which is 0 where their mean is exact and
//! rounding noise divided by `eps` where it is not (e.g. three rewards of
//! 0.1 in f32): the crate deliberately gives the exact 0. For groups of one
//! verl instead uses mean 0 and std 1 (`A = r / (1 + eps)`, `r` for Dr.
//! GRPO and RLOO): [`Singletons::Verl`] reproduces that;
//! [`Singletons::Zero`] (the default, TRL's result) holds that a lone
//! completion has no baseline. With `BatchNorm` and `Whiten`, a batch with
//! no spread gives 0 too.
//!
//! **NaN rewards** ([`NanRewards::Skip`], TRL 1.16's "unscorable"
//! completions): a NaN component is left out of the weighted sum; a
//! completion with every component NaN is left out of its group's (and the
//! batch's) mean and std, gets advantage 0, and its combined reward in the
//! output is NaN (as TRL's `rewards`). By default ([`NanRewards::Error`]) a
//! NaN reward is an error.
//!
//! **Several reward functions.** [`RewardAggregation::SumThenNormalize`]
//! (TRL's default) sums the weighted components, then applies the mode;
//! [`RewardAggregation::NormalizeThenSum`] first turns each component into
//! its z-score within the group (unbiased std + eps), then sums those with
//! the weights, then applies the mode (TRL: [`AdvantageMode::Whiten`]).
//!
//! **TRL 1.16 and verl, setting by setting.** Each row is reproduced exactly
//! (to f32 rounding of an f64 computation) by the crate's setting, as the
//! committed fixture `tests/fixtures/advantages_reference.json`
//! (`advantages_kl_reference.py`, TRL's code path and verl's functions at
//! commit b178a3cd56f58b2d502255daba591e92833930a7) shows for every row
//! but the last two. Fields not named are [`AdvantageConfig::default`]'s;
//! TRL rows need [`NanRewards::Skip`] only if rewards can be NaN.
//!
//! | reference | crate ([`AdvantageConfig`]) |
//! |---|---|
//! | TRL `scale_rewards="group"` (default), `multi_objective_aggregation="sum_then_normalize"` (default) | `mode: GroupNorm { eps: 1e-4, unbiased: true }` (= `AdvantageMode::default()`) |
//! | TRL `scale_rewards="batch"` | `mode: BatchNorm { eps: 1e-4, unbiased: true }` |
//! | TRL `scale_rewards="none"` (Dr. GRPO) | `mode: GroupMean` |
//! | TRL `multi_objective_aggregation="normalize_then_sum"` (any `scale_rewards`: TRL ignores it there) | `aggregation: NormalizeThenSum { eps: 1e-4 }, mode: Whiten { eps: 1e-4, unbiased: true }` |
//! | TRL `reward_weights` | [`Rewards::with_weights`] (`[K, P, G]` values) |
//! | TRL reward functions returning `None` (NaN rewards, unscorable completions) | `nan_rewards: NanRewards::Skip` |
//! | TRL `num_generations=1` | any mode: 0 (`singletons: Zero`) |
//! | verl `adv_estimator=grpo` (`norm_adv_by_std_in_grpo=True`) | `mode: GroupNorm { eps: 1e-6, unbiased: true }, singletons: Verl` |
//! | verl `grpo`, `norm_adv_by_std_in_grpo=False` (Dr. GRPO) | `mode: GroupMean, singletons: Verl` |
//! | verl `rloo` | `mode: LeaveOneOut, singletons: Verl` |
//! | verl `rloo_vectorized` (groups of one get 0, unlike `rloo`) | `mode: LeaveOneOut` (`singletons: Zero`) |
//! | verl `grpo_vectorized` (`verl.utils.group_mean_std`: a variance floored at `eps`, so `std >= sqrt(1e-6)`, from one-pass f32 sums; not in the fixture) | nearest: as `grpo`; differs where a group's variance is below `1e-6` |
//! | verl `reinforce_plus_plus_baseline`, `grpo_passk`, `opo`, `gpg`, `remax`, `gae`, `optimal_token_baseline` | not covered: token-level, value- or length-weighted baselines outside this op |
//!
//! Where the crate differs on purpose: flat groups get an exact 0 (above);
//! verl's variable group sizes (any `index`) are not expressible, groups
//! are `G` contiguous completions.
//!
//! Sums run in f64 (rewards are few; this keeps `mean` and `std` exact to
//! f32 output precision for any `G`).
//!
//! **Non-finite values** (the crate's [rule](crate::error)). An infinite
//! reward, a non-finite weight, and a NaN reward unless
//! [`NanRewards::Skip`] asks for TRL's rule, is [`Error::NonFinite`]
//! naming it. Finite
//! rewards near `f32::MAX` can give results beyond f32 (a weighted sum, a
//! spread `r - mean` up to twice the largest reward in `GroupMean` and
//! `LeaveOneOut`, the std of `[MAX, -MAX]`): the first such output is
//! `NonFinite` with `what: "weighted rewards"`, `"advantages"` or
//! `"group_std"` and its index. The normalizing modes' advantages are
//! bounded (`|A| <= sqrt(G - 1)` for `GroupNorm`) and never overflow.

use rayon::prelude::*;

use crate::error::{check, Error, Result};
use crate::memory::{Host, Memory};
use crate::ops::layout::SeqLayout;

pub(crate) const OP: &str = "group_advantages";
pub(crate) const OP_BROADCAST: &str = "broadcast_to_tokens";

/// Rewards per parallel task (rayon splits no finer).
const MIN_TASK: usize = 1 << 13;

/// How rewards become advantages; see the [module docs](self) for formulas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdvantageMode {
    /// `(r - mean_g) / (std_g + eps)`: GRPO.
    GroupNorm {
        /// Added to the group std; `>= 0`.
        eps: f32,
        /// Divide by `G - 1` (Bessel), else by `G`.
        unbiased: bool,
    },
    /// `r - mean_g`: Dr. GRPO.
    GroupMean,
    /// `(r - mean_g) / (std_batch + eps)`, the std over all `P * G` rewards.
    BatchNorm {
        /// Added to the batch std; `>= 0`.
        eps: f32,
        /// Divide by `P G - 1` (Bessel), else by `P G`.
        unbiased: bool,
    },
    /// `r_i - mean_{j != i} r_j`: RLOO.
    LeaveOneOut,
    /// `(r - mean_batch) / (std_batch + eps)`, mean and std over all
    /// `P * G` rewards: the batch whitening of TRL's `normalize_then_sum`.
    Whiten {
        /// Added to the batch std; `>= 0`.
        eps: f32,
        /// Divide by `P G - 1` (Bessel), else by `P G`.
        unbiased: bool,
    },
    /// `r`, unchanged.
    None,
}

impl Default for AdvantageMode {
    /// TRL's default: group std, unbiased, `eps = 1e-4` (also R1-SGG's).
    fn default() -> Self {
        AdvantageMode::GroupNorm {
            eps: 1e-4,
            unbiased: true,
        }
    }
}

impl AdvantageMode {
    pub(crate) fn validate(self, op: &'static str) -> Result<()> {
        match self {
            AdvantageMode::GroupNorm { eps, .. }
            | AdvantageMode::BatchNorm { eps, .. }
            | AdvantageMode::Whiten { eps, .. } => {
                check::param(op, "eps", eps as f64, eps >= 0.0, "finite and >= 0")
            }
            _ => Ok(()),
        }
    }

    /// Whether std divides by `count - 1` rather than `count`. Modes without
    /// a std of their own report the unbiased one (TRL's logged `reward_std`).
    pub(crate) fn unbiased(self) -> bool {
        match self {
            AdvantageMode::GroupNorm { unbiased, .. }
            | AdvantageMode::BatchNorm { unbiased, .. }
            | AdvantageMode::Whiten { unbiased, .. } => unbiased,
            _ => true,
        }
    }

    /// Whether the advantages need the batch's statistics.
    pub(crate) fn uses_batch(self) -> bool {
        matches!(
            self,
            AdvantageMode::BatchNorm { .. } | AdvantageMode::Whiten { .. }
        )
    }
}

/// What a NaN reward means; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NanRewards {
    /// A NaN reward is [`Error::NonFinite`], like an infinite one.
    #[default]
    Error,
    /// TRL 1.16's rule: a NaN component is a reward function that did not
    /// score the completion (TRL's `None`) and is left out of the weighted
    /// sum (`nansum`); a completion that no component scored is
    /// *unscorable*: left out of every mean and std, its advantage is 0 and
    /// its combined reward NaN. Infinite rewards are still errors.
    Skip,
}

/// How several reward components (functions) become one advantage (TRL's
/// `multi_objective_aggregation`); see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RewardAggregation {
    /// The weighted sum `r_i = sum_k w_k values[k][i]`, then the mode
    /// (TRL's `"sum_then_normalize"`, its default).
    #[default]
    SumThenNormalize,
    /// Each component normalized within its group first,
    /// `z_k = (v_k - mean_gk) / (std_gk + eps)` (unbiased std, as TRL's
    /// `nanstd`; 0 in a group where the component has fewer than two
    /// scored values or no spread), then `r_i = sum_k w_k z_k[i]`, then the
    /// mode (TRL's `"normalize_then_sum"` is this with `eps = 1e-4` and
    /// [`AdvantageMode::Whiten`] `{ eps: 1e-4, unbiased: true }`).
    NormalizeThenSum {
        /// Added to each component's group std; `>= 0`.
        eps: f32,
    },
}

/// The advantage of a group of one (`G = 1`); see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Singletons {
    /// 0 in every mode but `None` and `Whiten` (TRL's result): a lone
    /// completion has no baseline.
    #[default]
    Zero,
    /// verl's convention (`compute_grpo_outcome_advantage`,
    /// `compute_rloo_outcome_advantage`): a group of one has mean 0 and std
    /// 1, so `GroupNorm` gives `r / (1 + eps)`, `GroupMean` and
    /// `LeaveOneOut` give `r`, `BatchNorm` `r / (std_batch + eps)`.
    Verl,
}

/// Every setting of [`group_advantages`]: the mode, and how several
/// components, NaN rewards and groups of one are treated. An
/// [`AdvantageMode`] converts into the crate's defaults for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AdvantageConfig {
    /// How combined rewards become advantages.
    pub mode: AdvantageMode,
    /// How the components combine (with one component both are the same
    /// but for `NormalizeThenSum`'s per-group normalization).
    pub aggregation: RewardAggregation,
    /// What a NaN reward means.
    pub nan_rewards: NanRewards,
    /// The advantage of a group of one.
    pub singletons: Singletons,
}

impl From<AdvantageMode> for AdvantageConfig {
    fn from(mode: AdvantageMode) -> Self {
        AdvantageConfig {
            mode,
            ..AdvantageConfig::default()
        }
    }
}

impl AdvantageConfig {
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        self.mode.validate(op)?;
        match self.aggregation {
            RewardAggregation::NormalizeThenSum { eps } => {
                check::param(op, "aggregation eps", eps as f64, eps >= 0.0, "finite and >= 0")
            }
            RewardAggregation::SumThenNormalize => Ok(()),
        }
    }

    /// The affine map `A = (r - shift) * scale` of a group with `stats` of
    /// `group_size` completions, given the batch's statistics (read by the
    /// batch modes only).
    #[inline]
    pub(crate) fn group_affine(&self, stats: &GroupStats, group_size: usize, batch: &GroupStats) -> Affine {
        let affine = |shift, scale| Affine { shift, scale };
        let batch_scale = |eps: f32| {
            if batch.degenerate() {
                0.0
            } else {
                1.0 / (batch.std + eps as f64)
            }
        };
        match self.mode {
            AdvantageMode::None => return affine(0.0, 1.0),
            AdvantageMode::Whiten { eps, .. } => return affine(batch.mean, batch_scale(eps)),
            _ => {}
        }
        if group_size == 1 && self.singletons == Singletons::Verl {
            // verl: mean 0, std 1.
            return affine(
                0.0,
                match self.mode {
                    AdvantageMode::GroupNorm { eps, .. } => 1.0 / (1.0 + eps as f64),
                    AdvantageMode::BatchNorm { eps, .. } => batch_scale(eps),
                    _ => 1.0,
                },
            );
        }
        if stats.degenerate() {
            return affine(stats.mean, 0.0);
        }
        let c = stats.count as f64;
        let scale = match self.mode {
            AdvantageMode::GroupNorm { eps, .. } => 1.0 / (stats.std + eps as f64),
            AdvantageMode::BatchNorm { eps, .. } => batch_scale(eps),
            // r_i - (sum - r_i) / (c - 1) = c / (c - 1) (r_i - mean); c >= 2 here.
            AdvantageMode::LeaveOneOut => c / (c - 1.0),
            _ => 1.0,
        };
        affine(stats.mean, scale)
    }
}

/// A group's advantages as an affine map of its rewards.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Affine {
    shift: f64,
    scale: f64,
}

impl Affine {
    /// The advantage of reward `r`: 0 for an unscorable completion (NaN),
    /// and exactly 0 with `scale = 0` (a flat group).
    #[inline(always)]
    pub(crate) fn apply(self, r: f64) -> f64 {
        if r.is_nan() {
            0.0
        } else {
            (r - self.shift) * self.scale
        }
    }
}

/// Sums of the scored (non-NaN) values of a group, or of the batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupStats {
    /// Scored values.
    count: usize,
    sum: f64,
    /// `sum / count` (the value itself when all are equal); NaN for none.
    mean: f64,
    /// `sum (r - mean)^2`.
    sq_dev: f64,
    /// Standard deviation in the mode's convention; 0 when degenerate.
    std: f64,
    /// The smallest and largest value.
    lo: f64,
    hi: f64,
}

impl GroupStats {
    /// The statistics of `r`'s non-NaN values, std divided by `count - 1`
    /// if `unbiased` (else `count`).
    fn of(r: &[f64], unbiased: bool) -> Self {
        let (mut count, mut sum, mut lo, mut hi) = (0, 0.0, f64::INFINITY, f64::NEG_INFINITY);
        for &x in r.iter().filter(|x| !x.is_nan()) {
            count += 1;
            sum += x;
            lo = lo.min(x);
            hi = hi.max(x);
        }
        let mean = match count {
            0 => f64::NAN,
            // All equal: the value exactly (sum / count may round).
            _ if lo == hi => lo,
            _ => sum / count as f64,
        };
        let sq_dev = if count < 2 || lo == hi {
            0.0
        } else {
            r.iter()
                .filter(|x| !x.is_nan())
                .map(|x| (x - mean) * (x - mean))
                .sum()
        };
        GroupStats {
            count,
            sum,
            mean,
            sq_dev,
            std: std_of(sq_dev, count, unbiased),
            lo,
            hi,
        }
    }

    /// The batch's statistics from its groups' (Chan et al.'s pairwise
    /// combination: `SS = sum_g SS_g + c_g (mean_g - mean)^2`), in group
    /// order so the result does not depend on threads.
    fn batch(groups: &[GroupStats], unbiased: bool) -> Self {
        let count: usize = groups.iter().map(|s| s.count).sum();
        let sum: f64 = groups.iter().map(|s| s.sum).sum();
        let lo = groups.iter().fold(f64::INFINITY, |m, s| m.min(s.lo));
        let hi = groups.iter().fold(f64::NEG_INFINITY, |m, s| m.max(s.hi));
        let mean = match count {
            0 => f64::NAN,
            _ if lo == hi => lo,
            _ => sum / count as f64,
        };
        let sq_dev = if count < 2 || lo == hi {
            0.0
        } else {
            groups
                .iter()
                .filter(|s| s.count > 0)
                .map(|s| s.sq_dev + s.count as f64 * (s.mean - mean).powi(2))
                .sum()
        };
        GroupStats {
            count,
            sum,
            mean,
            sq_dev,
            std: std_of(sq_dev, count, unbiased),
            lo,
            hi,
        }
    }

    /// Fewer than two scored values, or all equal: no spread to normalize.
    #[inline(always)]
    fn degenerate(&self) -> bool {
        self.count < 2 || self.lo == self.hi
    }
}

/// Standard deviation from a sum of squared deviations over `count` values,
/// divided by `count - 1` if `unbiased`; 0 where that divisor is 0.
#[inline(always)]
fn std_of(sq_dev: f64, count: usize, unbiased: bool) -> f64 {
    let div = if unbiased { count.saturating_sub(1) } else { count };
    if div == 0 {
        0.0
    } else {
        (sq_dev / div as f64).sqrt()
    }
}

/// Reward components, `[K, P, G]`.
pub struct Rewards<'a, M: Memory = Host> {
    /// `[K * P * G]`, component-major: component `k` is
    /// `values[k * P * G..(k + 1) * P * G]`.
    pub values: M::Buf<'a, f32>,
    /// `[K]` component weights, always on the host; `None` means one
    /// component of weight 1.
    pub weights: Option<&'a [f32]>,
    /// Completions per prompt `G`.
    pub group_size: usize,
}

impl<M: Memory> Rewards<'_, M> {
    /// Checks lengths and weights; returns `(K, P * G)`.
    pub(crate) fn validate(&self, op: &'static str) -> Result<(usize, usize)> {
        let len = M::len(&self.values);
        check::non_empty(op, "values", len)?;
        let g = self.group_size;
        check::param(op, "group_size", g as f64, g > 0, "> 0")?;
        let k = match self.weights {
            Some(w) => {
                check::non_empty(op, "weights", w.len())?;
                check::finite(op, "weights", w)?;
                w.len()
            }
            None => 1,
        };
        let per_group = k.checked_mul(g).filter(|&kg| len.is_multiple_of(kg));
        let Some(kg) = per_group else {
            return Err(Error::InvalidLayout {
                op,
                reason: format!("{len} reward values do not split into {k} components of groups of {g}"),
            });
        };
        Ok((k, len / kg * g))
    }
}

impl<'a> Rewards<'a, Host> {
    /// One reward component, `[P * G]`.
    pub fn new(values: &'a [f32], group_size: usize) -> Self {
        Self {
            values,
            weights: None,
            group_size,
        }
    }

    /// `weights.len()` components, component-major in `values`.
    pub fn with_weights(self, weights: &'a [f32]) -> Self {
        Self {
            weights: Some(weights),
            ..self
        }
    }

    /// The weight of component `k`.
    #[inline(always)]
    fn weight(&self, k: usize) -> f64 {
        self.weights.map_or(1.0, |w| w[k] as f64)
    }

    /// Group `p`'s combined rewards into `out` (`[G]`), in f64: the weighted
    /// sum of its components' values (`NormalizeThenSum`: of their group
    /// z-scores), NaN components left out; NaN where none is scored.
    fn combine_group(&self, n: usize, p: usize, aggregation: RewardAggregation, out: &mut [f64]) {
        let g = out.len();
        let k_count = self.weights.map_or(1, <[f32]>::len);
        out.fill(0.0);
        let mut scored = vec![false; g];
        for k in 0..k_count {
            let v = &self.values[k * n + p * g..k * n + (p + 1) * g];
            let w = self.weight(k);
            let (shift, scale) = match aggregation {
                RewardAggregation::SumThenNormalize => (0.0, 1.0),
                RewardAggregation::NormalizeThenSum { eps } => {
                    let v64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
                    let s = GroupStats::of(&v64, true);
                    let scale = if s.degenerate() {
                        0.0
                    } else {
                        1.0 / (s.std + eps as f64)
                    };
                    (if s.count == 0 { 0.0 } else { s.mean }, scale)
                }
            };
            for ((o, sc), &x) in out.iter_mut().zip(scored.iter_mut()).zip(v) {
                if !x.is_nan() {
                    *o += w * ((x as f64 - shift) * scale);
                    *sc = true;
                }
            }
        }
        for (o, sc) in out.iter_mut().zip(&scored) {
            if !sc {
                *o = f64::NAN;
            }
        }
    }
}

/// Results of [`group_advantages`].
#[derive(Debug, Clone)]
pub struct GroupAdvantages<M: Memory = Host> {
    /// `[P * G]` advantages.
    pub advantages: M::Owned<f32>,
    /// `[P * G]` combined rewards `sum_k w_k values[k]` (with
    /// `NormalizeThenSum`, of the components' group z-scores); NaN marks
    /// an unscorable completion ([`NanRewards::Skip`] only).
    pub rewards: M::Owned<f32>,
    /// `[P]` group means of the combined rewards (NaN for a group with no
    /// scored completion, [`NanRewards::Skip`] only).
    pub group_mean: M::Owned<f32>,
    /// `[P]` group standard deviations in the mode's convention (`unbiased`
    /// for the normalizing modes, unbiased for the others), 0 for a flat
    /// group, a group of one, or fewer than two scored completions.
    pub group_std: M::Owned<f32>,
}

/// Advantages of `P * G` completions from their (weighted) rewards, with
/// `config` an [`AdvantageConfig`] or just an [`AdvantageMode`] (the
/// defaults: NaN is an error, weighted sum first, groups of one get 0).
///
/// Errors: empty `values`, `group_size == 0`, empty or non-finite `weights`,
/// a `values` length that is not a multiple of `K * G`
/// ([`Error::InvalidLayout`]), an `eps` negative or non-finite, a
/// non-finite reward ([`Error::NonFinite`] with its index in `values`; NaN
/// is allowed with [`NanRewards::Skip`]), or an output outside f32's range
/// (`what: "weighted rewards"`, `"advantages"` or `"group_std"`; see the
/// module docs).
pub fn group_advantages(
    rewards: &Rewards<'_>,
    config: impl Into<AdvantageConfig>,
) -> Result<GroupAdvantages> {
    let (_, n) = rewards.validate(OP)?;
    let groups = n / rewards.group_size;
    let mut advantages = check::zeros(OP, "advantages", n)?;
    let mut combined = check::zeros(OP, "rewards", n)?;
    let mut group_mean = check::zeros(OP, "group_mean", groups)?;
    let mut group_std = check::zeros(OP, "group_std", groups)?;
    group_advantages_into(
        rewards,
        config,
        &mut GroupAdvantagesOut {
            advantages: &mut advantages,
            rewards: &mut combined,
            group_mean: &mut group_mean,
            group_std: &mut group_std,
        },
    )?;
    Ok(GroupAdvantages {
        advantages,
        rewards: combined,
        group_mean,
        group_std,
    })
}

/// Where [`group_advantages_into`] writes: caller-provided buffers, as
/// [`GroupAdvantages`] holds them (`[P * G]`, `[P * G]`, `[P]`, `[P]`).
/// Every element is written; after an error their contents are unspecified.
pub struct GroupAdvantagesOut<'a> {
    /// `[P * G]` advantages.
    pub advantages: &'a mut [f32],
    /// `[P * G]` combined rewards.
    pub rewards: &'a mut [f32],
    /// `[P]` group means.
    pub group_mean: &'a mut [f32],
    /// `[P]` group standard deviations.
    pub group_std: &'a mut [f32],
}

/// [`group_advantages`] into caller-provided buffers. Errors: those of
/// [`group_advantages`], and output lengths.
pub fn group_advantages_into(
    rewards: &Rewards<'_>,
    config: impl Into<AdvantageConfig>,
    out: &mut GroupAdvantagesOut<'_>,
) -> Result<()> {
    let cfg: AdvantageConfig = config.into();
    let (_, n) = rewards.validate(OP)?;
    cfg.validate(OP)?;
    let groups = n / rewards.group_size;
    check::len(OP, "advantages (output)", n, out.advantages.len())?;
    check::len(OP, "rewards (output)", n, out.rewards.len())?;
    check::len(OP, "group_mean (output)", groups, out.group_mean.len())?;
    check::len(OP, "group_std (output)", groups, out.group_std.len())?;
    if group_pass(rewards, &cfg, out) {
        return Ok(());
    }
    // Something was not finite: name the first culprit, in the order the
    // values flow (the pass wrote every output that it reached).
    match cfg.nan_rewards {
        NanRewards::Error => check::finite(OP, "values", rewards.values)?,
        NanRewards::Skip => {
            if let Some(i) = rewards.values.iter().position(|x| x.is_infinite()) {
                return Err(Error::NonFinite {
                    op: OP,
                    what: "values",
                    index: i,
                });
            }
        }
    }
    if let Some(i) = out.rewards.iter().position(|x| x.is_infinite()) {
        return Err(Error::NonFinite {
            op: OP,
            what: "weighted rewards",
            index: i,
        });
    }
    check::finite(OP, "group_std", out.group_std)?;
    check::finite(OP, "advantages", out.advantages)
}

/// [`group_advantages_into`]'s work group by group, in one pass (two when
/// the mode needs the batch's statistics first), in parallel for large
/// batches, with no `[P * G]` temporary: each group's combined rewards go
/// through a `[G]` scratch. Returns whether every value read and written
/// was finite (NaN rewards allowed by [`NanRewards::Skip`]). Every group is
/// computed either way (no early exit), so that the caller can name the
/// first non-finite value in the outputs: a failed first pass is always
/// explained by the rewards, combined rewards or standard deviations it
/// wrote, so the second pass runs only after a clean first one.
fn group_pass(rewards: &Rewards<'_>, cfg: &AdvantageConfig, out: &mut GroupAdvantagesOut<'_>) -> bool {
    let (n, g) = (out.advantages.len(), rewards.group_size);
    let unbiased = cfg.mode.unbiased();
    let components = rewards.weights.map_or(1, <[f32]>::len);
    let readable = |x: &f32| match cfg.nan_rewards {
        NanRewards::Error => x.is_finite(),
        NanRewards::Skip => !x.is_infinite(),
    };
    // Group p's combined rewards into `r`, if its values are all readable.
    let combine = |p: usize, r: &mut Vec<f64>| -> bool {
        let ok = (0..components).all(|k| {
            rewards.values[k * n + p * g..k * n + (p + 1) * g]
                .iter()
                .all(readable)
        });
        r.resize(g, 0.0);
        match (rewards.weights, cfg.aggregation) {
            (None, RewardAggregation::SumThenNormalize) => r
                .iter_mut()
                .zip(&rewards.values[p * g..(p + 1) * g])
                .for_each(|(r, &v)| *r = v as f64),
            _ => rewards.combine_group(n, p, cfg.aggregation, r),
        }
        ok
    };
    let map = |stats: &GroupStats, batch: &GroupStats, r: &[f64], adv: &mut [f32]| -> bool {
        let affine = cfg.group_affine(stats, g, batch);
        let mut ok = true;
        for (a, &x) in adv.iter_mut().zip(r) {
            *a = affine.apply(x) as f32;
            ok &= a.is_finite();
        }
        ok
    };
    let no_batch = GroupStats::of(&[], unbiased);
    let batch_first = cfg.mode.uses_batch();
    // Pass 1: combined rewards and statistics (and, without a batch term,
    // the advantages) of group p; `(stats, all finite)`.
    let first = |r: &mut Vec<f64>, (p, (((comb, adv), mean), std)): (usize, GroupOut<'_>)| {
        let mut ok = combine(p, r);
        for (c, &x) in comb.iter_mut().zip(r.iter()) {
            *c = x as f32;
            ok &= !c.is_infinite();
        }
        let stats = GroupStats::of(r, unbiased);
        (*mean, *std) = (stats.mean as f32, stats.std as f32);
        ok &= std.is_finite();
        if !batch_first {
            ok &= map(&stats, &no_batch, r, adv);
        }
        (stats, ok)
    };
    // Each group's output slices, numbered.
    macro_rules! groups {
        ($chunks:ident, $items:ident) => {
            out.rewards
                .$chunks(g)
                .zip(out.advantages.$chunks(g))
                .zip(out.group_mean.$items())
                .zip(out.group_std.$items())
                .enumerate()
        };
    }
    // Small batches (GRPO's usual few hundred rewards) stay on this thread:
    // a rayon dispatch costs more than the whole op.
    let parallel = n > MIN_TASK;
    let min_groups = (MIN_TASK / g).max(1);
    let mut r = Vec::new();
    if !batch_first {
        return if parallel {
            groups!(par_chunks_mut, par_iter_mut)
                .with_min_len(min_groups)
                .map_init(Vec::new, |r, item| first(r, item).1)
                .reduce(|| true, |a, b| a & b)
        } else {
            groups!(chunks_mut, iter_mut).fold(true, |ok, item| first(&mut r, item).1 & ok)
        };
    }
    let (stats, ok): (Vec<GroupStats>, Vec<bool>) = if parallel {
        groups!(par_chunks_mut, par_iter_mut)
            .with_min_len(min_groups)
            .map_init(Vec::new, first)
            .unzip()
    } else {
        groups!(chunks_mut, iter_mut)
            .map(|item| first(&mut r, item))
            .unzip()
    };
    if !ok.iter().all(|&ok| ok) {
        return false;
    }
    let batch = GroupStats::batch(&stats, unbiased);
    let second = |r: &mut Vec<f64>, (p, adv): (usize, &mut [f32])| {
        combine(p, r);
        map(&stats[p], &batch, r, adv)
    };
    if parallel {
        out.advantages
            .par_chunks_mut(g)
            .with_min_len(min_groups)
            .enumerate()
            .map_init(Vec::new, second)
            .all(|ok| ok)
    } else {
        out.advantages
            .chunks_mut(g)
            .enumerate()
            .all(|item| second(&mut r, item))
    }
}

/// One group's slices of [`GroupAdvantagesOut`], numbered: combined
/// rewards, advantages, mean, std.
type GroupOut<'a> = (((&'a mut [f32], &'a mut [f32]), &'a mut f32), &'a mut f32);

/// Repeats each sequence's value over its tokens: `[S]` in, `[N]` out, with
/// `N` the layout's token count (e.g. per-completion advantages to the
/// per-token advantages of the policy loss).
///
/// Errors: an invalid layout, `per_seq.len() != S`, a non-finite value, a
/// padded layout of more tokens than can be allocated
/// ([`Error::Allocation`]: its `batch * seq_len` is not backed by any input).
pub fn broadcast_to_tokens(per_seq: &[f32], layout: &SeqLayout<'_>) -> Result<Vec<f32>> {
    let tokens = validate_broadcast(per_seq, layout)?;
    let mut out = check::zeros(OP_BROADCAST, "tokens", tokens)?;
    broadcast_to_tokens_into(per_seq, layout, &mut out)?;
    Ok(out)
}

/// [`broadcast_to_tokens`] into a caller's `[N]` buffer. Errors: those of
/// [`broadcast_to_tokens`], and `out`'s length.
pub fn broadcast_to_tokens_into(per_seq: &[f32], layout: &SeqLayout<'_>, out: &mut [f32]) -> Result<()> {
    let tokens = validate_broadcast(per_seq, layout)?;
    check::len(OP_BROADCAST, "out", tokens, out.len())?;
    for (range, &v) in layout.ranges().zip(per_seq) {
        out[range].fill(v);
    }
    Ok(())
}

/// Validates a broadcast's layout and values; returns the token count
/// (`batch * seq_len`, or the last offset).
fn validate_broadcast(per_seq: &[f32], layout: &SeqLayout<'_>) -> Result<usize> {
    let tokens = match layout {
        SeqLayout::Padded { batch, seq_len } => {
            batch.checked_mul(*seq_len).ok_or_else(|| Error::InvalidLayout {
                op: OP_BROADCAST,
                reason: format!("{batch} x {seq_len} overflows usize"),
            })?
        }
        SeqLayout::Packed { cu_seqlens } => cu_seqlens.last().map_or(0, |&n| n as usize),
    };
    let seqs = layout.validate(OP_BROADCAST, tokens)?;
    check::len(OP_BROADCAST, "per_seq", seqs, per_seq.len())?;
    check::finite(OP_BROADCAST, "per_seq", per_seq)?;
    Ok(tokens)
}
