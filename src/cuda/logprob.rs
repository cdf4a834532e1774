//! Launches of the token log-prob kernels (`cuda/logprob.cu`). The spec,
//! math and validation are those of [`crate::ops::logprob`].

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};

use super::abi::{self, DevAddr, SoftmaxPartial};
use super::{grid_x, ptx, Device, Gpu, GpuFloat, GpuId, KernelFile};
use crate::error::{check, Result};
use crate::ops::logprob::{
    validate_lens, LogProbConfig, LogProbGrads, LogProbSaved, LogProbs, LogitRows, OP, OP_BWD,
};

const FILE: KernelFile = KernelFile {
    name: "logprob",
    ptx: ptx::LOGPROB,
};
/// Rows per block of the merge: one warp each.
const MERGE_ROWS_PER_BLOCK: u32 = 8;
/// A vocab slice is at least this long, so a block's sweep amortizes its reduction.
const MIN_SLICE: usize = 8192;

abi::kernels! {
    file: FILE;
    /// Rows of `logits` (`[grid.x, vocab]`) in `grid.y = splits` vocab
    /// slices, one block of `LOGPROB_THREADS` per (row, slice). `targets`,
    /// `mask`, `logp`, `entropy`, `lse`: `[grid.x]`. With one slice the
    /// row's outputs are written; with more, `partials` (`[grid.x * splits]`
    /// softmax states) is, for `logprob_merge`.
    fn logprob_fwd<T: GpuFloat, I: GpuId>(
        logits: In<T>,
        targets: In<I>,
        mask: Opt<In<u8>>,
        vocab: i64,
        ignore_index: i64,
        has_ignore: i32,
        inv_t: f32,
        splits: i64,
        logp: Out<f32>,
        entropy: Opt<Out<f32>>,
        lse: Out<f32>,
        partials: Opt<Out<SoftmaxPartial>>,
        status: Status,
    ) threads(abi::LOGPROB_THREADS);
    /// Folds the forward's `partials` (`[rows * splits]`) into each row's
    /// outputs: one warp per row, any number of warps per block, blocks
    /// covering `rows`. Lengths as in `logprob_fwd`, `[rows]`.
    fn logprob_merge<T: GpuFloat, I: GpuId>(
        logits: In<T>,
        targets: In<I>,
        mask: Opt<In<u8>>,
        rows: i64,
        vocab: i64,
        ignore_index: i64,
        has_ignore: i32,
        inv_t: f32,
        splits: i64,
        partials: In<SoftmaxPartial>,
        logp: Out<f32>,
        entropy: Opt<Out<f32>>,
        lse: Out<f32>,
        status: Status,
    );
    /// `dlogits` (`[grid.x, vocab]`, which may be `logits` itself) from the
    /// saved `lse` and `entropy` and the upstream gradients (each
    /// `[grid.x]`): grid and block as `logprob_fwd`.
    fn logprob_bwd<T: GpuFloat, I: GpuId>(
        logits: In<T>,
        dlogits: Out<T>,
        targets: In<I>,
        mask: Opt<In<u8>>,
        vocab: i64,
        ignore_index: i64,
        has_ignore: i32,
        inv_t: f32,
        splits: i64,
        lse: In<f32>,
        entropy: Opt<In<f32>>,
        grad_logp: In<f32>,
        grad_entropy: Opt<In<f32>>,
        grad_lse: Opt<In<f32>>,
        status: Status,
    ) threads(abi::LOGPROB_THREADS);
}

/// Where the forward writes its outputs (each `[rows]`).
pub struct LogProbsOut<'a> {
    /// `log p(target)`.
    pub logp: CudaViewMut<'a, f32>,
    /// Entropy; must be present exactly when `cfg.entropy`.
    pub entropy: Option<CudaViewMut<'a, f32>>,
    /// `logsumexp(logits / T)`.
    pub lse: CudaViewMut<'a, f32>,
}

impl LogProbsOut<'_> {
    /// Output lengths for `rows` rows; entropy present exactly when asked for.
    pub(crate) fn validate(&self, op: &'static str, rows: usize, entropy: bool) -> Result<()> {
        check::len(op, "logp (output)", rows, self.logp.len())?;
        check::len(op, "lse (output)", rows, self.lse.len())?;
        check::paired_len(
            op,
            "entropy (output)",
            entropy.then_some(rows),
            self.entropy.as_ref().map(|e| e.len()),
            "an entropy output buffer is given exactly when `entropy` is set",
        )
    }
}

impl LogProbs<Device> {
    /// Borrows what the backward needs.
    pub fn saved(&self) -> LogProbSaved<'_, Device> {
        LogProbSaved {
            lse: self.lse.as_view(),
            entropy: self.entropy.as_ref().map(|e| e.as_view()),
        }
    }
}

/// Grid over (row, vocab slice); rows must fit a grid dimension.
fn grid(op: &'static str, rows: usize, splits: usize) -> Result<(u32, u32)> {
    Ok((grid_x(op, "rows", rows)?, splits.min(u16::MAX as usize) as u32))
}

/// [`crate::token_logprobs`] on the GPU, into caller-provided buffers.
pub fn token_logprobs_into<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    rows: &LogitRows<'_, T, I, Device>,
    cfg: &LogProbConfig,
    out: &mut LogProbsOut<'_>,
) -> Result<()> {
    let n = rows.validate(OP)?;
    cfg.validate(OP)?;
    out.validate(OP, n, cfg.entropy)?;
    let vocab = rows.vocab;
    let (grid_rows, splits) = grid(OP, n, gpu.vocab_splits(n, vocab, MIN_SLICE))?;
    let mut partials: Option<CudaSlice<SoftmaxPartial>> = match splits {
        1 => None,
        s => Some(gpu.alloc(n * s as usize)?),
    };
    let (ignore, has_ignore) = (cfg.ignore_index.unwrap_or(0), cfg.ignore_index.is_some() as i32);
    let inv_t = 1.0 / cfg.temperature;
    let (vocab_i, splits_i) = (vocab as i64, splits as i64);
    let status = gpu.status();
    let cfg_fwd = LaunchConfig {
        grid_dim: (grid_rows, splits, 1),
        block_dim: (abi::LOGPROB_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `logits` holds `n * vocab` values, the other inputs and the
    // outputs `n` (validated above), `partials` `n * splits` states when
    // there are several slices.
    unsafe {
        kernel::logprob_fwd::<T, I>(
            gpu,
            cfg_fwd,
            &rows.logits,
            &rows.targets,
            rows.mask.as_ref(),
            vocab_i,
            ignore,
            has_ignore,
            inv_t,
            splits_i,
            &mut out.logp,
            out.entropy.as_mut(),
            &mut out.lse,
            partials.as_mut(),
            &*status,
        )
    }?;

    if let Some(partials) = &partials {
        let cfg_merge = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(MERGE_ROWS_PER_BLOCK), 1, 1),
            block_dim: (32 * MERGE_ROWS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as for the forward; the blocks cover the `n` rows.
        unsafe {
            kernel::logprob_merge::<T, I>(
                gpu,
                cfg_merge,
                &rows.logits,
                &rows.targets,
                rows.mask.as_ref(),
                n as i64,
                vocab_i,
                ignore,
                has_ignore,
                inv_t,
                splits_i,
                partials,
                &mut out.logp,
                out.entropy.as_mut(),
                &mut out.lse,
                &*status,
            )
        }?;
    }
    Ok(())
}

/// [`crate::token_logprobs`] on the GPU, allocating its outputs.
pub fn token_logprobs<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    rows: &LogitRows<'_, T, I, Device>,
    cfg: &LogProbConfig,
) -> Result<LogProbs<Device>> {
    let n = rows.validate(OP)?;
    let mut logp = gpu.alloc::<f32>(n)?;
    let mut lse = gpu.alloc::<f32>(n)?;
    let mut entropy = if cfg.entropy {
        Some(gpu.alloc::<f32>(n)?)
    } else {
        None
    };
    token_logprobs_into(
        gpu,
        rows,
        cfg,
        &mut LogProbsOut {
            logp: logp.as_view_mut(),
            entropy: entropy.as_mut().map(|e| e.as_view_mut()),
            lse: lse.as_view_mut(),
        },
    )?;
    Ok(LogProbs { logp, entropy, lse })
}

/// [`crate::token_logprobs_backward`] on the GPU, writing `dlogits`
/// (`[rows, vocab]`, the logits' dtype).
pub fn token_logprobs_backward_into<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    rows: &LogitRows<'_, T, I, Device>,
    cfg: &LogProbConfig,
    saved: &LogProbSaved<'_, Device>,
    grads: &LogProbGrads<'_, Device>,
    dlogits: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let n = rows.validate(OP_BWD)?;
    check::len(OP_BWD, "dlogits (output)", rows.logits.len(), dlogits.len())?;
    let (src, _read) = rows.logits.device_ptr(gpu.stream());
    let (dst, _written) = dlogits.device_ptr_mut(gpu.stream());
    let (src, dst) = (DevAddr::new(src), DevAddr::new(dst));
    let rows_ref = RowRefs {
        n,
        vocab: rows.vocab,
        targets: &rows.targets,
        mask: &rows.mask,
    };
    launch_backward::<T, I>(gpu, src, dst, rows_ref, cfg, saved, grads)
}

/// [`crate::token_logprobs_backward_inplace`] on the GPU: the gradient
/// replaces the logits.
// The CPU form's seven arguments and the GPU: a struct would hold a mutable
// view beside shared ones only to satisfy the lint.
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_backward_inplace<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    logits: &mut CudaViewMut<'_, T>,
    targets: &CudaView<'_, I>,
    mask: &Option<CudaView<'_, u8>>,
    vocab: usize,
    cfg: &LogProbConfig,
    saved: &LogProbSaved<'_, Device>,
    grads: &LogProbGrads<'_, Device>,
) -> Result<()> {
    let n = validate_lens(
        OP_BWD,
        vocab,
        logits.len(),
        targets.len(),
        mask.as_ref().map(|m| m.len()),
    )?;
    let (ptr, _written) = logits.device_ptr_mut(gpu.stream());
    let ptr = DevAddr::new(ptr);
    let rows = RowRefs {
        n,
        vocab,
        targets,
        mask,
    };
    launch_backward::<T, I>(gpu, ptr, ptr, rows, cfg, saved, grads)
}

/// Targets and mask of validated rows.
struct RowRefs<'a, 'b, I> {
    n: usize,
    vocab: usize,
    targets: &'a CudaView<'b, I>,
    mask: &'a Option<CudaView<'b, u8>>,
}

/// Launches the backward on raw logits and gradient pointers (equal when
/// in place), keeping cudarc's read/write tracking through the callers'
/// guards.
fn launch_backward<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    logits: DevAddr<T>,
    dlogits: DevAddr<T>,
    rows: RowRefs<'_, '_, I>,
    cfg: &LogProbConfig,
    saved: &LogProbSaved<'_, Device>,
    grads: &LogProbGrads<'_, Device>,
) -> Result<()> {
    cfg.validate(OP_BWD)?;
    grads.validate(OP_BWD, rows.n, saved)?;
    let (grid_rows, splits) = grid(OP_BWD, rows.n, gpu.vocab_splits(rows.n, rows.vocab, MIN_SLICE))?;
    let (ignore, has_ignore) = (cfg.ignore_index.unwrap_or(0), cfg.ignore_index.is_some() as i32);
    let inv_t = 1.0 / cfg.temperature;
    let (vocab_i, splits_i) = (rows.vocab as i64, splits as i64);
    let status = gpu.status();
    let cfg_bwd = LaunchConfig {
        grid_dim: (grid_rows, splits, 1),
        block_dim: (abi::LOGPROB_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `logits` and `dlogits` address `n * vocab` elements (the
    // callers validated them and hold their guards), the saved values and
    // gradients `n` (validated above).
    unsafe {
        kernel::logprob_bwd::<T, I>(
            gpu,
            cfg_bwd,
            logits,
            dlogits,
            rows.targets,
            rows.mask.as_ref(),
            vocab_i,
            ignore,
            has_ignore,
            inv_t,
            splits_i,
            &saved.lse,
            saved.entropy.as_ref(),
            &grads.logp,
            grads.entropy.as_ref(),
            grads.lse.as_ref(),
            &*status,
        )
    }
}

/// [`crate::token_logprobs_backward`] on the GPU, allocating `dlogits`.
pub fn token_logprobs_backward<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    rows: &LogitRows<'_, T, I, Device>,
    cfg: &LogProbConfig,
    saved: &LogProbSaved<'_, Device>,
    grads: &LogProbGrads<'_, Device>,
) -> Result<CudaSlice<T>> {
    let mut dlogits = gpu.alloc::<T>(rows.logits.len())?;
    token_logprobs_backward_into(gpu, rows, cfg, saved, grads, &mut dlogits.as_view_mut())?;
    Ok(dlogits)
}
