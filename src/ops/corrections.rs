//! Per-token corrections of the policy-gradient term: detached weights and
//! masks that TRL 1.16's `GRPOTrainer` multiplies into the per-token policy
//! loss when the sampler (vLLM) differs from the trainer, or when tokens or
//! sequences are filtered. Each op writes an `[N]` f32 weight per token, to
//! be passed as the policy loss's per-token `pg_weights` (it scales the
//! policy-gradient term only, not the KL penalty, as in TRL).
//!
//! | op | TRL 1.16 (`trl/trainer/grpo_trainer.py`) |
//! |---|---|
//! | [`sampler_is_weights`] | `vllm_importance_sampling_correction` (lines 2659-2708, statistics 2860-2896) |
//! | [`off_policy_mask`] | `GRPOTrainer.get_off_policy_mask` (OPSM, DeepSeek-V3.2 eq. 9), `off_policy_mask_threshold` |
//! | [`high_entropy_mask`] | `GRPOTrainer.get_high_entropy_mask`, `top_entropy_quantile` |
//! | [`mask_truncated_completions`] | `mask_truncated_completions` (lines 2487-2495) |
//!
//! The math, with `m_t` the mask, `o_t` the trainer's log-prob (`old_logp`
//! for IS, the current detached `logp` for OPSM) and `v_t` the sampler's:
//!
//! ```text
//! d_t   = nan_to_num(m_t (o_t - v_t))               (NaN -> 0, +-inf -> +-f32::MAX)
//! token:    r_t = exp(d_t)
//! sequence: r_t = exp(sum_{t in s} d_t)              (for every token of s)
//! truncate: w_t = clamp(r_t, clip_min, clip_max)
//! mask:     w_t = r_t if clip_min <= r_t <= clip_max else 0   (a missing bound is infinite)
//!
//! OPSM:    keep_s = A_s >= 0  or  sum_{t in s} m_t nan_to_num(v_t - o_t) / max(1, sum m_t) <= delta
//! entropy: w_t = m_t [H_t >= quantile({H_t : m_t = 1}, 1 - rho)]    (all 0 if no token is masked in)
//! ```
//!
//! **Composition.** Every op has an `_into` form that *multiplies* its
//! weights into a caller's buffer (`weights[t] *= w_t` at every token,
//! padding included), so several corrections combine into one `[N]` buffer
//! with no allocation: start from ones, apply each, pass the buffer to the
//! policy loss. TRL's order of factors does not matter (products of
//! non-negative finite weights). A vLLM-IS + OPSM + entropy-mask step:
//!
//! ```
//! use grpo_kernels::ops::corrections::*;
//! use grpo_kernels::SeqLayout;
//! # fn main() -> grpo_kernels::Result<()> {
//! // Two sequences padded to 3 tokens; the second has one padding token.
//! let layout = || SeqLayout::Padded { batch: 2, seq_len: 3 };
//! let mask = [1u8, 1, 1, 1, 1, 0];
//! let logp = [-1.0f32, -0.5, -2.0, -0.7, -1.2, 0.0]; // current policy (detached)
//! let old_logp = [-1.1f32, -0.5, -1.9, -0.7, -1.0, 0.0]; // trainer, before the update
//! let sampler_logp = [-1.0f32, f32::NAN, -2.1, -0.6, -1.3, 0.0]; // vLLM (NaN: not scored)
//! let entropy = [0.3f32, 1.2, 0.8, 2.0, 0.1, 0.0];
//! let advantages = [0.5f32, -1.0]; // per sequence
//!
//! let mut pg_weights = vec![1.0f32; 6];
//! // vllm_importance_sampling_correction=True, mode "sequence_mask", clip_max 3.0
//! let is = SamplerLogps { logp: &old_logp[..], sampler_logp: &sampler_logp[..], mask: Some(&mask[..]), layout: layout() };
//! let stats = sampler_is_weights_into(&is, &SamplerIsConfig::default(), &mut pg_weights)?;
//! // off_policy_mask_threshold = 0.5 (current log-probs against the sampler's)
//! let opsm = SamplerLogps { logp: &logp[..], sampler_logp: &sampler_logp[..], mask: Some(&mask[..]), layout: layout() };
//! off_policy_mask_into(&opsm, &advantages, 0.5, &mut pg_weights)?;
//! // top_entropy_quantile = 0.2
//! high_entropy_mask_into(&entropy, Some(&mask), 0.2, &mut pg_weights)?;
//! // pg_weights now goes to the policy loss as its per-token `pg_weights`.
//! assert!(pg_weights.iter().all(|w| w.is_finite() && *w >= 0.0));
//! assert!(stats.ratio_max >= stats.ratio_min);
//! # Ok(()) }
//! ```
//!
//! All outputs are detached: no op here has a backward (TRL computes them
//! under `torch.no_grad()` or from detached tensors), and the candle ops
//! return tensors outside the autograd graph.
//!
//! **Inputs** (the crate's [rule](crate::error)): at masked-in tokens the
//! trainer's log-probs and the entropies must be finite, and advantages
//! must be finite; the sampler's log-prob may be NaN (vLLM could not score
//! the token: TRL gives it a zero difference), but not infinite. Padding
//! (mask 0) is never read. A weight that is not finite (a sequence-level
//! ratio beyond f32 under a mode without upper bound, or a product with a
//! caller's non-finite weight) is [`Error::NonFinite`]
//! with `what: "weights"`.
//!
//! **Exact quantile.** [`high_entropy_mask`] follows `torch.quantile`
//! (linear interpolation) on the f32 values: `q = f32(1 - rho)`, the rank
//! `q (M - 1)` in f64, its weight rounded to f32, the two order statistics
//! by selection (not a sort: `O(M)` expected), and torch's CPU `lerp` in f32 (`w < 0.5 ?
//! a + w (b - a) : b - (b - a)(1 - w)`, each with one rounding, a fused
//! multiply-add). The fixture test finds the threshold equal to torch's bit
//! for bit, and the mask therefore exactly equal.

use rayon::prelude::*;

use crate::element::TokenId;
use crate::error::{check, Error, Result};
use crate::memory::{Host, Memory};
use crate::ops::layout::SeqLayout;

pub(crate) const OP_IS: &str = "sampler_is_weights";
pub(crate) const OP_OPSM: &str = "off_policy_mask";
pub(crate) const OP_ENTROPY: &str = "high_entropy_mask";
pub(crate) const OP_TRUNCATED: &str = "mask_truncated_completions";

/// TRL's `vllm_importance_sampling_mode`: the level of the sampler
/// importance ratio, and what happens outside `[clip_min, clip_max]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IsMode {
    /// `"token_truncate"`: per-token ratios clamped to the bounds.
    TokenTruncate,
    /// `"token_mask"`: per-token ratios outside the bounds set to 0.
    TokenMask,
    /// `"sequence_truncate"`: one ratio per sequence (the exponential of
    /// the summed log-ratio), clamped, for every token of the sequence.
    SequenceTruncate,
    /// `"sequence_mask"` (TRL's default): one ratio per sequence, 0 outside
    /// the bounds.
    #[default]
    SequenceMask,
}

impl IsMode {
    /// One ratio per sequence.
    pub fn sequence_level(self) -> bool {
        matches!(self, IsMode::SequenceTruncate | IsMode::SequenceMask)
    }

    /// Ratios outside the bounds become 0 (else they are clamped).
    pub fn masks(self) -> bool {
        matches!(self, IsMode::TokenMask | IsMode::SequenceMask)
    }
}

/// The sampler importance-sampling correction (TRL's
/// `vllm_importance_sampling_mode`, `vllm_importance_sampling_clip_min`,
/// `vllm_importance_sampling_clip_max`; defaults are TRL's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerIsConfig {
    /// Token or sequence level, truncate or mask.
    pub mode: IsMode,
    /// Lower bound `C_min` (`None`: none); finite and >= 0.
    pub clip_min: Option<f32>,
    /// Upper bound `C_max` (`None`: none); finite, >= 0 and >= `clip_min`.
    pub clip_max: Option<f32>,
}

impl Default for SamplerIsConfig {
    fn default() -> Self {
        Self {
            mode: IsMode::SequenceMask,
            clip_min: None,
            clip_max: Some(3.0),
        }
    }
}

impl SamplerIsConfig {
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        for (name, b) in [("clip_min", self.clip_min), ("clip_max", self.clip_max)] {
            if let Some(b) = b {
                check::param(op, name, b as f64, b >= 0.0, "finite and >= 0")?;
            }
        }
        if let (Some(lo), Some(hi)) = (self.clip_min, self.clip_max) {
            check::param(op, "clip_max", hi as f64, hi >= lo, "finite and >= clip_min")?;
        }
        if !self.mode.masks() && self.clip_min.is_none() && self.clip_max.is_none() {
            return Err(Error::Unsupported {
                op,
                reason: "a truncate mode needs clip_min or clip_max (TRL's torch.clamp with neither raises)"
                    .into(),
            });
        }
        Ok(())
    }

    /// The bounds, a missing one infinite.
    pub(crate) fn bounds(&self) -> (f32, f32) {
        (
            self.clip_min.unwrap_or(f32::NEG_INFINITY),
            self.clip_max.unwrap_or(f32::INFINITY),
        )
    }

    /// The weight of the importance ratio `r` (`torch.clamp`, or the mask).
    #[inline]
    pub fn weight(&self, r: f32) -> f32 {
        let (lo, hi) = self.bounds();
        if self.mode.masks() {
            if r < lo || r > hi {
                0.0
            } else {
                r
            }
        } else {
            r.max(lo).min(hi)
        }
    }
}

/// The trainer's and the sampler's log-probs of the sampled tokens, `[N]`
/// each, with the mask and the sequences.
pub struct SamplerLogps<'a, M: Memory = Host> {
    /// The trainer's log-probs: `old_logp` for [`sampler_is_weights`], the
    /// current (detached) `logp` for [`off_policy_mask`]. Finite where the
    /// mask is 1.
    pub logp: M::Buf<'a, f32>,
    /// The sampler's log-probs; NaN where it could not score the token
    /// (no correction there), never infinite where the mask is 1.
    pub sampler_logp: M::Buf<'a, f32>,
    /// `[N]`, 0 = padding (never read); `None`: every token counts.
    pub mask: Option<M::Buf<'a, u8>>,
    /// How the tokens group into sequences.
    pub layout: SeqLayout<'a, M>,
}

impl<M: Memory> SamplerLogps<'_, M> {
    /// Checks the lengths and the layout's shape; returns `(N, S)`.
    pub(crate) fn validate_shape(&self, op: &'static str) -> Result<(usize, usize)> {
        let n = M::len(&self.logp);
        check::non_empty(op, "logp", n)?;
        check::len(op, "sampler_logp", n, M::len(&self.sampler_logp))?;
        if let Some(m) = &self.mask {
            check::len(op, "mask", n, M::len(m))?;
        }
        let s = self.layout.validate_shape(op, n)?;
        Ok((n, s))
    }
}

impl SamplerLogps<'_, Host> {
    /// Full host validation: shape, offsets, log-probs at masked-in tokens.
    fn validate(&self, op: &'static str) -> Result<(usize, usize)> {
        let (n, s) = self.validate_shape(op)?;
        self.layout.validate(op, n)?;
        let on = |i: usize| self.mask.is_none_or(|m| m[i] != 0);
        let first = |xs: &[f32], ok: fn(f32) -> bool| (0..n).find(|&i| on(i) && !ok(xs[i]));
        if let Some(index) = first(self.logp, f32::is_finite) {
            return Err(Error::NonFinite {
                op,
                what: "logp",
                index,
            });
        }
        if let Some(index) = first(self.sampler_logp, |x| !x.is_infinite()) {
            return Err(Error::NonFinite {
                op,
                what: "sampler_logp",
                index,
            });
        }
        Ok((n, s))
    }
}

/// torch's `nan_to_num(x, nan=0.0)` in f32: NaN to 0, infinities to
/// `+-f32::MAX`.
#[inline]
pub(crate) fn nan_to_num(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-f32::MAX, f32::MAX)
    }
}

/// What TRL logs for the sampler correction (`sampling/...` metrics), on
/// one process: min, mean and max of the importance ratio (over masked-in
/// tokens at token level, over all sequences at sequence level), and mean
/// and max of `|old_logp - sampler_logp|` over masked-in tokens the sampler
/// scored. Each is 0 when it has no element, as in TRL.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplerIsStats {
    /// `sampling/importance_sampling_ratio/min`.
    pub ratio_min: f32,
    /// `sampling/importance_sampling_ratio/mean`.
    pub ratio_mean: f32,
    /// `sampling/importance_sampling_ratio/max`.
    pub ratio_max: f32,
    /// `sampling/sampling_logp_difference/mean`.
    pub logp_diff_mean: f32,
    /// `sampling/sampling_logp_difference/max`.
    pub logp_diff_max: f32,
}

/// Per-sequence partial statistics, merged in sequence order (the CUDA
/// kernel writes one per sequence, the host merges them the same way).
#[derive(Debug, Clone, Copy)]
pub(crate) struct IsPartial {
    pub ratio_sum: f64,
    pub ratio_count: u64,
    pub ratio_min: f32,
    pub ratio_max: f32,
    pub diff_sum: f64,
    pub diff_count: u64,
    pub diff_max: f32,
}

impl IsPartial {
    pub(crate) const EMPTY: IsPartial = IsPartial {
        ratio_sum: 0.0,
        ratio_count: 0,
        ratio_min: f32::INFINITY,
        ratio_max: f32::NEG_INFINITY,
        diff_sum: 0.0,
        diff_count: 0,
        diff_max: f32::NEG_INFINITY,
    };

    fn ratio(&mut self, r: f32) {
        self.ratio_sum += r as f64;
        self.ratio_count += 1;
        self.ratio_min = self.ratio_min.min(r);
        self.ratio_max = self.ratio_max.max(r);
    }

    fn merge(self, o: IsPartial) -> IsPartial {
        IsPartial {
            ratio_sum: self.ratio_sum + o.ratio_sum,
            ratio_count: self.ratio_count + o.ratio_count,
            ratio_min: self.ratio_min.min(o.ratio_min),
            ratio_max: self.ratio_max.max(o.ratio_max),
            diff_sum: self.diff_sum + o.diff_sum,
            diff_count: self.diff_count + o.diff_count,
            diff_max: self.diff_max.max(o.diff_max),
        }
    }

    /// The statistics of the merged partials.
    pub(crate) fn stats(parts: impl IntoIterator<Item = IsPartial>) -> SamplerIsStats {
        let p = parts.into_iter().fold(IsPartial::EMPTY, IsPartial::merge);
        let or0 = |count: u64, x: f32| if count == 0 { 0.0 } else { x };
        SamplerIsStats {
            ratio_min: or0(p.ratio_count, p.ratio_min),
            ratio_mean: or0(p.ratio_count, (p.ratio_sum / p.ratio_count.max(1) as f64) as f32),
            ratio_max: or0(p.ratio_count, p.ratio_max),
            logp_diff_mean: or0(p.diff_count, (p.diff_sum / p.diff_count.max(1) as f64) as f32),
            logp_diff_max: or0(p.diff_count, p.diff_max),
        }
    }
}

/// The sampler importance weights of [`sampler_is_weights`], with TRL's
/// statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerIs {
    /// `[N]` weights (a sequence's ratio on each of its tokens at sequence
    /// level; at padding, the weight of a zero difference, as in TRL).
    pub weights: Vec<f32>,
    /// TRL's logged statistics.
    pub stats: SamplerIsStats,
}

/// The sampler importance-sampling weights of TRL's
/// `vllm_importance_sampling_correction` (the math in the
/// [module docs](self)): `exp(old_logp - sampler_logp)` per token, or per
/// sequence from the summed difference, clamped to or masked by
/// `[clip_min, clip_max]`. `inputs.logp` is the trainer's `old_logp`.
/// Detached: no backward.
///
/// Errors: empty input, length mismatches, bad offsets, a non-finite
/// `old_logp` (`what: "logp"`) or an infinite `sampler_logp` at a
/// masked-in token, bounds out of range (`clip_max < clip_min`), a truncate
/// mode with no bound ([`Error::Unsupported`]), a non-finite weight.
pub fn sampler_is_weights(inputs: &SamplerLogps<'_>, cfg: &SamplerIsConfig) -> Result<SamplerIs> {
    let n = inputs.logp.len();
    let mut weights = check::filled(OP_IS, "weights", n, 1.0f32)?;
    let stats = sampler_is_weights_into(inputs, cfg, &mut weights)?;
    Ok(SamplerIs { weights, stats })
}

/// [`sampler_is_weights`] multiplied into `weights` `[N]` (`weights[t] *=
/// w_t`; unspecified after an error); returns TRL's statistics.
pub fn sampler_is_weights_into(
    inputs: &SamplerLogps<'_>,
    cfg: &SamplerIsConfig,
    weights: &mut [f32],
) -> Result<SamplerIsStats> {
    cfg.validate(OP_IS)?;
    let (n, _) = inputs.validate(OP_IS)?;
    check::len(OP_IS, "weights", n, weights.len())?;
    let parts: Vec<IsPartial> = per_sequence(&inputs.layout, weights)
        .into_par_iter()
        .map(|(range, w)| is_sequence(inputs, cfg, range, w))
        .collect();
    check::finite(OP_IS, "weights", weights)?;
    Ok(IsPartial::stats(parts))
}

/// One sequence of [`sampler_is_weights_into`]: multiplies its weights into
/// `w` and returns its partial statistics.
fn is_sequence(
    inputs: &SamplerLogps<'_>,
    cfg: &SamplerIsConfig,
    range: std::ops::Range<usize>,
    w: &mut [f32],
) -> IsPartial {
    let mut part = IsPartial::EMPTY;
    let diff = |t: usize| {
        if inputs.mask.is_some_and(|m| m[t] == 0) {
            return None;
        }
        Some((inputs.logp[t], inputs.sampler_logp[t]))
    };
    let mut seq_sum = 0.0f64;
    for t in range.clone() {
        let Some((o, v)) = diff(t) else { continue };
        let delta = o - v;
        if !delta.is_nan() {
            part.diff_sum += delta.abs() as f64;
            part.diff_count += 1;
            part.diff_max = part.diff_max.max(delta.abs());
        }
        seq_sum += nan_to_num(delta) as f64;
    }
    if cfg.mode.sequence_level() {
        // TRL sums the f32 differences; the f64 sum rounded once is within
        // the fixture's tolerance and independent of the summation order.
        let r = cfg.weight((seq_sum as f32).exp());
        w.iter_mut().for_each(|x| *x *= r);
        part.ratio(r);
    } else {
        for (x, t) in w.iter_mut().zip(range) {
            match diff(t) {
                Some((o, v)) => {
                    let r = cfg.weight(nan_to_num(o - v).exp());
                    part.ratio(r);
                    *x *= r;
                }
                // A zero difference: exp(0) = 1, then the bounds.
                None => *x *= cfg.weight(1.0),
            }
        }
    }
    part
}

/// The off-policy sequence mask of TRL's `get_off_policy_mask` (OPSM,
/// DeepSeek-V3.2): 1 on every token of a sequence whose advantage is `>= 0`
/// or whose mean over masked-in tokens of `nan_to_num(sampler_logp - logp)`
/// is `<= threshold`, else 0. `inputs.logp` is the current (detached)
/// policy's log-probs; `advantages` `[S]`, one per sequence. Detached.
///
/// Errors: those of [`sampler_is_weights`] for the inputs, `advantages`'
/// length or a non-finite advantage, a non-finite `threshold`.
pub fn off_policy_mask(inputs: &SamplerLogps<'_>, advantages: &[f32], threshold: f32) -> Result<Vec<f32>> {
    ones(OP_OPSM, inputs.logp.len(), |w| {
        off_policy_mask_into(inputs, advantages, threshold, w)
    })
}

/// [`off_policy_mask`] multiplied into `weights` `[N]`.
pub fn off_policy_mask_into(
    inputs: &SamplerLogps<'_>,
    advantages: &[f32],
    threshold: f32,
    weights: &mut [f32],
) -> Result<()> {
    check::param(OP_OPSM, "threshold", threshold as f64, true, "finite")?;
    let (n, s) = inputs.validate(OP_OPSM)?;
    check::len(OP_OPSM, "advantages", s, advantages.len())?;
    check::finite(OP_OPSM, "advantages", advantages)?;
    check::len(OP_OPSM, "weights", n, weights.len())?;
    per_sequence(&inputs.layout, weights)
        .into_par_iter()
        .zip(advantages)
        .for_each(|((range, w), &a)| {
            let keep = a >= 0.0 || mean_sampler_kl(inputs, range) <= threshold;
            if !keep {
                w.iter_mut().for_each(|x| *x *= 0.0);
            }
        });
    check::finite(OP_OPSM, "weights", weights)
}

/// A sequence's mean over masked-in tokens of `nan_to_num(sampler_logp -
/// logp)` (0 over none), summed in f64 and rounded once.
pub(crate) fn mean_sampler_kl(inputs: &SamplerLogps<'_>, range: std::ops::Range<usize>) -> f32 {
    let (mut sum, mut count) = (0.0f64, 0u64);
    for t in range {
        if inputs.mask.is_none_or(|m| m[t] != 0) {
            sum += nan_to_num(inputs.sampler_logp[t] - inputs.logp[t]) as f64;
            count += 1;
        }
    }
    (sum as f32) / (count.max(1) as f32)
}

/// `torch.quantile`'s `q` for TRL's `top_entropy_quantile = rho`: the
/// f64 `1 - rho` rounded to f32, as torch makes a tensor of it.
pub(crate) fn entropy_q(top_quantile: f64) -> f32 {
    (1.0 - top_quantile) as f32
}

/// The lower order statistic's index, the upper one's (`below` or
/// `below + 1`) and the interpolation weight of `torch.quantile(x, q)` over
/// `m >= 1` values, as torch computes them: the rank `q (m - 1)` from the
/// f32 `q` in f64, truncated, and the weight `rank - below` rounded to f32
/// (confirmed bit for bit against torch by the fixture script).
pub(crate) fn quantile_rank(q: f32, m: usize) -> (usize, usize, f32) {
    let rank = q as f64 * (m - 1) as f64;
    let below = rank as usize;
    let above = (rank.ceil() as usize).min(m - 1);
    (below, above, (rank - below as f64) as f32)
}

/// torch's CPU `lerp(a, b, w)` in f32: `a + w (b - a)` for `|w| < 0.5`,
/// else `b - (b - a)(1 - w)`, the product and sum fused.
pub(crate) fn torch_lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(b - a, a)
    } else {
        (w - 1.0).mul_add(b - a, b)
    }
}

/// `torch.quantile(values, q)` (linear interpolation) by selection; reorders
/// `values`. `values` is not empty and holds no NaN.
pub(crate) fn torch_quantile(values: &mut [f32], q: f32) -> f32 {
    let (below, above, w) = quantile_rank(q, values.len());
    let (_, &mut lo, rest) = values.select_nth_unstable_by(below, f32::total_cmp);
    let hi = if above == below {
        lo
    } else {
        rest.iter().copied().min_by(f32::total_cmp).unwrap_or(lo)
    };
    torch_lerp(lo, hi, w)
}

/// TRL's `get_high_entropy_mask` for `top_entropy_quantile = top_quantile`
/// (`rho` in `[0, 1]`): 1 at masked-in tokens whose entropy is `>=`
/// `torch.quantile` of the masked-in entropies at `1 - rho` (linear
/// interpolation), else 0; all 0 when no token is masked in. Exact:
/// selection on the f32 values and torch's f32 arithmetic (module docs).
/// Also returns the threshold (`None` with no masked-in token). Detached.
///
/// Errors: empty `entropy`, `mask`'s length, a non-finite entropy at a
/// masked-in token, `top_quantile` outside `[0, 1]`.
pub fn high_entropy_mask(
    entropy: &[f32],
    mask: Option<&[u8]>,
    top_quantile: f64,
) -> Result<(Vec<f32>, Option<f32>)> {
    let mut t = None;
    let w = ones(OP_ENTROPY, entropy.len(), |w| {
        t = high_entropy_mask_into(entropy, mask, top_quantile, w)?;
        Ok(())
    })?;
    Ok((w, t))
}

/// The lengths and quantile of [`high_entropy_mask_into`] (and its CUDA
/// form), for `n` entropies: returns `n`.
pub(crate) fn validate_entropy_mask(
    n: usize,
    mask: Option<usize>,
    top_quantile: f64,
    weights: usize,
) -> Result<usize> {
    let op = OP_ENTROPY;
    check::param(
        op,
        "top_quantile",
        top_quantile,
        (0.0..=1.0).contains(&top_quantile),
        "in [0, 1]",
    )?;
    check::non_empty(op, "entropy", n)?;
    if let Some(m) = mask {
        check::len(op, "mask", n, m)?;
    }
    check::len(op, "weights", n, weights)?;
    Ok(n)
}

/// [`high_entropy_mask`] multiplied into `weights` `[N]`; returns the
/// threshold. Allocates one scratch copy of the masked-in entropies for the
/// selection.
pub fn high_entropy_mask_into(
    entropy: &[f32],
    mask: Option<&[u8]>,
    top_quantile: f64,
    weights: &mut [f32],
) -> Result<Option<f32>> {
    let op = OP_ENTROPY;
    let n = validate_entropy_mask(entropy.len(), mask.map(<[u8]>::len), top_quantile, weights.len())?;
    let on = |i: usize| mask.is_none_or(|m| m[i] != 0);
    if let Some(index) = (0..n).find(|&i| on(i) && !entropy[i].is_finite()) {
        return Err(Error::NonFinite {
            op,
            what: "entropy",
            index,
        });
    }
    let m = (0..n).filter(|&i| on(i)).count();
    let mut scratch = check::with_capacity(op, "scratch", m)?;
    scratch.extend((0..n).filter(|&i| on(i)).map(|i| entropy[i]));
    let threshold = (m > 0).then(|| torch_quantile(&mut scratch, entropy_q(top_quantile)));
    for (i, x) in weights.iter_mut().enumerate() {
        let keep = threshold.is_some_and(|t| on(i) && entropy[i] >= t);
        *x *= if keep { 1.0 } else { 0.0 };
    }
    check::finite(op, "weights", weights)?;
    Ok(threshold)
}

/// TRL's `mask_truncated_completions`: zeroes the mask of every sequence
/// whose last completion token (its last masked-in token: apply this to
/// the completion mask, before any tool mask) is none of `stop_ids` (the
/// EOS ids and the pad id). Returns how many sequences it masked. A
/// sequence with no masked-in token is left as is.
///
/// Errors: `token_ids` empty, `mask`'s length, bad offsets.
pub fn mask_truncated_completions<T: TokenId>(
    token_ids: &[T],
    layout: &SeqLayout<'_>,
    stop_ids: &[i64],
    mask: &mut [u8],
) -> Result<usize> {
    let op = OP_TRUNCATED;
    let n = token_ids.len();
    check::non_empty(op, "token_ids", n)?;
    check::len(op, "mask", n, mask.len())?;
    layout.validate(op, n)?;
    let mut truncated = 0;
    for range in layout.ranges() {
        let seq = &mut mask[range.clone()];
        let Some(last) = seq.iter().rposition(|&m| m != 0) else {
            continue;
        };
        if !stop_ids.contains(&token_ids[range.start + last].to_i64()) {
            seq.fill(0);
            truncated += 1;
        }
    }
    Ok(truncated)
}

/// Ones `[n]`, then `apply` multiplies into them.
fn ones(op: &'static str, n: usize, apply: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<Vec<f32>> {
    let mut w = check::filled(op, "weights", n, 1.0f32)?;
    apply(&mut w)?;
    Ok(w)
}

/// `weights` split into its sequences, with their token ranges (a validated
/// layout covers it exactly).
fn per_sequence<'w>(
    layout: &SeqLayout<'_>,
    weights: &'w mut [f32],
) -> Vec<(std::ops::Range<usize>, &'w mut [f32])> {
    // The ranges are contiguous and in order: each starts where the last ended.
    let mut rest = weights;
    layout
        .ranges()
        .map(|r| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
            rest = tail;
            (r, head)
        })
        .collect()
}
