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
//! None         A_i = r_i
//! ```
//!
//! **Standard deviations.** `unbiased` divides the sum of squares by `G - 1`
//! (Bessel), as `torch.std` does by default: TRL (`eps = 1e-4`) and verl's
//! `grpo` estimator (`eps = 1e-6`) both use it. `unbiased: false` divides by `G`.
//!
//! **Degenerate groups.** A group whose rewards are all exactly equal
//! (`max == min`, tested exactly rather than `std < tiny`, so a group with a
//! tiny but real spread is still normalized) and a group of one (`G = 1`)
//! get advantage exactly 0 in every mode but `None`, never NaN, and report
//! `std_g = 0`. This differs from verl, which gives a group of one
//! `mean = 0, std = 1`, i.e. `A = r / (1 + eps)`: a lone completion has no
//! baseline, so it carries no relative signal. With `BatchNorm`, a batch
//! with no spread has no non-degenerate group, so all advantages are 0.
//!
//! Sums run in f64 (rewards are few; this keeps `mean` and `std` exact to
//! f32 output precision for any `G`).
//!
//! **Non-finite values** (the crate's [rule](crate::error)). A NaN or
//! infinite reward or weight is [`Error::NonFinite`] naming it. Finite
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
            AdvantageMode::GroupNorm { eps, .. } | AdvantageMode::BatchNorm { eps, .. } => {
                check::param(op, "eps", eps as f64, eps >= 0.0, "finite and >= 0")
            }
            _ => Ok(()),
        }
    }

    /// Whether std divides by `count - 1` rather than `count`. Modes without
    /// a std of their own report the unbiased one (TRL's logged `reward_std`).
    pub(crate) fn unbiased(self) -> bool {
        match self {
            AdvantageMode::GroupNorm { unbiased, .. } | AdvantageMode::BatchNorm { unbiased, .. } => unbiased,
            _ => true,
        }
    }

    /// The affine map `A = (r - shift) * scale` of a group with `stats` of
    /// `group_size` rewards; `batch_std` is used by `BatchNorm` only.
    #[inline]
    pub(crate) fn group_affine(self, stats: &GroupStats, group_size: usize, batch_std: f64) -> Affine {
        let g = group_size as f64;
        let scale = match self {
            AdvantageMode::None => {
                return Affine {
                    shift: 0.0,
                    scale: 1.0,
                }
            }
            // Also covers G = 1: a group of one is flat.
            _ if stats.flat => 0.0,
            AdvantageMode::GroupNorm { eps, .. } => 1.0 / (stats.std + eps as f64),
            AdvantageMode::GroupMean => 1.0,
            AdvantageMode::BatchNorm { eps, .. } => 1.0 / (batch_std + eps as f64),
            // r_i - (sum - r_i) / (G - 1) = G / (G - 1) (r_i - mean); G >= 2 here.
            AdvantageMode::LeaveOneOut => g / (g - 1.0),
        };
        Affine {
            shift: stats.mean,
            scale,
        }
    }
}

/// A group's advantages as an affine map of its rewards.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Affine {
    shift: f64,
    scale: f64,
}

impl Affine {
    /// The advantage of reward `r`. A flat group has `scale = 0`: exactly 0.
    #[inline(always)]
    pub(crate) fn apply(self, r: f64) -> f64 {
        (r - self.shift) * self.scale
    }
}

/// Sums of one group of combined rewards.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GroupStats {
    sum: f64,
    mean: f64,
    /// `sum (r - mean)^2`.
    sq_dev: f64,
    /// Standard deviation in the mode's convention (`AdvantageMode::unbiased`);
    /// 0 for a flat group (its `sq_dev` is 0) or a divisor of 0.
    std: f64,
    /// All rewards exactly equal (or a single one).
    flat: bool,
    /// The smallest and largest reward.
    lo: f64,
    hi: f64,
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

    /// The combined reward of completion `i`, `sum_k w_k values[k][i]`.
    #[inline]
    fn combined(&self, n: usize, i: usize) -> f64 {
        match self.weights {
            None => self.values[i] as f64,
            Some(w) => w
                .iter()
                .enumerate()
                .map(|(k, &wk)| wk as f64 * self.values[k * n + i] as f64)
                .sum(),
        }
    }
}

impl GroupStats {
    /// Sums of one group's combined rewards `r`, `group_size` of them, and
    /// their std (divided by `group_size - 1` if `unbiased`).
    #[inline(always)]
    fn of(r: impl Iterator<Item = f64> + Clone, group_size: usize, unbiased: bool) -> Self {
        let (mut sum, mut lo, mut hi) = (0.0, f64::INFINITY, f64::NEG_INFINITY);
        for x in r.clone() {
            sum += x;
            lo = lo.min(x);
            hi = hi.max(x);
        }
        let flat = lo == hi;
        // A flat group's mean is its value exactly (sum / G may round).
        let mean = if flat { lo } else { sum / group_size as f64 };
        let sq_dev = if flat {
            0.0
        } else {
            r.map(|x| (x - mean) * (x - mean)).sum()
        };
        GroupStats {
            sum,
            mean,
            sq_dev,
            std: std_of(sq_dev, group_size, unbiased),
            flat,
            lo,
            hi,
        }
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

/// Results of [`group_advantages`].
#[derive(Debug, Clone)]
pub struct GroupAdvantages<M: Memory = Host> {
    /// `[P * G]` advantages.
    pub advantages: M::Owned<f32>,
    /// `[P * G]` combined rewards `sum_k w_k values[k]`.
    pub rewards: M::Owned<f32>,
    /// `[P]` group means of the combined rewards.
    pub group_mean: M::Owned<f32>,
    /// `[P]` group standard deviations in the mode's convention (`unbiased`
    /// for the normalizing modes, unbiased for the others), 0 for a flat
    /// group or a group of one.
    pub group_std: M::Owned<f32>,
}

/// One group's slices of the outputs: combined rewards and advantages
/// (`[G]`), mean and std.
type GroupOut<'o> = (((&'o mut [f32], &'o mut [f32]), &'o mut f32), &'o mut f32);

/// Advantages of `P * G` completions from their (weighted) rewards.
///
/// Errors: empty `values`, `group_size == 0`, empty or non-finite `weights`,
/// a `values` length that is not a multiple of `K * G`
/// ([`Error::InvalidLayout`]), `eps` negative or non-finite, a non-finite
/// reward ([`Error::NonFinite`] with its index in `values`), or an output
/// outside f32's range (`what: "weighted rewards"`, `"advantages"` or
/// `"group_std"`; see the module docs).
pub fn group_advantages(rewards: &Rewards<'_>, mode: AdvantageMode) -> Result<GroupAdvantages> {
    let (_, n) = rewards.validate(OP)?;
    mode.validate(OP)?;
    let g = rewards.group_size;
    let unbiased = mode.unbiased();
    let batch_mode = matches!(mode, AdvantageMode::BatchNorm { .. });
    let (mut combined, mut advantages) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut group_mean, mut group_std) = (vec![0.0f32; n / g], vec![0.0f32; n / g]);

    // One pass over each group writes every output (BatchNorm's advantages
    // wait for the batch std) and says whether its combined rewards are
    // finite; the inputs are scanned again only to name a non-finite one.
    let group = |(p, (((comb, adv), mean), std)): (usize, GroupOut<'_>)| {
        let start = p * g;
        let (stats, finite) = match rewards.weights {
            // One component: the rewards themselves, widened exactly (a
            // finite f32's sum in f64 is finite).
            None => {
                let values = &rewards.values[start..start + g];
                comb.copy_from_slice(values);
                let (stats, adv_finite) =
                    stats_and_advantages(values.iter().map(|&v| v as f64), adv, mode, batch_mode);
                (stats, stats.sum.is_finite() & adv_finite)
            }
            Some(_) => {
                // Recomputed per pass: K products are cheaper than a copy.
                let r = (start..start + g).map(|i| rewards.combined(n, i));
                let mut finite = true;
                for (c, x) in comb.iter_mut().zip(r.clone()) {
                    *c = x as f32;
                    finite &= c.is_finite();
                }
                let (stats, adv_finite) = stats_and_advantages(r, adv, mode, batch_mode);
                (stats, finite & adv_finite)
            }
        };
        *mean = stats.mean as f32;
        *std = stats.std as f32;
        (stats, finite & std.is_finite())
    };
    // Each group's output slices, in order.
    macro_rules! groups {
        ($chunks:ident, $items:ident) => {
            combined
                .$chunks(g)
                .zip(advantages.$chunks(g))
                .zip(group_mean.$items())
                .zip(group_std.$items())
                .enumerate()
        };
    }
    // Small batches (GRPO's usual few hundred rewards) run on this thread:
    // a rayon dispatch costs more than the whole op. Only BatchNorm keeps
    // the groups' statistics (a large batch's would cost more memory
    // traffic than the rewards themselves).
    let min_groups = (MIN_TASK / g).max(1);
    let (finite, stats): (bool, Vec<GroupStats>) = match (n > MIN_TASK, batch_mode) {
        (true, false) => (
            groups!(par_chunks_mut, par_iter_mut)
                .with_min_len(min_groups)
                .map(group)
                .all(|(_, finite)| finite),
            Vec::new(),
        ),
        (false, false) => (
            groups!(chunks_mut, iter_mut).all(|item| group(item).1),
            Vec::new(),
        ),
        (true, true) => {
            let (stats, finite): (Vec<GroupStats>, Vec<bool>) = groups!(par_chunks_mut, par_iter_mut)
                .with_min_len(min_groups)
                .map(group)
                .unzip();
            (finite.iter().all(|&f| f), stats)
        }
        (false, true) => {
            let (stats, finite): (Vec<GroupStats>, Vec<bool>) =
                groups!(chunks_mut, iter_mut).map(group).unzip();
            (finite.iter().all(|&f| f), stats)
        }
    };
    if !finite {
        check::finite(OP, "values", rewards.values)?;
        check::finite(OP, "weighted rewards", &combined)?;
        check::finite(OP, "advantages", &advantages)?;
        check::finite(OP, "group_std", &group_std)?;
    }

    if batch_mode {
        // Bounded by sqrt(P G - 1) once the rewards are finite: never overflows.
        let batch_std = batch_std(&stats, g, unbiased);
        for (p, (adv, st)) in advantages.chunks_mut(g).zip(&stats).enumerate() {
            let affine = mode.group_affine(st, g, batch_std);
            for (i, a) in adv.iter_mut().enumerate() {
                *a = affine.apply(rewards.combined(n, p * g + i)) as f32;
            }
        }
    }
    Ok(GroupAdvantages {
        advantages,
        rewards: combined,
        group_mean,
        group_std,
    })
}

/// The statistics of one group's combined rewards `r`, and its advantages
/// into `adv` (`[G]`), but for BatchNorm, whose advantages wait for the
/// batch std; whether those advantages are finite. GroupNorm's are bounded
/// by `sqrt(G - 1)`; in the other modes those of the smallest and largest
/// reward bound the others (the map is monotone, and so is rounding), so
/// two tests cover the group.
#[inline(always)]
fn stats_and_advantages(
    r: impl Iterator<Item = f64> + Clone,
    adv: &mut [f32],
    mode: AdvantageMode,
    batch_mode: bool,
) -> (GroupStats, bool) {
    let g = adv.len();
    let stats = GroupStats::of(r.clone(), g, mode.unbiased());
    if batch_mode {
        return (stats, true);
    }
    let affine = mode.group_affine(&stats, g, 0.0);
    for (a, x) in adv.iter_mut().zip(r) {
        *a = affine.apply(x) as f32;
    }
    let fits = |x: f64| (affine.apply(x) as f32).is_finite();
    let bounded = matches!(mode, AdvantageMode::GroupNorm { .. });
    (stats, bounded || fits(stats.lo) & fits(stats.hi))
}

/// Std of all rewards from the groups' sums (Chan et al.'s pairwise
/// combination: `SS = sum_g SS_g + G (mean_g - mean)^2`), in group order so
/// the result does not depend on threads.
fn batch_std(stats: &[GroupStats], g: usize, unbiased: bool) -> f64 {
    let count = stats.len() * g;
    let mean = stats.iter().map(|s| s.sum).sum::<f64>() / count as f64;
    let sq_dev: f64 = stats
        .iter()
        .map(|s| s.sq_dev + g as f64 * (s.mean - mean).powi(2))
        .sum();
    std_of(sq_dev, count, unbiased)
}

/// Repeats each sequence's value over its tokens: `[S]` in, `[N]` out, with
/// `N` the layout's token count (e.g. per-completion advantages to the
/// per-token advantages of the policy loss).
///
/// Errors: an invalid layout, `per_seq.len() != S`, a non-finite value, a
/// padded layout of more tokens than can be allocated
/// ([`Error::Allocation`]: its `batch * seq_len` is not backed by any input).
pub fn broadcast_to_tokens(per_seq: &[f32], layout: &SeqLayout<'_>) -> Result<Vec<f32>> {
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
    let mut out = check::with_capacity(OP_BROADCAST, "tokens", tokens)?;
    // The validated ranges cover 0..tokens in order.
    for (range, &v) in layout.ranges().zip(per_seq) {
        out.extend(std::iter::repeat_n(v, range.len()));
    }
    Ok(out)
}
