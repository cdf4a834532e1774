//! Token log-probs: the log-probability of each row's target token under
//! `softmax(logits / T)`, optionally the entropy of that distribution, and
//! the row's log-sum-exp, saved for the backward pass.
//!
//! For row `i` with scaled logits `x_j = z_j / T` and target `y`:
//!
//! ```text
//! lse_i  = log sum_j e^(x_j)
//! logp_i = x_y - lse_i
//! H_i    = -sum_j p_j log p_j,          p_j = e^(x_j - lse_i)
//! ```
//!
//! Backward, for upstream gradients `g` (of logp), `g_H` (of H) and `g_L`
//! (of lse):
//!
//! ```text
//! dz_j = ( g (1[j=y] - p_j) + g_L p_j - g_H p_j (log p_j + H) ) / T
//! ```
//!
//! One pass over the logits in the forward (online max/sum merge, see
//! the crate's `SoftmaxState`), one read and one
//! write in the backward; only `lse` (and `H` when its gradient is wanted)
//! is saved in between. This is TRL's
//! `selective_log_softmax` and entropy, fused.
//!
//! **Layouts.** The op is row-wise: a padded batch `[B, T, V]` is `B*T` rows
//! with a `mask` (or targets equal to `ignore_index`) marking padding, and a
//! packed batch is its `cu_seqlens[S]` rows back to back. Rows that are
//! masked or ignored are never read: their outputs and gradients are 0.
//!
//! **Non-finite values** (the crate's [rule](crate::error)). `-inf` is an
//! allowed logit and means probability 0 (a row needs one finite logit). A
//! NaN or `+inf` logit in an active row is [`Error::NonFinite`] with `what:
//! "logits"` and the row; a finite logit whose scaled value `z / T`
//! overflows f32 is `what: "logits / temperature"`. A target's log-prob must
//! be finite: a target of probability 0 (a `-inf` logit), or one whose
//! scaled logit lies more than `f32::MAX` below the row's log-sum-exp, is
//! `what: "logp"`. The temperature must have a finite reciprocal (`T >=
//! 1 / f32::MAX`, about 2.9e-39).
//!
//! The backward reads, at each active row only, the saved `lse` (and
//! `entropy` when an entropy gradient is given) and the upstream gradients:
//! a NaN or infinity there is `NonFinite` naming it (`lse`, `entropy`,
//! `grad_logp`, `grad_entropy`, `grad_lse`), found before anything is
//! written. Its result is bounded per row by
//!
//! ```text
//! |dz_j| <= ( |c| + 87.4 |g_H| + |g| ) / T        (p_j <= 1, p_j |log p_j| <= 87.4 p_j where p_j > 0)
//! ```
//!
//! and a row whose bound exceeds the logits dtype's largest value (f32,
//! bf16: about 3.4e38; f16: 65504) is `what: "dlogits"`, so the gradient
//! written is always finite. (`log p_j` is taken as at most 0, which it is
//! for the forward's own `lse`: a smaller `lse` passed in cannot push
//! `p_j` above 1.)

use rayon::prelude::*;

use crate::element::{Float, TokenId};
use crate::error::{check, Error, Result};
use crate::memory::{opt_len, Host, Memory};
use crate::ops::math::{self, multiversion, BLOCK};

pub(crate) const OP: &str = "token_logprobs";
pub(crate) const OP_BWD: &str = "token_logprobs_backward";

/// Parameters of [`token_logprobs`] and its backward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogProbConfig {
    /// Softmax temperature `T > 0`; logits are divided by it.
    pub temperature: f32,
    /// Also compute each row's entropy.
    pub entropy: bool,
    /// Rows whose target equals this id are skipped (Hugging Face uses -100).
    pub ignore_index: Option<i64>,
}

impl Default for LogProbConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            entropy: false,
            ignore_index: Some(-100),
        }
    }
}

impl LogProbConfig {
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        let t = self.temperature as f64;
        let ok = t > 0.0 && (1.0 / self.temperature).is_finite();
        check::param(
            op,
            "temperature",
            t,
            ok,
            "finite and >= 1 / f32::MAX (about 2.9e-39)",
        )
    }

    /// Whether a row with this target (and mask value) is computed.
    #[inline(always)]
    pub(crate) fn is_active(&self, target: i64, mask: u8) -> bool {
        mask != 0 && Some(target) != self.ignore_index
    }
}

/// Logit rows and their targets: `logits` is `[rows, vocab]` row-major,
/// `targets` and the optional `mask` (0 = skip) are `[rows]`.
pub struct LogitRows<'a, T: 'a, I: 'a, M: Memory = Host> {
    /// `[rows, vocab]`, row-major.
    pub logits: M::Buf<'a, T>,
    /// `[rows]`: the token whose log-prob is wanted.
    pub targets: M::Buf<'a, I>,
    /// `[rows]`: 0 skips the row.
    pub mask: Option<M::Buf<'a, u8>>,
    /// Vocabulary size `V`.
    pub vocab: usize,
}

impl<'a, T: 'a, I: 'a, M: Memory> LogitRows<'a, T, I, M> {
    /// Number of rows (tokens).
    pub fn rows(&self) -> usize {
        M::len(&self.targets)
    }

    /// Checks every length; returns the row count.
    pub(crate) fn validate(&self, op: &'static str) -> Result<usize> {
        validate_lens(
            op,
            self.vocab,
            M::len(&self.logits),
            self.rows(),
            opt_len::<M, u8>(&self.mask),
        )
    }
}

impl<'a, T, I> LogitRows<'a, T, I, Host> {
    /// `logits` `[rows, vocab]` and `targets` `[rows]`, no mask.
    pub fn new(logits: &'a [T], targets: &'a [I], vocab: usize) -> Self {
        Self {
            logits,
            targets,
            mask: None,
            vocab,
        }
    }

    /// The same rows with a mask (0 = skip the row).
    pub fn with_mask(self, mask: &'a [u8]) -> Self {
        Self {
            mask: Some(mask),
            ..self
        }
    }
}

/// Length checks of a `[rows, vocab]` logits buffer with its targets and mask.
pub(crate) fn validate_lens(
    op: &'static str,
    vocab: usize,
    logits: usize,
    rows: usize,
    mask: Option<usize>,
) -> Result<usize> {
    check::non_empty(op, "targets", rows)?;
    check::non_empty(op, "vocab", vocab)?;
    let expected = rows.checked_mul(vocab).ok_or_else(|| Error::InvalidLayout {
        op,
        reason: format!("{rows} rows x {vocab} vocab overflows usize"),
    })?;
    check::len(op, "logits", expected, logits)?;
    if let Some(n) = mask {
        check::len(op, "mask", rows, n)?;
    }
    Ok(rows)
}

/// Forward results, one value per row (0 for skipped rows).
#[derive(Debug, Clone, PartialEq)]
pub struct LogProbs<M: Memory = Host> {
    /// `log p(target)`.
    pub logp: M::Owned<f32>,
    /// Entropy of the row's distribution, if asked for.
    pub entropy: Option<M::Owned<f32>>,
    /// `logsumexp(logits / T)`, saved for the backward.
    pub lse: M::Owned<f32>,
}

/// What the backward needs from the forward.
pub struct LogProbSaved<'a, M: Memory = Host> {
    /// The forward's `lse`.
    pub lse: M::Buf<'a, f32>,
    /// Needed only when an entropy gradient is given.
    pub entropy: Option<M::Buf<'a, f32>>,
}

impl LogProbs<Host> {
    /// Borrows what [`token_logprobs_backward`] needs.
    pub fn saved(&self) -> LogProbSaved<'_, Host> {
        LogProbSaved {
            lse: &self.lse,
            entropy: self.entropy.as_deref(),
        }
    }
}

/// Upstream gradients of the forward's outputs, one per row. Absent
/// gradients are zero.
pub struct LogProbGrads<'a, M: Memory = Host> {
    /// `dL/dlogp`.
    pub logp: M::Buf<'a, f32>,
    /// `dL/dH`.
    pub entropy: Option<M::Buf<'a, f32>>,
    /// `dL/dlse`.
    pub lse: Option<M::Buf<'a, f32>>,
}

impl<M: Memory> LogProbGrads<'_, M> {
    pub(crate) fn validate(&self, op: &'static str, rows: usize, saved: &LogProbSaved<'_, M>) -> Result<()> {
        check::len(op, "grad_logp", rows, M::len(&self.logp))?;
        check::len(op, "lse", rows, M::len(&saved.lse))?;
        if let Some(n) = opt_len::<M, f32>(&self.lse) {
            check::len(op, "grad_lse", rows, n)?;
        }
        if let Some(n) = opt_len::<M, f32>(&self.entropy) {
            check::len(op, "grad_entropy", rows, n)?;
            match opt_len::<M, f32>(&saved.entropy) {
                Some(n) => check::len(op, "entropy", rows, n)?,
                None => {
                    return Err(Error::Unsupported {
                        op,
                        reason: "an entropy gradient needs the forward's entropy \
                                 (run the forward with `entropy: true`)"
                            .into(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// Per-row token log-probs, entropies and log-sum-exps of `softmax(logits / T)`.
///
/// Errors: empty input, length mismatches, a temperature out of range, a
/// target outside `0..vocab` (unless ignored), a non-finite logit, scaled
/// logit or target log-prob in an active row (see the module docs).
pub fn token_logprobs<T: Float, I: TokenId>(
    rows: &LogitRows<'_, T, I>,
    cfg: &LogProbConfig,
) -> Result<LogProbs> {
    let n = rows.validate(OP)?;
    cfg.validate(OP)?;
    let active = active_rows(OP, rows.targets, rows.mask, rows.vocab, cfg)?;
    let mut logp = vec![0.0f32; n];
    let mut entropy = cfg.entropy.then(|| vec![0.0f32; n]);
    let mut lse = vec![0.0f32; n];
    let mut out = LogProbsOut {
        logp: &mut logp,
        entropy: entropy.as_deref_mut(),
        lse: &mut lse,
    };
    forward_into(rows, cfg, n, &active, &mut out)?;
    Ok(LogProbs { logp, entropy, lse })
}

/// Where [`token_logprobs_into`] writes: caller-provided `[rows]` buffers
/// (the host twin of the CUDA side's `cuda::LogProbsOut`). Every element is
/// written; after an error their contents are unspecified.
pub struct LogProbsOut<'a> {
    /// `log p(target)`.
    pub logp: &'a mut [f32],
    /// Entropies, exactly when `cfg.entropy`.
    pub entropy: Option<&'a mut [f32]>,
    /// `logsumexp(logits / T)`.
    pub lse: &'a mut [f32],
}

impl LogProbsOut<'_> {
    pub(crate) fn validate(&self, op: &'static str, n: usize, entropy: bool) -> Result<()> {
        check::len(op, "logp (output)", n, self.logp.len())?;
        check::len(op, "lse (output)", n, self.lse.len())?;
        check::paired_len(
            op,
            "entropy (output)",
            entropy.then_some(n),
            self.entropy.as_ref().map(|e| e.len()),
            "an entropy output buffer is given exactly when `entropy` is set",
        )
    }
}

/// [`token_logprobs`] into caller-provided buffers: with them reused, a
/// loop of calls allocates nothing but the per-row target list. Errors:
/// those of [`token_logprobs`], and the buffers' lengths.
pub fn token_logprobs_into<T: Float, I: TokenId>(
    rows: &LogitRows<'_, T, I>,
    cfg: &LogProbConfig,
    out: &mut LogProbsOut<'_>,
) -> Result<()> {
    let n = rows.validate(OP)?;
    cfg.validate(OP)?;
    out.validate(OP, n, cfg.entropy)?;
    let active = active_rows(OP, rows.targets, rows.mask, rows.vocab, cfg)?;
    forward_into(rows, cfg, n, &active, out)
}

/// The forward's row loop, into validated buffers.
fn forward_into<T: Float, I: TokenId>(
    rows: &LogitRows<'_, T, I>,
    cfg: &LogProbConfig,
    n: usize,
    active: &[Option<usize>],
    out: &mut LogProbsOut<'_>,
) -> Result<()> {
    use rayon::iter::Either;
    let vocab = rows.vocab;
    let inv_t = 1.0 / cfg.temperature;
    let entropy = match out.entropy.as_deref_mut() {
        Some(e) => Either::Left(e.par_iter_mut().map(Some)),
        None => Either::Right((0..n).into_par_iter().map(|_| None)),
    };
    rows.logits
        .par_chunks(vocab)
        .zip(active)
        .zip(out.logp.par_iter_mut().zip(entropy).zip(out.lse.par_iter_mut()))
        .with_min_len((1 << 16) / vocab + 1)
        .for_each_init(
            || Box::new([0.0f32; BLOCK]),
            |buf, ((row, &target), ((lp, h), l))| {
                let Some(y) = target else {
                    *lp = 0.0;
                    *l = 0.0;
                    if let Some(h) = h {
                        *h = 0.0;
                    }
                    return;
                };
                match math::softmax_state(row, inv_t, cfg.entropy, buf).finish() {
                    Some((row_lse, row_h)) => {
                        *lp = row[y].to_f32() * inv_t - row_lse;
                        if let Some(h) = h {
                            *h = row_h;
                        }
                        *l = row_lse;
                    }
                    None => *l = f32::NAN,
                }
            },
        );
    let (logp, lse) = (&*out.logp, &*out.lse);
    let bad = |i: usize| lse[i].is_nan() || !logp[i].is_finite();
    if let Some(index) = (0..n).find(|&i| bad(i)) {
        let what = if lse[index].is_nan() {
            scaled_row_fault(&rows.logits[index * vocab..(index + 1) * vocab])
        } else {
            "logp"
        };
        return Err(Error::NonFinite { op: OP, what, index });
    }
    Ok(())
}

/// What to blame for a row whose scaled logits have no finite softmax: the
/// logits themselves when they hold a NaN or `+inf` or no finite value,
/// else their scaled values, which overflowed f32.
pub(crate) fn scaled_row_fault<T: Float>(row: &[T]) -> &'static str {
    let bad = |z: &T| z.to_f32().is_nan() || z.to_f32() == f32::INFINITY;
    if row.iter().any(bad) || row.iter().all(|z| z.to_f32() == f32::NEG_INFINITY) {
        "logits"
    } else {
        "logits / temperature"
    }
}

/// Gradient of a loss with respect to the logits, given its gradients with
/// respect to [`token_logprobs`]'s outputs. Returns `[rows, vocab]` in the
/// logits' dtype.
///
/// Errors: those of the forward's validation, gradient lengths, an entropy
/// gradient without a saved entropy, a non-finite saved value or upstream
/// gradient at an active row, a row whose gradient could exceed `T`'s range
/// (`what: "dlogits"`; see the module docs).
pub fn token_logprobs_backward<T: Float, I: TokenId>(
    rows: &LogitRows<'_, T, I>,
    cfg: &LogProbConfig,
    saved: &LogProbSaved<'_>,
    grads: &LogProbGrads<'_>,
) -> Result<Vec<T>> {
    rows.validate(OP_BWD)?;
    let coefs = backward_coefs::<T, I>(OP_BWD, rows.targets, rows.mask, rows.vocab, cfg, saved, grads)?;
    let mut dlogits = vec![T::default(); rows.logits.len()];
    backward_rows(rows, &coefs, &mut dlogits);
    Ok(dlogits)
}

/// [`token_logprobs_backward`] into a caller's buffer `dlogits` `[rows,
/// vocab]` (every element written; untouched on error, which is found
/// before anything is written). Errors: those of
/// [`token_logprobs_backward`], and `dlogits`' length.
pub fn token_logprobs_backward_into<T: Float, I: TokenId>(
    rows: &LogitRows<'_, T, I>,
    cfg: &LogProbConfig,
    saved: &LogProbSaved<'_>,
    grads: &LogProbGrads<'_>,
    dlogits: &mut [T],
) -> Result<()> {
    rows.validate(OP_BWD)?;
    check::len(OP_BWD, "dlogits (output)", rows.logits.len(), dlogits.len())?;
    let coefs = backward_coefs::<T, I>(OP_BWD, rows.targets, rows.mask, rows.vocab, cfg, saved, grads)?;
    backward_rows(rows, &coefs, dlogits);
    Ok(())
}

fn backward_rows<T: Float, I: TokenId>(rows: &LogitRows<'_, T, I>, coefs: &[RowGrad], dlogits: &mut [T]) {
    rows.logits
        .par_chunks(rows.vocab)
        .zip(dlogits.par_chunks_mut(rows.vocab))
        .zip(coefs)
        .with_min_len((1 << 16) / rows.vocab + 1)
        .for_each_init(
            || Box::new([0.0f32; BLOCK]),
            |buf, ((src, dst), coef)| backward_row(coef, Some(src), dst, buf),
        );
}

/// [`token_logprobs_backward`] writing the gradient over the logits buffer,
/// so that logits and their gradient are never held at once. Every error is
/// found before the buffer is written: on error it still holds the logits.
pub fn token_logprobs_backward_inplace<T: Float, I: TokenId>(
    logits: &mut [T],
    targets: &[I],
    mask: Option<&[u8]>,
    vocab: usize,
    cfg: &LogProbConfig,
    saved: &LogProbSaved<'_>,
    grads: &LogProbGrads<'_>,
) -> Result<()> {
    validate_lens(OP_BWD, vocab, logits.len(), targets.len(), mask.map(<[u8]>::len))?;
    let coefs = backward_coefs::<T, I>(OP_BWD, targets, mask, vocab, cfg, saved, grads)?;
    logits
        .par_chunks_mut(vocab)
        .zip(&coefs)
        .with_min_len((1 << 16) / vocab + 1)
        .for_each_init(
            || Box::new([0.0f32; BLOCK]),
            |buf, (row, coef)| backward_row(coef, None, row, buf),
        );
    Ok(())
}

/// Validates targets and mask; returns each row's target, `None` if skipped.
pub(crate) fn active_rows<I: TokenId>(
    op: &'static str,
    targets: &[I],
    mask: Option<&[u8]>,
    vocab: usize,
    cfg: &LogProbConfig,
) -> Result<Vec<Option<usize>>> {
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let token = t.to_i64();
            if !cfg.is_active(token, mask.map_or(1, |m| m[i])) {
                return Ok(None);
            }
            if token < 0 || token as u64 >= vocab as u64 {
                return Err(Error::TokenOutOfRange {
                    op,
                    index: i,
                    token,
                    vocab,
                });
            }
            Ok(Some(token as usize))
        })
        .collect()
}

/// Per-row constants of the backward. With `c = g_L - g - g_H H` and
/// `l_j = x_j - lse = log p_j`: `dz_j = (p_j (c - g_H l_j) + g 1[j=y]) / T`.
/// (Written with `l_j` rather than `x_j` so that no two large terms cancel:
/// at low temperature `x_j` and `lse` are both large.)
pub(crate) struct RowGrad {
    pub(crate) target: Option<usize>,
    inv_t: f32,
    lse: f32,
    g: f32,
    g_h: f32,
    c: f32,
}

impl RowGrad {
    /// The constants of an active row whose only upstream gradient is `g`,
    /// that of its log-prob (`c = -g`): `dz_j = g (1[j=y] - p_j) / T`.
    pub(crate) fn logp_only(target: usize, inv_t: f32, lse: f32, g: f32) -> Self {
        Self {
            target: Some(target),
            inv_t,
            lse,
            g,
            g_h: 0.0,
            c: -g,
        }
    }

    /// Turns a block of this row's scaled logits, columns
    /// `start..start + block.len()`, into their gradient.
    #[inline]
    pub(crate) fn apply(&self, block: &mut [f32], start: usize) {
        grad_block(block, self);
        if let Some(y) = self.target.filter(|y| (start..start + block.len()).contains(y)) {
            block[y - start] += self.g * self.inv_t;
        }
    }
}

/// A bound on `|log p_j|` wherever `p_j > 0`: [`math::exp`] is exactly 0
/// below `e^-87.33`, and the CUDA kernels' `ex2` flushes below `2^-126`
/// (`e^-87.34`).
const MAX_NEG_LOG_P: f64 = 87.4;

/// Validates the backward's inputs (for `op`, rows whose lengths are
/// validated); returns each row's constants. The gradient is bounded by
/// `G::MAX`, the largest magnitude the caller's gradient dtype holds.
pub(crate) fn backward_coefs<G: Float, I: TokenId>(
    op: &'static str,
    targets: &[I],
    mask: Option<&[u8]>,
    vocab: usize,
    cfg: &LogProbConfig,
    saved: &LogProbSaved<'_>,
    grads: &LogProbGrads<'_>,
) -> Result<Vec<RowGrad>> {
    let (n, limit) = (targets.len(), G::MAX);
    cfg.validate(op)?;
    grads.validate(op, n, saved)?;
    let active = active_rows(op, targets, mask, vocab, cfg)?;
    let inv_t = 1.0 / cfg.temperature;
    (0..n)
        .map(|i| {
            let g = grads.logp[i];
            // An entropy gradient is read with the saved entropy it multiplies.
            let (g_h, h) = match (grads.entropy, saved.entropy) {
                (Some(ge), Some(e)) => (ge[i], e[i]),
                _ => (0.0, 0.0),
            };
            let g_l = grads.lse.map_or(0.0, |gl| gl[i]);
            let row = RowGrad {
                target: active[i],
                inv_t,
                lse: saved.lse[i],
                g,
                g_h,
                c: g_l - g - g_h * h,
            };
            if row.target.is_some() {
                let read = [
                    ("lse", saved.lse[i]),
                    ("entropy", h),
                    ("grad_logp", g),
                    ("grad_entropy", g_h),
                    ("grad_lse", g_l),
                ];
                if let Some(&(what, _)) = read.iter().find(|(_, v)| !v.is_finite()) {
                    return Err(Error::NonFinite { op, what, index: i });
                }
                // See the module docs: every intermediate, then the result.
                let inner = (row.c as f64).abs() + MAX_NEG_LOG_P * (g_h as f64).abs();
                let bound = (inner + (g as f64).abs()) * inv_t as f64;
                // A relative margin for the f32 roundings of the row math.
                let margin = 1.0 + 1e-5;
                if !row.c.is_finite() || inner * margin > f32::MAX as f64 || bound * margin > limit as f64 {
                    return Err(Error::NonFinite {
                        op,
                        what: "dlogits",
                        index: i,
                    });
                }
            }
            Ok(row)
        })
        .collect()
}

multiversion! {
    /// Writes one row's gradient into `dst`, reading logits from `src`, or
    /// from `dst` itself when `src` is `None` (in place), one L1-sized block
    /// at a time: widen, gradient, narrow, all in one pass and in the widest
    /// vectors the CPU has (bf16 is rounded branch-free, so it vectorizes).
    /// Skipped rows get zeros.
    fn backward_row<T: Float>(coef: &RowGrad, src: Option<&[T]>, dst: &mut [T], buf: &mut [f32; BLOCK]) {
        if coef.target.is_none() {
            dst.fill(T::from_f32(0.0));
            return;
        }
        let len = dst.len();
        for (start, end) in (0..len).step_by(BLOCK).map(|s| (s, (s + BLOCK).min(len))) {
            let block = &mut buf[..end - start];
            T::load_scaled(
                src.map_or(&dst[start..end], |s| &s[start..end]),
                coef.inv_t,
                block,
            );
            coef.apply(block, start);
            T::store(block, &mut dst[start..end]);
        }
    }
}

multiversion! {
    /// `x <- p (c - g_H log p) / T` over a block of scaled logits `x`.
    fn grad_block(xs: &mut [f32], coef: &RowGrad) {
        let (lse, c, g_h, inv_t) = (coef.lse, coef.c, coef.g_h, coef.inv_t);
        for x in xs.iter_mut() {
            // At most 0, as it is for the forward's own lse: p <= 1 whatever lse is given.
            let log_p = *x - lse;
            let log_p = if log_p > 0.0 { 0.0 } else { log_p };
            let p = math::exp::<Mad>(log_p);
            // p == 0 for -inf logits, where g_H log p would be NaN.
            *x = if p > 0.0 { p * (c - g_h * log_p) * inv_t } else { 0.0 };
        }
    }
}
