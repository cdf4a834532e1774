//! Fused linear log-probs: [`token_logprobs`](crate::token_logprobs) of an
//! LM head's logits `z = h W^T + b`, computed from the hidden states
//! `h [N, H]`, the head's weight `W [V, H]` and optional bias `b [V]`,
//! without ever holding the `[N, V]` logits.
//!
//! ```text
//! z_i  = W h_i + b,   x_i = z_i / T
//! lse_i, logp_i, H_i  exactly as token_logprobs defines them on z
//! dh = dz W           [N, H]
//! dW = dz^T h         [V, H]
//! db = sum_i dz_i     [V]
//! ```
//!
//! where `dz` is [`token_logprobs_backward`](crate::token_logprobs_backward)'s
//! gradient of the logits.
//!
//! **Tiles.** Rows are taken `chunk_rows` at a time (outer loop), the
//! vocabulary `chunk_vocab` columns at a time (tiles). Forward: each
//! `[rows, cols]` tile `(h_rows W_cols^T + b_cols) / T` is one f32 GEMM,
//! folded into per-row partial softmax states while it is in cache; the
//! target's logit is picked up from the tile holding it. Backward: each tile
//! is recomputed, turned into `dz` in place by token_logprobs_backward's
//! row math, then `dW_cols (+)= dz^T h_rows`, `db_cols (+)= column sums of
//! dz`, and `dh_rows += dz W_cols`. This is the chunked scheme of
//! Liger-Kernel's fused linear cross-entropy (which chunks rows only),
//! extended to vocab chunks so that memory does not grow with V either;
//! the CUDA version (`cuda/fused_linear.cu`) runs the same loops with
//! cuBLAS.
//!
//! **Threads.** Tiles run in parallel, 32 at a time, each tile's
//! GEMMs on one thread: at these sizes a tile-sized GEMM split across
//! threads loses much of its speed (2 cores: the forward 517 -> 473 ms at
//! N = 512, the two-call forward + backward 1.83 -> 1.62 s at N = 256,
//! against each tile's GEMMs on both threads). The tiles' softmax partials
//! are merged in tile order, and `dh += dz W_cols` runs tile by tile in
//! order after each group (those GEMMs on all threads: their output is
//! large), so every value is computed by the same operations in the same
//! order whatever the thread count: results are deterministic.
//!
//! **Memory.** Besides the per-row outputs, a call holds f32 buffers of
//! `chunk_rows x H` (the row chunk's hidden states) and per thread one
//! `chunk_rows x chunk_vocab` tile and, for bf16/f16 inputs, a `chunk_vocab
//! x H` weight tile in f32. The backward holds a group of tiles instead
//! (`chunk_rows x 32 x chunk_vocab`: 16 MiB at the defaults), a
//! `chunk_rows x H` dh accumulator and, for bf16/f16, a `chunk_vocab x H`
//! dW contribution per thread. None of it depends on N, and none on V
//! beyond the outputs.
//!
//! **Precision.** GEMMs run in f32 on f32 copies of bf16/f16 inputs. `dh`
//! accumulates over the whole vocabulary in f32 and is rounded once. For
//! `dW` and `db` stored in f32, the output itself is the accumulator. For
//! bf16/f16 an f32 `[V, H]` accumulator would not be bounded by the chunk
//! sizes, so each row chunk's contribution is computed in f32 and added into
//! the output: `dW` and `db` are rounded once per row chunk, i.e.
//! `ceil(active rows / chunk_rows)` times instead of once (each rounding
//! within half an ulp of the running sum, 2^-9 relative for bf16). A larger
//! `chunk_rows` trades memory for fewer roundings.
//!
//! **Rows.** Masked and ignored rows are never read (their hidden states may
//! hold anything, NaN included) and get zero outputs and gradients. Row
//! chunks are made of active rows only, so padding costs no compute.
//!
//! **Non-finite values** (the crate's [rule](crate::error)). As in
//! token_logprobs, a `-inf` logit means probability 0 (a `-inf` bias bans a
//! token), and a NaN or `+inf` logit of an active row, whether from a NaN or
//! infinity in `h`, `W` or `b` or from f32 overflow, is an
//! [`Error::NonFinite`] with `what: "logits"` and the row's index. A NaN
//! weight spoils every row, so the first active row is named. A target of
//! probability 0 (or of a log-prob below `-f32::MAX`) is `what: "logp"`.
//! The backward checks the saved values and upstream gradients as
//! token_logprobs_backward does (before any GEMM), with the row bound on
//! `dz` taken against f32 (the tiles' type), and then the gradients it
//! returns: `dz W` and `dz^T h` can overflow where `dz` does not, so a
//! non-finite `dh`, `dW` or `db` (or one beyond `T`'s range once rounded to
//! it) is `NonFinite` with `what: "dhidden"`, `"dweight"` or `"dbias"` and
//! the element's index. The tile is sized by the chunk sizes and the
//! dimensions: one too large to allocate is [`Error::Allocation`].
//!
use std::any::TypeId;
use std::cell::Cell;
use std::ops::Range;
use std::thread::LocalKey;

use gemm::Parallelism;
use rayon::iter::Either;
use rayon::prelude::*;

use crate::element::{Float, TokenId};
use crate::error::{check, Error, Result};
use crate::memory::{opt_len, Host, Memory};
use crate::ops::logprob::{
    active_rows, backward_coefs, LogProbConfig, LogProbGrads, LogProbSaved, LogProbs, LogProbsOut, RowGrad,
};
use crate::ops::math::{multiversion, SoftmaxState, BLOCK};

pub(crate) const OP: &str = "fused_linear_logprobs";
pub(crate) const OP_BWD: &str = "fused_linear_logprobs_backward";

/// Parallel loops hand each task at least this many f32 elements.
pub(crate) const MIN_TASK: usize = 1 << 16;

/// Parameters of [`fused_linear_logprobs`] and its backward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedLinearConfig {
    /// Temperature, entropy and ignore index, as for token_logprobs.
    pub logprob: LogProbConfig,
    /// Active rows per row chunk (outer loop), `>= 1`.
    pub chunk_rows: usize,
    /// Vocabulary columns per tile (inner loop), `>= 1`.
    pub chunk_vocab: usize,
}

impl Default for FusedLinearConfig {
    /// `chunk_rows = 512`, `chunk_vocab = 256`, sized for a core's L2 (2
    /// MiB on the machine measured): a `512 x 256` f32 tile is 512 KiB and
    /// its weight tile at H = 896 another 896 KiB, so each tile's softmax
    /// fold reads it from cache, and 512 rows amortize each pass over `W`
    /// (and its f32 conversion for bf16/f16). Measured at Qwen2.5-0.5B's
    /// head (H = 896, V = 151936, 2 AVX-512 cores, each tile on one
    /// thread): the forward at N = 512 took 473 ms with 512 x 256 tiles,
    /// 510 with 512 x 512, 518 with 512 x 2048 and 530-531 with 512 x 128
    /// or 256 x 256.
    fn default() -> Self {
        Self {
            logprob: LogProbConfig::default(),
            chunk_rows: 512,
            chunk_vocab: 256,
        }
    }
}

impl FusedLinearConfig {
    /// Chunks sized for a datacenter GPU: `chunk_rows = 4096`,
    /// `chunk_vocab = 16384`. The GEMMs of a `4096 x 16384` tile are large
    /// enough to run near cuBLAS's peak, and the workspace (see
    /// `crate::cuda::fused_linear`) is 384 MiB of tiles plus `6 * 4096 * H`
    /// bytes for bf16: 470 MiB at H = 3584.
    pub fn gpu() -> Self {
        Self {
            chunk_rows: 4096,
            chunk_vocab: 16384,
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        self.logprob.validate(op)?;
        check::param(
            op,
            "chunk_rows",
            self.chunk_rows as f64,
            self.chunk_rows > 0,
            ">= 1",
        )?;
        check::param(
            op,
            "chunk_vocab",
            self.chunk_vocab as f64,
            self.chunk_vocab > 0,
            ">= 1",
        )
    }
}

/// An LM head's inputs: hidden states `[rows, hidden_size]` and weight
/// `[vocab, hidden_size]`, both row-major, the optional bias `[vocab]`, and
/// per row the target token and an optional mask (0 = skip the row). The
/// vocabulary size is `weight.len() / hidden_size`.
pub struct LinearRows<'a, T: 'a, I: 'a, M: Memory = Host> {
    /// `[rows, hidden_size]`: the last hidden states.
    pub hidden: M::Buf<'a, T>,
    /// `[vocab, hidden_size]`: the LM head (`lm_head.weight` in PyTorch's layout).
    pub weight: M::Buf<'a, T>,
    /// `[vocab]`: the LM head's bias, if it has one.
    pub bias: Option<M::Buf<'a, T>>,
    /// `[rows]`: the token whose log-prob is wanted.
    pub targets: M::Buf<'a, I>,
    /// `[rows]`: 0 skips the row.
    pub mask: Option<M::Buf<'a, u8>>,
    /// `H`, the length of a hidden state.
    pub hidden_size: usize,
}

/// The dimensions [`LinearRows::validate`] derives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinearShape {
    pub(crate) rows: usize,
    pub(crate) hidden: usize,
    pub(crate) vocab: usize,
}

impl<'a, T: 'a, I: 'a, M: Memory> LinearRows<'a, T, I, M> {
    /// Number of rows (tokens).
    pub fn rows(&self) -> usize {
        M::len(&self.targets)
    }

    /// Checks every length; derives the vocabulary size from the weight.
    pub(crate) fn validate(&self, op: &'static str) -> Result<LinearShape> {
        let (rows, hidden) = (self.rows(), self.hidden_size);
        check::non_empty(op, "targets", rows)?;
        check::non_empty(op, "hidden_size", hidden)?;
        let expected = rows.checked_mul(hidden).ok_or_else(|| Error::InvalidLayout {
            op,
            reason: format!("{rows} rows x {hidden} hidden_size overflows usize"),
        })?;
        check::len(op, "hidden", expected, M::len(&self.hidden))?;
        let weight = M::len(&self.weight);
        check::non_empty(op, "weight", weight)?;
        if !weight.is_multiple_of(hidden) {
            return Err(Error::InvalidLayout {
                op,
                reason: format!(
                    "`weight` holds {weight} elements, not a whole number of rows of hidden_size {hidden}"
                ),
            });
        }
        let vocab = weight / hidden;
        if let Some(n) = opt_len::<M, T>(&self.bias) {
            check::len(op, "bias", vocab, n)?;
        }
        if let Some(n) = opt_len::<M, u8>(&self.mask) {
            check::len(op, "mask", rows, n)?;
        }
        Ok(LinearShape { rows, hidden, vocab })
    }
}

impl<'a, T, I> LinearRows<'a, T, I, Host> {
    /// `hidden` `[rows, hidden_size]`, `weight` `[vocab, hidden_size]` and
    /// `targets` `[rows]`; no bias, no mask.
    pub fn new(hidden: &'a [T], weight: &'a [T], targets: &'a [I], hidden_size: usize) -> Self {
        Self {
            hidden,
            weight,
            bias: None,
            targets,
            mask: None,
            hidden_size,
        }
    }

    /// The same head with a bias `[vocab]`.
    pub fn with_bias(self, bias: &'a [T]) -> Self {
        Self {
            bias: Some(bias),
            ..self
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

/// Gradients of [`fused_linear_logprobs_backward`], in the inputs' dtype.
#[derive(Debug, Clone)]
pub struct LinearGrads<T, M: Memory = Host> {
    /// `[rows, hidden_size]`; zero for skipped rows.
    pub hidden: M::Owned<T>,
    /// `[vocab, hidden_size]`.
    pub weight: M::Owned<T>,
    /// `[vocab]`, present exactly when the inputs have a bias.
    pub bias: Option<M::Owned<T>>,
}

/// Per-row token log-probs, entropies and log-sum-exps of
/// `softmax((h W^T + b) / T)`, one tile of logits at a time.
///
/// Errors: empty input, length mismatches (the weight must hold whole rows
/// of `hidden_size`), `temperature <= 0`, zero chunk sizes, a target outside
/// `0..vocab` (unless ignored), a NaN or `+inf` logit in an active row.
pub fn fused_linear_logprobs<T: Float, I: TokenId>(
    rows: &LinearRows<'_, T, I>,
    cfg: &FusedLinearConfig,
) -> Result<LogProbs> {
    let n = rows.validate(OP)?.rows;
    let zeros = |what| check::zeros(OP, what, n);
    let (mut logp, mut lse) = (zeros("logp")?, zeros("lse")?);
    let mut entropy = cfg.logprob.entropy.then(|| zeros("entropy")).transpose()?;
    fused_linear_logprobs_into(
        rows,
        cfg,
        &mut LogProbsOut {
            logp: &mut logp,
            entropy: entropy.as_deref_mut(),
            lse: &mut lse,
        },
    )?;
    let out = LogProbs { logp, entropy, lse };
    Ok(out)
}

/// [`fused_linear_logprobs`] into caller-provided `[rows]` buffers (the
/// host twin of the CUDA side's `cuda::fused_linear_logprobs_into`): with
/// them reused, a loop of calls allocates nothing but the per-row target
/// list (the chunk buffers are kept per thread). Skipped rows get 0.
/// Errors: those of [`fused_linear_logprobs`], and output lengths (an
/// entropy buffer is given exactly when `cfg.logprob.entropy`).
pub fn fused_linear_logprobs_into<T: Float, I: TokenId>(
    rows: &LinearRows<'_, T, I>,
    cfg: &FusedLinearConfig,
    out: &mut LogProbsOut<'_>,
) -> Result<()> {
    let shape = rows.validate(OP)?;
    cfg.validate(OP)?;
    out.validate(OP, shape.rows, cfg.logprob.entropy)?;
    let active: Vec<(usize, usize)> = active_rows(OP, rows.targets, rows.mask, shape.vocab, &cfg.logprob)?
        .into_iter()
        .enumerate()
        .filter_map(|(i, target)| target.map(|y| (i, y)))
        .collect();
    let (row_ids, ys): (Vec<usize>, Vec<usize>) = active.into_iter().unzip();
    let head = Head::new(rows, shape, cfg);
    let (logp, lse) = (&mut *out.logp, &mut *out.lse);
    let mut entropy = out.entropy.as_deref_mut();
    logp.fill(0.0);
    lse.fill(0.0);
    if let Some(e) = &mut entropy {
        e.fill(0.0);
    }
    Workspace::with(|ws| {
        let Workspace { hidden, soft, .. } = ws;
        for (chunk, ys) in row_ids.chunks(cfg.chunk_rows).zip(ys.chunks(cfg.chunk_rows)) {
            gather_rows(rows.hidden, shape.hidden, chunk.iter().copied(), hidden);
            soft.reset(chunk.len());
            head.fold_tiles(hidden, ys, cfg.logprob.entropy, 0..head.tiles(), None, soft)?;
            for (r, &i) in chunk.iter().enumerate() {
                let (row_lse, row_h) = soft.finish(OP, r, i)?;
                logp[i] = soft.target_logits[r] - row_lse;
                if !logp[i].is_finite() {
                    return Err(Error::NonFinite {
                        op: OP,
                        what: "logp",
                        index: i,
                    });
                }
                if let Some(e) = &mut entropy {
                    e[i] = row_h;
                }
                lse[i] = row_lse;
            }
        }
        Ok(())
    })
}

/// Gradients with respect to the hidden states, weight and bias of a loss,
/// given its gradients with respect to [`fused_linear_logprobs`]'s outputs
/// (and what that forward saved). Each logits tile is recomputed.
///
/// Errors: those of the forward (but no scan of the inputs for non-finite
/// values: the forward has seen the same inputs), gradient lengths, an
/// entropy gradient without a saved entropy, a non-finite saved value or
/// upstream gradient at an active row, a row whose `dz` could overflow f32,
/// a non-finite gradient (see the module docs).
pub fn fused_linear_logprobs_backward<T: Float, I: TokenId>(
    rows: &LinearRows<'_, T, I>,
    cfg: &FusedLinearConfig,
    saved: &LogProbSaved<'_>,
    grads: &LogProbGrads<'_>,
) -> Result<LinearGrads<T>> {
    let shape = rows.validate(OP_BWD)?;
    // The gradients are the inputs' own sizes (validated above). Zeros from
    // `vec!` are pages the `_into` form then writes once; a filled buffer
    // would be written twice (dW is the size of the LM head).
    let zeros = |len| vec![T::default(); len];
    let mut hidden = zeros(shape.rows * shape.hidden);
    let mut weight = zeros(shape.vocab * shape.hidden);
    let mut bias = rows.bias.map(|_| zeros(shape.vocab));
    fused_linear_logprobs_backward_into(
        rows,
        cfg,
        saved,
        grads,
        &mut LinearGradsOut {
            hidden: &mut hidden,
            weight: &mut weight,
            bias: bias.as_deref_mut(),
        },
    )?;
    let grad = LinearGrads { hidden, weight, bias };
    Ok(grad)
}

/// Where [`fused_linear_logprobs_backward_into`] writes (the host twin of
/// the CUDA side's `cuda::LinearGradsOut`). Every element is written; after
/// an error their contents are unspecified.
pub struct LinearGradsOut<'a, T> {
    /// `[rows, H]`; zero for skipped rows.
    pub hidden: &'a mut [T],
    /// `[V, H]`.
    pub weight: &'a mut [T],
    /// `[V]`; present exactly when the inputs have a bias.
    pub bias: Option<&'a mut [T]>,
}

/// [`fused_linear_logprobs_backward`] into caller-provided buffers: with
/// them reused, a loop of calls allocates nothing but the per-row
/// constants (the chunk buffers are kept per thread). Errors: those of
/// [`fused_linear_logprobs_backward`], and output lengths (a bias gradient
/// is given exactly when the inputs have a bias).
pub fn fused_linear_logprobs_backward_into<T: Float, I: TokenId>(
    rows: &LinearRows<'_, T, I>,
    cfg: &FusedLinearConfig,
    saved: &LogProbSaved<'_>,
    grads: &LogProbGrads<'_>,
    out: &mut LinearGradsOut<'_, T>,
) -> Result<()> {
    let shape = rows.validate(OP_BWD)?;
    cfg.validate(OP_BWD)?;
    let h = shape.hidden;
    check::len(OP_BWD, "dhidden (output)", shape.rows * h, out.hidden.len())?;
    check::len(OP_BWD, "dweight (output)", shape.vocab * h, out.weight.len())?;
    check::paired_len(
        OP_BWD,
        "dbias (output)",
        rows.bias.map(|_| shape.vocab),
        out.bias.as_ref().map(|b| b.len()),
        "a dbias output buffer is given exactly when the inputs have a bias",
    )?;
    let coefs = backward_coefs::<f32, I>(
        OP_BWD,
        rows.targets,
        rows.mask,
        shape.vocab,
        &cfg.logprob,
        saved,
        grads,
    )?;
    let active: Vec<usize> = (0..shape.rows).filter(|&i| coefs[i].target.is_some()).collect();
    let head = Head::new(rows, shape, cfg);
    let (d_hidden_out, d_weight_out) = (&mut *out.hidden, &mut *out.weight);
    let mut d_bias_out = out.bias.as_deref_mut();
    // Skipped rows' dh is 0; dW and db are written in full by the first
    // row chunk (zeroed when there is none).
    for (i, coef) in coefs.iter().enumerate() {
        if coef.target.is_none() {
            d_hidden_out[i * h..(i + 1) * h].fill(T::default());
        }
    }
    if active.is_empty() {
        d_weight_out.fill(T::default());
        if let Some(b) = &mut d_bias_out {
            b.fill(T::default());
        }
    }
    Workspace::with(|ws| {
        let Workspace {
            hidden,
            tiles,
            weight,
            d_hidden,
            ..
        } = ws;
        for (c, chunk) in active.chunks(cfg.chunk_rows).enumerate() {
            gather_rows(rows.hidden, h, chunk.iter().copied(), hidden);
            let n_rows = chunk.len();
            d_hidden.clear();
            d_hidden.resize(n_rows * h, 0.0f32);
            let group = (GROUP_TILES * cfg.chunk_vocab).min(shape.vocab);
            check::grow(OP_BWD, "logits tiles", tiles, n_rows.saturating_mul(group), 0.0)?;
            let mut grads = WeightGrads {
                weight: d_weight_out,
                bias: d_bias_out.as_deref_mut(),
                first: c == 0,
            };
            for first in (0..head.tiles()).step_by(GROUP_TILES) {
                let group = first..(first + GROUP_TILES).min(head.tiles());
                let dz = Dz {
                    coef: |r: usize| &coefs[chunk[r]],
                    logits_kept: false,
                };
                head.backward_tiles(hidden, &dz, group, tiles, &mut grads, (d_hidden, weight));
            }
            for (src, &i) in d_hidden.chunks(h).zip(chunk) {
                T::store(src, &mut d_hidden_out[i * h..(i + 1) * h]);
            }
        }
        Ok::<(), Error>(())
    })?;
    finite_grad(OP_BWD, "dhidden", d_hidden_out)?;
    finite_grad(OP_BWD, "dweight", d_weight_out)?;
    if let Some(bias) = &d_bias_out {
        finite_grad(OP_BWD, "dbias", bias)?;
    }
    Ok(())
}

/// A `NonFinite` error at the first non-finite element of a gradient.
pub(crate) fn finite_grad<T: Float>(op: &'static str, what: &'static str, xs: &[T]) -> Result<()> {
    let finite = xs
        .par_chunks(MIN_TASK)
        .all(|c| c.iter().all(|x| x.to_f32().is_finite()));
    if finite {
        return Ok(());
    }
    check::finite_by(op, what, xs, |x| x.to_f32().is_finite())
}

/// The LM head of one call, as the tile loops see it.
pub(crate) struct Head<'a, T> {
    weight: &'a [T],
    bias: Option<&'a [T]>,
    hidden: usize,
    vocab: usize,
    chunk_vocab: usize,
    inv_t: f32,
}

/// The working buffers of one fused call (log-probs, their backward, the
/// fused LM-head loss), kept per thread between calls so that a training
/// loop's steady state allocates none: each grows to the largest size it
/// has held and is reused. The calling thread holds them until it exits.
#[derive(Default)]
pub(crate) struct Workspace {
    /// `[rows, H]`: the row chunk's hidden states in f32.
    pub(crate) hidden: Vec<f32>,
    /// Logits tiles, then their gradient, tile after tile (tile `k`'s
    /// `[rows, cols_k]` block after tile `k - 1`'s): one group of
    /// [`GROUP_TILES`] in the two-call backward, a row chunk's whole
    /// `[rows, V]` in the fused loss (the two-call forward keeps none: each
    /// task folds its tile from its thread's scratch).
    pub(crate) tiles: Vec<f32>,
    /// `[cols, H]`: a weight tile in f32 for `dh`, when not stored as f32.
    pub(crate) weight: Vec<f32>,
    /// Each chunk row's softmax state and target logit.
    pub(crate) soft: RowSoftmax,
    /// `[rows, H]` f32 accumulator of a row chunk's `dh`.
    pub(crate) d_hidden: Vec<f32>,
}

/// What one tile task needs for itself, kept per thread as the workspace is.
#[derive(Default)]
struct TileScratch {
    /// `[rows, cols]`: a logits tile not kept for a backward.
    tile: Vec<f32>,
    /// `[cols, H]`: the weight tile, when not stored as f32.
    weight: Vec<f32>,
    /// `[cols]`: the bias tile, when not stored as f32.
    bias: Vec<f32>,
    /// f32 contributions to `dW` and `db` for dtypes other than f32.
    d_weight: Vec<f32>,
    d_bias: Vec<f32>,
}

thread_local! {
    static WORKSPACE: Cell<Option<Box<Workspace>>> = const { Cell::new(None) };
    static TILE_SCRATCH: Cell<Option<Box<TileScratch>>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's value in `slot`, taken out of it for the
/// call (a nested call, or one after a panic, starts from an empty one) and
/// put back after.
fn with_local<S: Default, R>(
    slot: &'static LocalKey<Cell<Option<Box<S>>>>,
    f: impl FnOnce(&mut S) -> R,
) -> R {
    let mut value = slot.with(Cell::take).unwrap_or_default();
    let result = f(&mut value);
    slot.with(|s| s.set(Some(value)));
    result
}

impl Workspace {
    /// Runs `f` with this thread's workspace.
    pub(crate) fn with<R>(f: impl FnOnce(&mut Workspace) -> R) -> R {
        with_local(&WORKSPACE, f)
    }
}

/// Vocabulary tiles in flight at once: the tile loops run a group's tiles
/// in parallel, then merge their softmax partials in order (forward) or
/// add their `dz W` to `dh` (backward). 32 tasks keep a workstation's
/// threads busy; the two-call forms hold one group, `chunk_rows x 32 x
/// chunk_vocab` f32 (16 MiB at the default chunks).
pub(crate) const GROUP_TILES: usize = 32;

/// Each row of a row chunk: its softmax state and target logit over the
/// tiles merged so far, and per-tile partials of the group in flight.
#[derive(Default)]
pub(crate) struct RowSoftmax {
    states: Vec<SoftmaxState>,
    /// The row's target logit, once the tile holding it has been merged.
    pub(crate) target_logits: Vec<f32>,
    tile_states: Vec<SoftmaxState>,
    tile_targets: Vec<f32>,
}

impl RowSoftmax {
    /// No tile seen yet, for `rows` rows.
    pub(crate) fn reset(&mut self, rows: usize) {
        self.states.clear();
        self.states.resize(rows, SoftmaxState::EMPTY);
        self.target_logits.clear();
        self.target_logits.resize(rows, 0.0);
    }

    /// Chunk row `r`'s `(lse, entropy)`; a NaN or `+inf` logit (or none
    /// finite) is `NonFinite` naming `"logits"` and the input row `index`.
    pub(crate) fn finish(&self, op: &'static str, r: usize, index: usize) -> Result<(f32, f32)> {
        self.states[r].finish().ok_or(Error::NonFinite {
            op,
            what: "logits",
            index,
        })
    }
}

/// Where [`Head::backward_tiles`] writes `dW` and `db`: the whole outputs,
/// of which it writes the tiles' columns.
pub(crate) struct WeightGrads<'a, T> {
    pub(crate) weight: &'a mut [T],
    pub(crate) bias: Option<&'a mut [T]>,
    /// The first row chunk: its contribution is stored, not added.
    pub(crate) first: bool,
}

/// How [`Head::backward_tiles`] turns a tile into `dz`: by chunk row `r`'s
/// constants `coef(r)`, applied to logits the buffer already holds (the
/// fused loss's pass kept them) or recomputed first.
pub(crate) struct Dz<F> {
    pub(crate) coef: F,
    pub(crate) logits_kept: bool,
}

impl<'a, T: Float> Head<'a, T> {
    pub(crate) fn new<I>(rows: &LinearRows<'a, T, I>, shape: LinearShape, cfg: &FusedLinearConfig) -> Self {
        Self {
            weight: rows.weight,
            bias: rows.bias,
            hidden: shape.hidden,
            vocab: shape.vocab,
            chunk_vocab: cfg.chunk_vocab,
            inv_t: 1.0 / cfg.logprob.temperature,
        }
    }

    /// Number of vocabulary tiles.
    pub(crate) fn tiles(&self) -> usize {
        self.vocab.div_ceil(self.chunk_vocab)
    }

    /// Tile `k`'s columns.
    pub(crate) fn tile_cols(&self, k: usize) -> Range<usize> {
        let start = k * self.chunk_vocab;
        start..(start + self.chunk_vocab).min(self.vocab)
    }

    /// The columns of tiles `tiles`.
    fn span(&self, tiles: &Range<usize>) -> Range<usize> {
        self.tile_cols(tiles.start).start..self.tile_cols(tiles.end - 1).end
    }

    /// Weight rows `cols` in f32: borrowed when stored as f32, else
    /// converted into `buf`.
    pub(crate) fn weight_rows<'b>(&'b self, cols: Range<usize>, buf: &'b mut Vec<f32>) -> &'b [f32] {
        f32_view(
            &self.weight[cols.start * self.hidden..cols.end * self.hidden],
            buf,
        )
    }

    /// Computes the logits of the row chunk `h_rows` over `tiles`, folding
    /// each tile into the rows' softmax states while it is in cache and
    /// picking up each row's target logit (`ys[r]`: chunk row `r`'s
    /// target). With `keep`, the logits stay there, tile after tile from
    /// its start (for the backward); else each task reuses one tile buffer
    /// of its thread. Tiles run in parallel, [`GROUP_TILES`] at a time,
    /// each one GEMM on one thread: a tile-sized GEMM split across threads
    /// loses much of its speed. Each tile's partial states are merged in
    /// tile order, so every value is the same for any thread count.
    pub(crate) fn fold_tiles(
        &self,
        h_rows: &[f32],
        ys: &[usize],
        entropy: bool,
        tiles: Range<usize>,
        mut keep: Option<&mut [f32]>,
        soft: &mut RowSoftmax,
    ) -> Result<()> {
        let rows = ys.len();
        let origin = self.span(&tiles).start;
        for first in tiles.clone().step_by(GROUP_TILES) {
            let group = first..(first + GROUP_TILES).min(tiles.end);
            let span = self.span(&group);
            let n = group.len() * rows;
            let RowSoftmax {
                states,
                target_logits,
                tile_states,
                tile_targets,
            } = soft;
            tile_states.clear();
            tile_states.resize(n, SoftmaxState::EMPTY);
            tile_targets.clear();
            tile_targets.resize(n, 0.0);
            let kept = match keep.as_deref_mut() {
                Some(buf) => Either::Left(
                    buf[rows * (span.start - origin)..rows * (span.end - origin)]
                        .par_chunks_mut(rows * self.chunk_vocab)
                        .map(Some),
                ),
                None => Either::Right((0..group.len()).into_par_iter().map(|_| None)),
            };
            kept.zip(tile_states.par_chunks_mut(rows))
                .zip(tile_targets.par_chunks_mut(rows))
                .enumerate()
                .try_for_each(|(j, ((kept, tile_states), tile_targets))| {
                    let cols = self.tile_cols(group.start + j);
                    let width = cols.len();
                    with_local(&TILE_SCRATCH, |s| {
                        let tile = match kept {
                            Some(tile) => tile,
                            None => {
                                // Sized by the caller's chunk sizes: it may not fit.
                                check::grow(OP, "logits tile", &mut s.tile, rows.saturating_mul(width), 0.0)?;
                                &mut s.tile[..rows * width]
                            }
                        };
                        let w_cols = self.weight_rows(cols.clone(), &mut s.weight);
                        self.logits_into(h_rows, w_cols, cols.clone(), &mut s.bias, tile);
                        fold_rows(tile, width, entropy, tile_states);
                        for ((row, x), &y) in tile.chunks(width).zip(tile_targets).zip(ys) {
                            if cols.contains(&y) {
                                *x = row[y - cols.start];
                            }
                        }
                        Ok(())
                    })
                })?;
            for (j, (part, part_targets)) in tile_states
                .chunks(rows)
                .zip(tile_targets.chunks(rows))
                .enumerate()
            {
                let cols = self.tile_cols(group.start + j);
                for r in 0..rows {
                    states[r] = states[r].merge(part[r]);
                    if cols.contains(&ys[r]) {
                        target_logits[r] = part_targets[r];
                    }
                }
            }
        }
        Ok(())
    }

    /// The backward over `tiles` of the row chunk `h_rows`, whose buffer
    /// `buf` holds their logits as [`Self::fold_tiles`] leaves them (or is
    /// recomputed, per `dz`): each tile turned into `dz` in place, and its
    /// columns of `dW = dz^T h` and `db` written into `grads` (tiles in
    /// parallel, each GEMM on one thread); then `dh += dz_k W_k` tile by
    /// tile in order (GEMMs on all threads; `w_buf` converts non-f32
    /// weights). Every value is the same for any thread count.
    pub(crate) fn backward_tiles<'c, F: Fn(usize) -> &'c RowGrad + Sync>(
        &self,
        h_rows: &[f32],
        dz: &Dz<F>,
        tiles: Range<usize>,
        buf: &mut [f32],
        grads: &mut WeightGrads<'_, T>,
        (d_hidden, w_buf): (&mut [f32], &mut Vec<f32>),
    ) {
        let (h, rows) = (self.hidden, h_rows.len() / self.hidden);
        let span = self.span(&tiles);
        let buf = &mut buf[..rows * span.len()];
        let biases = match grads.bias.as_deref_mut() {
            Some(b) => Either::Left(b[span.clone()].par_chunks_mut(self.chunk_vocab).map(Some)),
            None => Either::Right((0..tiles.len()).into_par_iter().map(|_| None)),
        };
        let first = grads.first;
        buf.par_chunks_mut(rows * self.chunk_vocab)
            .zip(grads.weight[span.start * h..span.end * h].par_chunks_mut(self.chunk_vocab * h))
            .zip(biases)
            .enumerate()
            .for_each(|(j, ((tile, d_weight), d_bias))| {
                let cols = self.tile_cols(tiles.start + j);
                let width = cols.len();
                with_local(&TILE_SCRATCH, |s| {
                    if !dz.logits_kept {
                        let w_cols = self.weight_rows(cols.clone(), &mut s.weight);
                        self.logits_into(h_rows, w_cols, cols.clone(), &mut s.bias, tile);
                    }
                    for (r, row) in tile.chunks_mut(width).enumerate() {
                        (dz.coef)(r).apply(row, cols.start);
                    }
                    let dz = Mat::new(tile, rows, width);
                    accumulate(d_weight, &mut s.d_weight, first, |acc, add| {
                        matmul(
                            acc,
                            add.then_some(1.0),
                            1.0,
                            dz.t(),
                            Mat::new(h_rows, rows, h),
                            ONE_THREAD,
                        )
                    });
                    if let Some(d_bias) = d_bias {
                        accumulate(d_bias, &mut s.d_bias, first, |acc, add| {
                            column_sums(tile, width, acc, add)
                        });
                    }
                });
            });
        for (j, tile) in buf.chunks(rows * self.chunk_vocab).enumerate() {
            let cols = self.tile_cols(tiles.start + j);
            let width = cols.len();
            let w_cols = self.weight_rows(cols, w_buf);
            matmul(
                d_hidden,
                Some(1.0),
                1.0,
                Mat::new(tile, rows, width),
                Mat::new(w_cols, width, h),
                ALL_THREADS,
            );
        }
    }

    /// `tile = (h_rows W_cols^T + b_cols) / T`, `[rows, cols.len()]`
    /// row-major, one GEMM on the calling thread.
    fn logits_into(
        &self,
        h_rows: &[f32],
        w_cols: &[f32],
        cols: Range<usize>,
        bias_buf: &mut Vec<f32>,
        tile: &mut [f32],
    ) {
        let (n_rows, width) = (h_rows.len() / self.hidden, cols.len());
        // With a bias the tile starts as b_cols in every row and the GEMM
        // adds to it: dst = (1/T) dst + (1/T) h W^T.
        let keep = self.bias.map(|bias| {
            let b_cols = f32_view(&bias[cols], bias_buf);
            for row in tile.chunks_mut(width) {
                row.copy_from_slice(b_cols);
            }
            self.inv_t
        });
        matmul(
            tile,
            keep,
            self.inv_t,
            Mat::new(h_rows, n_rows, self.hidden),
            Mat::new(w_cols, width, self.hidden).t(),
            ONE_THREAD,
        );
    }
}

/// The given rows of `hidden` (`h` wide), in f32, one after another in `dst`.
pub(crate) fn gather_rows<T: Float>(
    hidden: &[T],
    h: usize,
    rows: impl Iterator<Item = usize>,
    dst: &mut Vec<f32>,
) {
    dst.clear();
    for i in rows {
        let start = dst.len();
        dst.resize(start + h, 0.0);
        T::load_scaled(&hidden[i * h..(i + 1) * h], 1.0, &mut dst[start..]);
    }
}

/// `xs` itself when `T` is f32.
fn as_f32<T: Float>(xs: &[T]) -> Option<&[f32]> {
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32, so the slice's memory is `xs.len()` f32s.
        unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<f32>(), xs.len()) }
    })
}

/// `xs` itself when `T` is f32.
fn as_f32_mut<T: Float>(xs: &mut [T]) -> Option<&mut [f32]> {
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32, so the slice's memory is `xs.len()` f32s,
        // borrowed mutably for as long as `xs` is.
        unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<f32>(), xs.len()) }
    })
}

/// `xs` in f32: borrowed when `T` is f32, else converted into `buf`.
fn f32_view<'b, T: Float>(xs: &'b [T], buf: &'b mut Vec<f32>) -> &'b [f32] {
    if let Some(xs) = as_f32(xs) {
        return xs;
    }
    buf.resize(xs.len(), 0.0);
    buf.par_chunks_mut(BLOCK)
        .zip(xs.par_chunks(BLOCK))
        .with_min_len(MIN_TASK / BLOCK)
        .for_each(|(dst, src)| T::load_scaled(src, 1.0, dst));
    buf
}

/// Adds an f32 contribution into `out`, or stores it there if it is the
/// `first`. `contribute(acc, add)` writes it into `acc` (`add == false`) or
/// adds it to `acc` (`add == true`): `acc` is `out` itself when `T` is f32
/// (so `out` accumulates in f32), else `buf`, then added into `out` with one
/// rounding per element.
///
/// The first contribution is written, not added to zeros: reading a fresh
/// zeroed allocation before writing it faults each page twice (zero page,
/// then copy on write), which doubled the time of the dW GEMM.
fn accumulate<T: Float>(
    out: &mut [T],
    buf: &mut Vec<f32>,
    first: bool,
    contribute: impl FnOnce(&mut [f32], bool),
) {
    if let Some(out) = as_f32_mut(out) {
        return contribute(out, !first);
    }
    buf.resize(out.len(), 0.0);
    contribute(buf, false);
    if first {
        return T::store(buf, out);
    }
    out.par_chunks_mut(BLOCK)
        .zip(buf.par_chunks(BLOCK))
        .with_min_len(MIN_TASK / BLOCK)
        .for_each_init(
            || Box::new([0.0f32; BLOCK]),
            |sum, (out, add)| {
                let sum = &mut sum[..out.len()];
                T::load_scaled(out, 1.0, sum);
                for (s, a) in sum.iter_mut().zip(add) {
                    *s += a;
                }
                T::store(sum, out);
            },
        );
}

multiversion! {
    /// Folds each `cols`-wide row of `tile` into its softmax state (its
    /// entropy sum only if `entropy`).
    fn fold_rows(tile: &[f32], cols: usize, entropy: bool, states: &mut [SoftmaxState]) {
        for (row, state) in tile.chunks(cols).zip(states) {
            *state = state.fold::<Mad>(row, entropy);
        }
    }
}

multiversion! {
    /// The column sums of a `cols`-wide row-major tile, written into
    /// `sums` (`add == false`) or added to it.
    fn column_sums(tile: &[f32], cols: usize, sums: &mut [f32], add: bool) {
        if !add {
            sums.fill(0.0);
        }
        for row in tile.chunks(cols) {
            for (s, x) in sums.iter_mut().zip(row) {
                *s += x;
            }
        }
    }
}

/// A strided view of an f32 matrix: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// `data` as a row-major `[rows, cols]` matrix; it must hold exactly that.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix buffer length");
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, over the same data.
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst = beta a b`, or `dst = alpha dst + beta a b` when `alpha` is given,
/// for a row-major `dst [a.rows, b.cols]`; f32 GEMM on all rayon threads.
pub(crate) fn matmul(
    dst: &mut [f32],
    alpha: Option<f32>,
    beta: f32,
    a: Mat<'_>,
    b: Mat<'_>,
    threads: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.len() == m * n, "matmul shapes");
    // SAFETY: `Mat::new` checked that each operand's buffer holds its rows x
    // cols elements at its strides (a transpose swaps both), `dst` holds
    // m x n, and `dst` is borrowed mutably, so it aliases neither operand.
    // `gemm` takes column stride before row stride.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            alpha.is_some(),
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            alpha.unwrap_or(0.0),
            beta,
            false,
            false,
            false,
            threads,
        )
    }
}

/// [`matmul`] on the calling thread.
pub(crate) const ONE_THREAD: Parallelism = Parallelism::None;
/// [`matmul`] on all rayon threads.
pub(crate) const ALL_THREADS: Parallelism = Parallelism::Rayon(0);
