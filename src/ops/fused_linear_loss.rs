//! The fused LM-head + GRPO loss: from hidden states `h [N, H]`, the head's
//! weight `W [V, H]` (and optional bias `b [V]`), the sampled tokens, the
//! advantages and the old and reference log-probs, the
//! [policy loss](crate::policy_loss) **and its gradients `dh`, `dW`, `db`
//! in one pass: three matrix products, not four**, never holding `[N, V]`.
//!
//! ```text
//! z_i     = W h_i + b,   x_i = z_i / T
//! lse_i   = logsumexp_j x_ij,   logp_i = x_{i,y_i} - lse_i     (H_i optional)
//! l_i     = PolicyLossConfig::token_loss(logp_i - old_i, A_i, ref_i - logp_i)
//! loss    = sum_i m_i w_i l_i                       (w_i: the aggregation's weight)
//! g_i     = m_i w_i dl_i/dlogp_i                     (dL/dlogp_i)
//! dz_ij   = g_i (1[j = y_i] - p_ij) / T              (token_logprobs_backward's row math)
//! dh      = dz W,   dW = dz^T h,   db = sum_i dz_i
//! ```
//!
//! The per-token loss and its derivative are `PolicyLossConfig::token_loss`
//! itself, the function [`policy_loss`](crate::policy_loss) evaluates, and
//! `dz` is the same row math (`RowGrad`) as [`fused_linear_logprobs_backward`]:
//! the op shares both, so it computes what the two-call form
//! (`fused_linear_logprobs`, `policy_loss`, `policy_loss_backward`,
//! `fused_linear_logprobs_backward`) computes, in one pass.
//!
//! **Why three products.** `dz_ij` needs row `i`'s final `lse_i` and `g_i`,
//! which need every column of the row. The two-call form therefore
//! recomputes each logits tile in its backward (4 GEMMs). Here a row chunk
//! keeps all its logits: for each chunk of `chunk_rows` active rows,
//!
//! 1. for each vocab chunk of `chunk_vocab` columns: `tile_k = h_c W_k^T / T`
//!    (GEMM 1, into the chunk's `[chunk_rows, V]` buffer), folded into each
//!    row's online softmax state while hot;
//! 2. per row: `lse`, `logp` (and entropy), the token loss, `g_i`;
//! 3. for each vocab chunk again: `tile_k -> dz_k` in place, `dW_k (+)=
//!    dz_k^T h_c` (GEMM 3) and `db_k (+)=` column sums; then `dh_c += dz_k
//!    W_k` (GEMM 2) tile by tile.
//!
//! This is the scheme of Liger-Kernel's `LigerFusedLinearGRPOLoss`
//! (`chunk_forward` computes a row chunk's full logits, its loss and the
//! gradients of `h` and `W` together, accumulating `dW` over chunks), with
//! the vocabulary further cut into `chunk_vocab` columns so that each
//! tile is consumed while in cache. Memory: `chunk_rows x V` f32 for the
//! logits (at V = 151936 and the default 256 rows, 156 MB), plus the
//! fused linear op's chunk buffers; `dW` is the output itself for f32 (for
//! bf16/f16, a `chunk_vocab x H` f32 contribution, rounded once per row
//! chunk, as in [`crate::ops::fused_linear`]).
//!
//! **Which aggregations fuse exactly.** A token's weight `w_i` must be known
//! before the pass, and it is for every [`Aggregation`]: it depends only on
//! the mask and the layout (token-mean over `M` or a given normalizer,
//! sequence-mean of token-means `1 / (S L_s)`, sequence-mean of token sums,
//! Dr. GRPO's `1 / (S constant)`), which the op counts first. **Sequence-level
//! importance ratios (GSPO)** are not fused: `r_s` is the mean log-ratio of
//! the whole sequence, so no token's loss or gradient is known until every
//! token of its sequence has its log-prob, and sequences can straddle row
//! chunks. That would need a second pass over the logits (the four GEMMs the
//! op exists to avoid), so [`ImportanceLevel::Sequence`] is refused with
//! [`Error::Unsupported`]; use the two-call form for GSPO. So are, for now,
//! the policy loss's other objectives and options (a `delta`, CISPO, SAPO,
//! VESPO, the bias-corrected KL, `exclude_empty_seqs`: the fused loss takes
//! the default `Clip { delta: None }`), and the fused summary leaves the
//! sequence-level statistics and `seqs` at 0.
//!
//! **Entropy** (with `logprob.entropy`) is returned per row for logging or
//! masking, as TRL uses it; it is not differentiated (the loss has no
//! entropy term).
//!
//! **Non-finite values** (the crate's [rule](crate::error)). Inputs at
//! masked-in rows are checked before any product: a NaN or infinity in
//! `old_logp`, `ref_logp` or the advantages is [`Error::NonFinite`] naming
//! it (`"advantages (per sequence)"` indexes the sequence). Logits and
//! log-probs are checked as [`fused_linear_logprobs`] checks them (`what:
//! "logits"`, `"logp"`); a token loss or KL estimate that overflows is
//! `"per_token"` / `"kl"`, an overflowing sum `"loss"`; a row whose `dz`
//! bound `2 |g_i| / T` exceeds f32 is `"dlogits"`; a non-finite `dh`, `dW`
//! or `db` is `"dhidden"`, `"dweight"`, `"dbias"`. Masked and ignored rows
//! are never read and get zero outputs and gradients. The `[chunk_rows, V]`
//! buffer that cannot be allocated is [`Error::Allocation`].
//!
//! **Threads.** As the fused linear op (the same tile loops): tiles in
//! parallel, each tile's logits and `dW` GEMMs on one thread, `dh`'s GEMMs
//! on all threads in tile order; every value is computed in the same order
//! whatever the thread count, so results are deterministic.
//!
//! [`fused_linear_logprobs`]: crate::fused_linear_logprobs
//! [`fused_linear_logprobs_backward`]: crate::fused_linear_logprobs_backward

use std::ops::Range;

use rayon::prelude::*;

use crate::element::{Float, TokenId};
use crate::error::{check, Error, Result};
use crate::memory::{opt_len, Host, Memory};
use crate::ops::fused_linear::{
    finite_grad, gather_rows, Dz, FusedLinearConfig, Head, LinearGrads, LinearRows, LinearShape, WeightGrads,
    Workspace, MIN_TASK,
};
use crate::ops::layout::SeqLayout;
use crate::ops::logprob::{active_rows, LogProbConfig, RowGrad};
use crate::ops::math::multiversion;
use crate::ops::policy_loss::{
    Advantage, Aggregation, ImportanceLevel, PolicyLossConfig, PolicyLossStats, PolicyObjective, TokenIn,
    TokenLoss,
};

pub(crate) const OP: &str = "fused_linear_policy_loss";

/// Parameters of [`fused_linear_policy_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedLossConfig {
    /// Temperature, entropy (reported, not differentiated) and ignore index.
    pub logprob: LogProbConfig,
    /// The policy loss: clipping, KL penalty, aggregation. Sequence-level
    /// importance ratios are refused (see the [module docs](self)).
    pub loss: PolicyLossConfig,
    /// Active rows per row chunk, `>= 1`: the op holds `chunk_rows x V`
    /// f32 logits, and `dW` is read and written once per row chunk.
    pub chunk_rows: usize,
    /// Vocabulary columns per tile within a row chunk, `>= 1`.
    pub chunk_vocab: usize,
}

impl Default for FusedLossConfig {
    /// `chunk_rows = 256` (a 156 MB logits buffer at V = 151936; with fewer
    /// rows the `dW` product loses speed on the CPU, each row chunk adding
    /// a read and write of `dW`), `chunk_vocab = 512` (at N = 256, H = 896
    /// on 2 cores: 981 ms per step against 1000 with 256-wide tiles, 972 with
    /// 2048 and 1033 with 1024, all within the runs' noise; each tile's GEMMs
    /// run on one thread), default log-prob and policy-loss parameters.
    fn default() -> Self {
        Self {
            logprob: LogProbConfig::default(),
            loss: PolicyLossConfig::default(),
            chunk_rows: 256,
            chunk_vocab: 512,
        }
    }
}

impl FusedLossConfig {
    /// The chunking and log-prob parameters as the fused linear op's config.
    pub(crate) fn linear(&self) -> FusedLinearConfig {
        FusedLinearConfig {
            logprob: self.logprob,
            chunk_rows: self.chunk_rows,
            chunk_vocab: self.chunk_vocab,
        }
    }

    pub(crate) fn validate(&self, op: &'static str, has_ref: bool) -> Result<()> {
        self.linear().validate(op)?;
        self.loss.validate(op, has_ref)?;
        if self.loss.importance == ImportanceLevel::Sequence {
            return Err(Error::Unsupported {
                op,
                reason: "sequence-level importance ratios (GSPO) need every token of a sequence \
                         before any gradient, which a one-pass fused loss cannot have: use \
                         fused_linear_logprobs + policy_loss"
                    .into(),
            });
        }
        let plain = self.loss.objective == PolicyObjective::default()
            && !self.loss.kl_bias_correction
            && !self.loss.exclude_empty_seqs;
        if !plain {
            return Err(Error::Unsupported {
                op,
                reason: "the fused loss takes the default Clip objective (no delta), no KL bias \
                         correction and every sequence in S: use fused_linear_logprobs + policy_loss"
                    .into(),
            });
        }
        Ok(())
    }
}

/// Inputs of [`fused_linear_policy_loss`]: the LM head's rows (hidden
/// states, weight, optional bias, targets, optional mask: the mask and the
/// ignore index are the loss's mask too) and the policy loss's per-token
/// inputs over the same `N` rows.
pub struct LinearLossInputs<'a, T: 'a, I: 'a, M: Memory = Host> {
    /// `[N, H]` hidden states, `[V, H]` weight, `[V]` bias, `[N]` targets and mask.
    pub rows: LinearRows<'a, T, I, M>,
    /// `[N]` log-probs under the sampling policy; `None`: on-policy (ratio 1).
    pub old_logp: Option<M::Buf<'a, f32>>,
    /// `[N]` log-probs under the reference model, for the KL term.
    pub ref_logp: Option<M::Buf<'a, f32>>,
    /// Per-sequence `[S]` or per-token `[N]` advantages.
    pub advantages: Advantage<'a, M>,
    /// How the `N` rows group into sequences.
    pub layout: SeqLayout<'a, M>,
}

impl<'a, T: 'a, I: 'a, M: Memory> LinearLossInputs<'a, T, I, M> {
    /// Checks every length and the parameters; returns the head's shape and
    /// the number of sequences.
    pub(crate) fn validate(&self, op: &'static str, cfg: &FusedLossConfig) -> Result<(LinearShape, usize)> {
        let shape = self.rows.validate(op)?;
        let n = shape.rows;
        let seqs = self.layout.validate_shape(op, n)?;
        if let Some(len) = opt_len::<M, f32>(&self.old_logp) {
            check::len(op, "old_logp", n, len)?;
        }
        if let Some(len) = opt_len::<M, f32>(&self.ref_logp) {
            check::len(op, "ref_logp", n, len)?;
        }
        match &self.advantages {
            Advantage::PerSequence(a) => check::len(op, "advantages (per sequence)", seqs, M::len(a))?,
            Advantage::PerToken(a) => check::len(op, "advantages (per token)", n, M::len(a))?,
        }
        cfg.validate(op, self.ref_logp.is_some())?;
        Ok((shape, seqs))
    }
}

impl<'a, T, I> LinearLossInputs<'a, T, I, Host> {
    /// On-policy inputs with no reference model.
    pub fn new(rows: LinearRows<'a, T, I>, advantages: Advantage<'a>, layout: SeqLayout<'a>) -> Self {
        Self {
            rows,
            old_logp: None,
            ref_logp: None,
            advantages,
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
}

/// Results of [`fused_linear_policy_loss`].
#[derive(Debug, Clone)]
pub struct LinearLoss<T> {
    /// `[N]` log-probs of the targets (0 at skipped rows).
    pub logp: Vec<f32>,
    /// `[N]` entropies, when asked for (not differentiated).
    pub entropy: Option<Vec<f32>>,
    /// `[N]`: `m_t l_t`, unweighted, as [`crate::PolicyLoss::per_token`].
    pub per_token: Vec<f32>,
    /// `[PolicyLossStats::SUMMARY_LEN]`: loss and statistics, as
    /// [`crate::PolicyLoss::summary`].
    pub summary: Vec<f32>,
    /// Gradients of the loss (`summary[LOSS]`) with respect to the hidden
    /// states, weight and bias. For an upstream gradient `g` of the loss,
    /// scale them by `g` ([`LinearLoss::scale_grads`]).
    pub grads: LinearGrads<T>,
}

impl<T: Float> LinearLoss<T> {
    /// The aggregated loss.
    pub fn loss(&self) -> f32 {
        self.summary[PolicyLossStats::LOSS]
    }

    /// The summary buffer as named fields.
    pub fn stats(&self) -> PolicyLossStats {
        PolicyLossStats::from_summary(&self.summary)
    }

    /// Multiplies the gradients by `g` (an upstream gradient of the loss);
    /// nothing to do for `g == 1`. A non-finite `g`, or a product beyond
    /// `T`'s range, is [`Error::NonFinite`] (`what: "grad_loss"`, or the
    /// gradient's name), and the gradients are then unspecified.
    pub fn scale_grads(&mut self, g: f32) -> Result<()> {
        if !g.is_finite() {
            return Err(Error::NonFinite {
                op: OP,
                what: "grad_loss",
                index: 0,
            });
        }
        if g == 1.0 {
            return Ok(());
        }
        let scale = |what: &'static str, xs: &mut [T]| {
            xs.par_chunks_mut(MIN_TASK).for_each(|c| {
                for x in c {
                    *x = T::from_f32(x.to_f32() * g);
                }
            });
            finite_grad(OP, what, xs)
        };
        scale("dhidden", &mut self.grads.hidden)?;
        scale("dweight", &mut self.grads.weight)?;
        if let Some(b) = &mut self.grads.bias {
            scale("dbias", b)?;
        }
        Ok(())
    }
}

/// Where [`fused_linear_policy_loss_into`] writes: caller-provided buffers
/// of the lengths [`LinearLoss`] has (the shape of the CUDA side's
/// `LogProbsOut` / `LinearGradsOut`). Every element is written, so they
/// need not be zeroed; after an error their contents are unspecified.
pub struct LinearLossOut<'a, T> {
    /// `[N]` log-probs.
    pub logp: &'a mut [f32],
    /// `[N]` entropies, exactly when `cfg.logprob.entropy`.
    pub entropy: Option<&'a mut [f32]>,
    /// `[N]` per-token losses `m_t l_t`.
    pub per_token: &'a mut [f32],
    /// `[PolicyLossStats::SUMMARY_LEN]` loss and statistics.
    pub summary: &'a mut [f32],
    /// `[N, H]` gradient of the loss with respect to the hidden states.
    pub dhidden: &'a mut [T],
    /// `[V, H]` gradient with respect to the weight.
    pub dweight: &'a mut [T],
    /// `[V]` gradient with respect to the bias, exactly when there is one.
    pub dbias: Option<&'a mut [T]>,
}

impl<T> LinearLossOut<'_, T> {
    fn validate(&self, shape: LinearShape, entropy: bool, has_bias: bool) -> Result<()> {
        let (n, h, v) = (shape.rows, shape.hidden, shape.vocab);
        check::len(OP, "logp (output)", n, self.logp.len())?;
        check::len(OP, "per_token (output)", n, self.per_token.len())?;
        check::len(
            OP,
            "summary (output)",
            PolicyLossStats::SUMMARY_LEN,
            self.summary.len(),
        )?;
        check::len(OP, "dhidden (output)", n * h, self.dhidden.len())?;
        check::len(OP, "dweight (output)", v * h, self.dweight.len())?;
        check::paired_len(
            OP,
            "entropy (output)",
            entropy.then_some(n),
            self.entropy.as_ref().map(|e| e.len()),
            "an entropy output buffer is given exactly when `logprob.entropy` is set",
        )?;
        check::paired_len(
            OP,
            "dbias (output)",
            has_bias.then_some(v),
            self.dbias.as_ref().map(|b| b.len()),
            "a dbias output buffer is given exactly when the inputs have a bias",
        )
    }
}

/// The GRPO policy loss of an LM head's log-probs, its statistics and its
/// gradients `dh`, `dW` (`db`), in one pass of three matrix products (see
/// the [module docs](self) for the math and the chunking). Equal, up to
/// rounding, to `policy_loss` on `fused_linear_logprobs`' log-probs, with
/// `policy_loss_backward` chained into `fused_linear_logprobs_backward`.
///
/// Allocates its outputs (`dW` is the size of the weight); the working
/// buffers, the `chunk_rows x V` logits among them, are kept per thread
/// from call to call, so a training loop's steady state maps no new
/// memory for them (the price: each calling thread keeps that workspace,
/// 156 MB at the default chunk and V = 151936, until it exits).
/// [`fused_linear_policy_loss_into`] also reuses the outputs.
///
/// Errors: those of [`crate::fused_linear_logprobs`] and [`crate::policy_loss`]
/// (lengths, layout, parameters, targets, non-finite inputs and results),
/// sequence-level importance ratios ([`Error::Unsupported`]), and a gradient
/// beyond f32 (see the module docs).
pub fn fused_linear_policy_loss<T: Float, I: TokenId>(
    inputs: &LinearLossInputs<'_, T, I>,
    cfg: &FusedLossConfig,
) -> Result<LinearLoss<T>> {
    let (shape, _) = inputs.validate(OP, cfg)?;
    let (n, h, v) = (shape.rows, shape.hidden, shape.vocab);
    // Per-token outputs, refused rather than aborting when they cannot be
    // allocated. The gradients are the inputs' own sizes (validated above):
    // zeros from `vec!` are pages the `_into` form then writes once, where a
    // filled buffer would be written twice (dW is the size of the LM head).
    let uninit = |len, what| check::zeros(OP, what, len);
    let grad = |len| vec![T::default(); len];
    let mut out = LinearLoss {
        logp: uninit(n, "logp")?,
        entropy: cfg.logprob.entropy.then(|| uninit(n, "entropy")).transpose()?,
        per_token: uninit(n, "per_token")?,
        summary: vec![0.0; PolicyLossStats::SUMMARY_LEN],
        grads: LinearGrads {
            hidden: grad(n * h),
            weight: grad(v * h),
            bias: inputs.rows.bias.map(|_| grad(v)),
        },
    };
    fused_linear_policy_loss_into(
        inputs,
        cfg,
        &mut LinearLossOut {
            logp: &mut out.logp,
            entropy: out.entropy.as_deref_mut(),
            per_token: &mut out.per_token,
            summary: &mut out.summary,
            dhidden: &mut out.grads.hidden,
            dweight: &mut out.grads.weight,
            dbias: out.grads.bias.as_deref_mut(),
        },
    )?;
    Ok(out)
}

/// [`fused_linear_policy_loss`] into caller-provided buffers: with them
/// reused, a steady-state loop allocates nothing (the working buffers are
/// kept per thread). Errors: those of the allocating form, and output
/// buffers of the wrong lengths (or an entropy / dbias buffer given
/// without, or missing with, `logprob.entropy` / a bias).
pub fn fused_linear_policy_loss_into<T: Float, I: TokenId>(
    inputs: &LinearLossInputs<'_, T, I>,
    cfg: &FusedLossConfig,
    out: &mut LinearLossOut<'_, T>,
) -> Result<()> {
    Workspace::with(|ws| run(inputs, cfg, out, ws))
}

fn run<T: Float, I: TokenId>(
    inputs: &LinearLossInputs<'_, T, I>,
    cfg: &FusedLossConfig,
    out: &mut LinearLossOut<'_, T>,
    ws: &mut Workspace,
) -> Result<()> {
    let (shape, seqs) = inputs.validate(OP, cfg)?;
    let n = shape.rows;
    let rows = &inputs.rows;
    out.validate(shape, cfg.logprob.entropy, rows.bias.is_some())?;
    inputs.layout.validate(OP, n)?;
    let targets = active_rows(OP, rows.targets, rows.mask, shape.vocab, &cfg.logprob)?;
    let ranges: Vec<Range<usize>> = inputs.layout.ranges().collect();
    let (tokens, scale) = token_weights(&ranges, &targets, seqs, cfg.loss.aggregation);
    let per_row = PerRow::new(inputs, &ranges);
    per_row.check_finite(&targets)?;

    let active: Vec<(usize, usize)> = targets
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.map(|y| (i, y)))
        .collect();
    let lin = cfg.linear();
    let head = Head::new(rows, shape, &lin);
    let (h, vocab) = (shape.hidden, shape.vocab);
    let inv_t = 1.0 / cfg.logprob.temperature;
    // Per-row outputs and the gradients of skipped rows are 0; dW and db
    // are written in full by the first row chunk (or zeroed if none).
    out.logp.fill(0.0);
    out.per_token.fill(0.0);
    if let Some(e) = &mut out.entropy {
        e.fill(0.0);
    }
    for (i, t) in targets.iter().enumerate() {
        if t.is_none() {
            out.dhidden[i * h..(i + 1) * h].fill(T::default());
        }
    }
    if active.is_empty() {
        out.dweight.fill(T::default());
        if let Some(b) = &mut out.dbias {
            b.fill(T::default());
        }
    }
    let mut sums = Sums::default();
    let Workspace {
        hidden,
        tiles,
        weight,
        soft,
        d_hidden,
    } = ws;
    let (row_ids, ys): (Vec<usize>, Vec<usize>) = active.into_iter().unzip();
    let mut coefs = Vec::new();
    for (c, (chunk, ys)) in row_ids
        .chunks(cfg.chunk_rows)
        .zip(ys.chunks(cfg.chunk_rows))
        .enumerate()
    {
        let n_rows = chunk.len();
        gather_rows(rows.hidden, h, chunk.iter().copied(), hidden);
        // Sized by the caller's chunk size, not by an input: it may not fit.
        check::grow(OP, "logits tile", tiles, n_rows.saturating_mul(vocab), 0.0)?;
        soft.reset(n_rows);

        // 1. Logits, folded into the softmax states while hot (GEMM 1).
        head.fold_tiles(
            hidden,
            ys,
            cfg.logprob.entropy,
            0..head.tiles(),
            Some(tiles),
            soft,
        )?;

        // 2. Per row: log-prob, token loss, dL/dlogp.
        coefs.clear();
        for (r, (&i, &y)) in chunk.iter().zip(ys).enumerate() {
            let (lse, entropy) = soft.finish(OP, r, i)?;
            let logp = soft.target_logits[r] - lse;
            if !logp.is_finite() {
                return Err(Error::NonFinite {
                    op: OP,
                    what: "logp",
                    index: i,
                });
            }
            out.logp[i] = logp;
            if let Some(e) = &mut out.entropy {
                e[i] = entropy;
            }
            let (old, reference, adv) = per_row.at(i);
            let t = token_loss(&cfg.loss, old.map(|o| logp - o), adv, reference.map(|r| r - logp));
            for (what, v) in [("kl", t.kl), ("ratio", t.ratio), ("per_token", t.loss)] {
                if !v.is_finite() {
                    return Err(Error::NonFinite {
                        op: OP,
                        what,
                        index: i,
                    });
                }
            }
            out.per_token[i] = t.loss;
            sums.add(&t, scale[i]);
            let g = scale[i] as f32 * t.grad;
            // |dz_j| <= (|c| + |g|) / T = 2 |g| / T, with a margin for roundings.
            if !g.is_finite() || 2.0 * (g as f64).abs() * inv_t as f64 * (1.0 + 1e-5) > f32::MAX as f64 {
                return Err(Error::NonFinite {
                    op: OP,
                    what: "dlogits",
                    index: i,
                });
            }
            coefs.push(RowGrad::logp_only(y, inv_t, lse, g));
        }

        // 3. dz in place, dW (GEMM 3) and db, then dh (GEMM 2).
        d_hidden.clear();
        d_hidden.resize(n_rows * h, 0.0f32);
        let dz = Dz {
            coef: |r: usize| &coefs[r],
            logits_kept: true,
        };
        let mut grads = WeightGrads {
            weight: out.dweight,
            bias: out.dbias.as_deref_mut(),
            first: c == 0,
        };
        head.backward_tiles(
            hidden,
            &dz,
            0..head.tiles(),
            tiles,
            &mut grads,
            (d_hidden, weight),
        );
        for (src, &i) in d_hidden.chunks(h).zip(chunk) {
            T::store(src, &mut out.dhidden[i * h..(i + 1) * h]);
        }
    }
    finite_grad(OP, "dhidden", out.dhidden)?;
    finite_grad(OP, "dweight", out.dweight)?;
    if let Some(bias) = &out.dbias {
        finite_grad(OP, "dbias", bias)?;
    }
    let stats = sums.stats(tokens);
    if !stats.loss.is_finite() {
        return Err(Error::NonFinite {
            op: OP,
            what: "loss",
            index: 0,
        });
    }
    out.summary.copy_from_slice(&stats.to_summary());
    Ok(())
}

/// The masked-in token count `M` and each row's aggregation weight `w_i`
/// (0 at skipped rows), from the mask and layout alone: known before the pass.
fn token_weights(
    ranges: &[Range<usize>],
    targets: &[Option<usize>],
    seqs: usize,
    aggregation: Aggregation,
) -> (usize, Vec<f64>) {
    let counts: Vec<usize> = ranges
        .iter()
        .map(|r| targets[r.clone()].iter().filter(|t| t.is_some()).count())
        .collect();
    let tokens: usize = counts.iter().sum();
    let mut w = vec![0.0f64; targets.len()];
    for (r, &count) in ranges.iter().zip(&counts) {
        let ws = aggregation.weight(count, seqs, tokens);
        for i in r.clone() {
            if targets[i].is_some() {
                w[i] = ws;
            }
        }
    }
    (tokens, w)
}

/// The policy loss's per-row inputs, absent ones resolved.
struct PerRow<'a> {
    old: Option<&'a [f32]>,
    reference: Option<&'a [f32]>,
    /// Per row: the advantage's source index (the sequence, or the row).
    adv_index: Vec<u32>,
    adv: &'a [f32],
    per_sequence: bool,
}

impl<'a> PerRow<'a> {
    fn new<T, I>(inputs: &LinearLossInputs<'a, T, I>, ranges: &[Range<usize>]) -> Self {
        let n = inputs.rows.rows();
        let (adv, per_sequence, adv_index) = match inputs.advantages {
            Advantage::PerSequence(a) => {
                let mut idx = vec![0u32; n];
                for (s, r) in ranges.iter().enumerate() {
                    idx[r.clone()].fill(s as u32);
                }
                (a, true, idx)
            }
            Advantage::PerToken(a) => (a, false, (0..n as u32).collect()),
        };
        Self {
            old: inputs.old_logp,
            reference: inputs.ref_logp,
            adv_index,
            adv,
            per_sequence,
        }
    }

    /// `(old, ref, advantage)` of row `i`; `old` and `ref` 0 where absent
    /// (the log-ratio and `d` are then taken as 0 by [`token_loss`]).
    #[inline]
    fn at(&self, i: usize) -> (Option<f32>, Option<f32>, f32) {
        (
            self.old.map(|o| o[i]),
            self.reference.map(|r| r[i]),
            self.adv[self.adv_index[i] as usize],
        )
    }

    /// The first non-finite input at an active row, as policy_loss names it.
    fn check_finite(&self, targets: &[Option<usize>]) -> Result<()> {
        let bad = |x: f32| !x.is_finite();
        for (i, t) in targets.iter().enumerate() {
            if t.is_none() {
                continue;
            }
            let (old, reference, adv) = self.at(i);
            let found = if old.is_some_and(bad) {
                Some(("old_logp", i))
            } else if reference.is_some_and(bad) {
                Some(("ref_logp", i))
            } else if bad(adv) {
                Some(if self.per_sequence {
                    ("advantages (per sequence)", self.adv_index[i] as usize)
                } else {
                    ("advantages (per token)", i)
                })
            } else {
                None
            };
            if let Some((what, index)) = found {
                return Err(Error::NonFinite { op: OP, what, index });
            }
        }
        Ok(())
    }
}

/// One row's [`PolicyLossConfig::token_loss`], with `old = logp` (log-ratio
/// 0) and `ref = logp` (`d = 0`) where absent, as `policy_loss` resolves them.
fn token_loss(cfg: &PolicyLossConfig, log_ratio: Option<f32>, adv: f32, d_ref: Option<f32>) -> TokenLoss {
    token_loss_simd(cfg, log_ratio.unwrap_or(0.0), adv, d_ref.unwrap_or(0.0))
}

multiversion! {
    /// [`PolicyLossConfig::token_loss`] with the multiply-add flavour
    /// `policy_loss`'s kernels use on this CPU, so both give the same bits.
    fn token_loss_simd(cfg: &PolicyLossConfig, log_ratio: f32, adv: f32, d_ref: f32) -> TokenLoss {
        cfg.token_loss::<Mad>(TokenIn {
            log_ratio,
            adv,
            d_ref,
            logp: 0.0,
            pg_weight: 1.0,
            seq_log_w: 0.0,
        })
    }
}

/// Weighted loss and statistics sums, in f64.
#[derive(Default)]
struct Sums {
    loss: f64,
    clip_low: f64,
    clip_high: f64,
    dual_clip: f64,
    ratio: f64,
    ratio_max: f32,
    kl: f64,
}

impl Sums {
    fn add(&mut self, t: &TokenLoss, w: f64) {
        self.loss += w * t.loss as f64;
        self.clip_low += t.clip_low as u8 as f64;
        self.clip_high += t.clip_high as u8 as f64;
        self.dual_clip += t.dual_clip as u8 as f64;
        self.ratio += t.ratio as f64;
        self.ratio_max = self.ratio_max.max(t.ratio);
        self.kl += t.kl as f64;
    }

    fn stats(&self, tokens: usize) -> PolicyLossStats {
        let mean = |x: f64| {
            if tokens == 0 {
                0.0
            } else {
                (x / tokens as f64) as f32
            }
        };
        PolicyLossStats {
            loss: self.loss as f32,
            clip_frac_low: mean(self.clip_low),
            clip_frac_high: mean(self.clip_high),
            dual_clip_frac: mean(self.dual_clip),
            ratio_mean: mean(self.ratio),
            ratio_max: if tokens == 0 { 0.0 } else { self.ratio_max },
            kl_mean: mean(self.kl),
            tokens: tokens as f32,
            // Sequence-level clip fractions are not computed by the fused loss.
            ..PolicyLossStats::default()
        }
    }
}
