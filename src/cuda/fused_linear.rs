//! Fused linear log-probs on the GPU: cuBLAS GEMMs by tile feeding the
//! hand-written kernels of `cuda/fused_linear.cu`. The spec, math and
//! validation are those of [`crate::ops::fused_linear`], and so are the
//! loops: row chunks outside, vocabulary chunks inside, `[N, V]` never held.
//!
//! **Workspace** (device memory beyond inputs and outputs), with `R` =
//! `chunk_rows`, `C` = `chunk_vocab` and `s` the dtype's size: forward
//! `4 R C` (the f32 tile) plus `12 N ceil(V / C) + 4 N` (per-row partial
//! softmax states and target logits: 1.6 MiB at N = 16384, V = 151936); backward `(4 + s) R C` (the tile and its gradient) plus
//! `(4 + s) R H` (the dh accumulator and the rows' hidden states with
//! skipped rows zeroed). [`FusedLinearConfig::gpu`] keeps it under 0.5 GiB
//! at Qwen2.5-7B's head (H = 3584) whatever N is.
//!
//! **Precision.** GEMMs take the inputs' dtype and accumulate in f32
//! (`CUBLAS_COMPUTE_32F`, no TF32 for f32 inputs); logits tiles are f32.
//! The backward rounds `dlogits` to the inputs' dtype before its GEMMs (as
//! PyTorch's bf16 autograd and Liger-Kernel do); `dh` accumulates over the
//! vocabulary in f32 and is rounded once; `dW` and `db` are rounded once per
//! row chunk, as on the CPU.
//!
//! **Rows.** Skipped rows cost their share of the GEMMs (the GPU computes
//! whole tiles) but never affect a result: their hidden states may hold
//! anything, NaN included, and their gradients are exactly 0.

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::driver::{CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};

use super::abi::{self, DevAddr, SoftmaxPartial};
use super::{ptx, Device, Gpu, GpuFloat, GpuId, KernelFile, LogProbsOut};
use crate::error::{check, Error, Result};
use crate::ops::fused_linear::{FusedLinearConfig, LinearGrads, LinearRows, OP, OP_BWD};
use crate::ops::logprob::{LogProbGrads, LogProbSaved, LogProbs};

pub(super) const FILE: KernelFile = KernelFile {
    name: "fused_linear",
    ptx: ptx::FUSED_LINEAR,
};
/// Rows per block of the merge: one warp each.
const MERGE_ROWS_PER_BLOCK: u32 = 8;
/// Threads of the elementwise kernels and of `fused_active_hidden`.
const THREADS: u32 = 256;

abi::kernels! {
    file: FILE;
    /// `tile[i] += bias[i % cols]` over a `[rows, cols]` tile; grid-stride,
    /// any grid and block. `bias`: `[cols]`.
    fn fused_add_bias<T: GpuFloat>(tile: Out<f32>, bias: In<T>, rows: i64, cols: i64);
    /// `dst[i] = src[i]` rounded to `T`, `i < n`; grid-stride, any grid and block.
    fn fused_cast<T: GpuFloat>(src: In<f32>, dst: Out<T>, n: i64);
    /// `dst[i] = value`, `i < n`; grid-stride, any grid and block.
    fn fused_fill<T: GpuFloat>(dst: Out<T>, value: f32, n: i64);
    /// Raises NON_FINITE at the first non-finite `x[i]`, `i < n`, unless the
    /// op already raised; grid-stride, any grid and block.
    fn fused_check_finite<T: GpuFloat>(x: In<T>, n: i64, status: Status);
    /// Folds a logits tile (`[grid, cols]`, columns `col0..` of `vocab`,
    /// rows `row0..` of the batch) into per-row softmax states: one block
    /// of `LOGPROB_THREADS` per tile row. `targets`, `mask`: the batch's;
    /// `partials`: `[rows * chunks]`, this chunk's at `chunk`;
    /// `target_logits`: `[rows]`, the row's target logit where it lies in
    /// the tile.
    fn fused_tile_fwd<I: GpuId>(
        tile: In<f32>,
        cols: i64,
        col0: i64,
        vocab: i64,
        row0: i64,
        targets: In<I>,
        mask: Opt<In<u8>>,
        ignore_index: i64,
        has_ignore: i32,
        inv_t: f32,
        entropy: i32,
        chunk: i64,
        chunks: i64,
        partials: Out<SoftmaxPartial>,
        target_logits: Out<f32>,
    ) threads(abi::LOGPROB_THREADS);
    /// Folds each row's `chunks` states into its outputs (each `[rows]`):
    /// one warp per row, any number of warps per block, blocks covering
    /// `rows`.
    fn fused_merge<I: GpuId>(
        target_logits: In<f32>,
        targets: In<I>,
        mask: Opt<In<u8>>,
        rows: i64,
        vocab: i64,
        ignore_index: i64,
        has_ignore: i32,
        inv_t: f32,
        chunks: i64,
        partials: In<SoftmaxPartial>,
        logp: Out<f32>,
        entropy: Opt<Out<f32>>,
        lse: Out<f32>,
        status: Status,
    );
    /// A logits tile's gradient `dtile` (`[grid, cols]`, in `T`) from the
    /// saved values and upstream gradients (each `[rows]` of the batch,
    /// read at `row0..`): one block of `LOGPROB_THREADS` per tile row.
    fn fused_tile_bwd<T: GpuFloat, I: GpuId>(
        tile: In<f32>,
        dtile: Out<T>,
        cols: i64,
        col0: i64,
        vocab: i64,
        row0: i64,
        targets: In<I>,
        mask: Opt<In<u8>>,
        ignore_index: i64,
        has_ignore: i32,
        inv_t: f32,
        lse: In<f32>,
        entropy: Opt<In<f32>>,
        grad_logp: In<f32>,
        grad_entropy: Opt<In<f32>>,
        grad_lse: Opt<In<f32>>,
        status: Status,
    ) threads(abi::LOGPROB_THREADS);
    /// `out` (`[grid, hidden_size]`) = the rows `row0..` of `hidden`, with
    /// skipped rows zeroed: one block per row, any block size.
    fn fused_active_hidden<T: GpuFloat, I: GpuId>(
        hidden: In<T>,
        out: Out<T>,
        hidden_size: i64,
        row0: i64,
        targets: In<I>,
        mask: Opt<In<u8>>,
        ignore_index: i64,
        has_ignore: i32,
    );
}

/// A row-major matrix in device memory: its address, dtype and shape.
#[derive(Clone, Copy)]
pub(super) struct Mat {
    ptr: u64,
    dtype: cudaDataType_t,
    rows: usize,
    cols: usize,
}

impl Mat {
    pub(super) fn new<T: GpuFloat>(ptr: u64, rows: usize, cols: usize) -> Self {
        Mat {
            ptr,
            dtype: T::CUBLAS,
            rows,
            cols,
        }
    }

    /// As a GEMM operand, transposed or not: `(storage, op, rows of op(X), cols of op(X))`.
    fn op(self, transposed: bool) -> (Mat, cublasOperation_t, usize, usize) {
        // A row-major [r, c] matrix is a column-major [c, r] one, so
        // row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets the
        // operands swapped, each untransposed as stored (or transposed).
        if transposed {
            (self, cublasOperation_t::CUBLAS_OP_T, self.cols, self.rows)
        } else {
            (self, cublasOperation_t::CUBLAS_OP_N, self.rows, self.cols)
        }
    }
}

fn int(op: &'static str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Unsupported {
        op,
        reason: format!("{what} = {n} exceeds cuBLAS's 32-bit dimensions"),
    })
}

/// Row-major `c = op(a) op(b) + beta c`, f32 accumulation.
pub(super) fn gemm(
    gpu: &Gpu,
    op: &'static str,
    c: Mat,
    beta: f32,
    a: (Mat, bool),
    b: (Mat, bool),
) -> Result<()> {
    let (a, op_a, m, k) = a.0.op(a.1);
    let (b, op_b, k_b, n) = b.0.op(b.1);
    debug_assert!(k == k_b && c.rows == m && c.cols == n, "GEMM shapes");
    let alpha = 1.0f32;
    let blas = gpu.blas()?;
    // SAFETY: the callers pass live device buffers of at least these shapes,
    // on the stream the handle is bound to, and keep their guards until after
    // this call; cuBLAS reads alpha and beta before returning.
    unsafe {
        gemm_ex(
            *blas.handle(),
            op_b,
            op_a,
            int(op, "GEMM n", n)?,
            int(op, "GEMM m", m)?,
            int(op, "GEMM k", k)?,
            (&alpha as *const f32).cast(),
            b.ptr as *const _,
            b.dtype,
            int(op, "leading dimension", b.cols)?,
            a.ptr as *const _,
            a.dtype,
            int(op, "leading dimension", a.cols)?,
            (&beta as *const f32).cast(),
            c.ptr as *mut _,
            c.dtype,
            int(op, "leading dimension", c.cols)?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::cuda_in(format!("{op}: cuBLAS GEMM"), e))
}

/// A grid-stride elementwise launch over `n` elements.
pub(super) fn elementwise(gpu: &Gpu, n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).min(8 * gpu.sm_count()).max(1);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row of a chunk.
pub(super) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `THREADS` per row of a chunk: `fused_active_hidden`'s grid.
pub(super) fn active_hidden_grid(rows: usize) -> LaunchConfig {
    per_row(rows, THREADS)
}

/// One warp per row, `MERGE_ROWS_PER_BLOCK` rows a block, blocks covering
/// `rows`: the grid of `fused_merge` (and of the fused loss's `fll_rows`).
pub(super) fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(MERGE_ROWS_PER_BLOCK), 1, 1),
        block_dim: (32 * MERGE_ROWS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Validated dimensions, raw pointers and kernel parameters shared by the
/// forward and the backward.
pub(super) struct Plan {
    pub(super) rows: usize,
    pub(super) hidden: usize,
    pub(super) vocab: usize,
    pub(super) chunk_rows: usize,
    pub(super) chunk_vocab: usize,
    pub(super) ignore: i64,
    pub(super) has_ignore: i32,
    pub(super) inv_t: f32,
}

impl Plan {
    pub(super) fn new<T, I>(
        op: &'static str,
        rows: &LinearRows<'_, T, I, Device>,
        cfg: &FusedLinearConfig,
    ) -> Result<Self> {
        let shape = rows.validate(op)?;
        cfg.validate(op)?;
        Ok(Plan {
            rows: shape.rows,
            hidden: shape.hidden,
            vocab: shape.vocab,
            chunk_rows: cfg.chunk_rows.min(shape.rows).min(i32::MAX as usize),
            chunk_vocab: cfg.chunk_vocab.min(shape.vocab),
            ignore: cfg.logprob.ignore_index.unwrap_or(0),
            has_ignore: cfg.logprob.ignore_index.is_some() as i32,
            inv_t: 1.0 / cfg.logprob.temperature,
        })
    }

    /// `(first row, row count)` of each row chunk.
    pub(super) fn row_chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.rows)
            .step_by(self.chunk_rows)
            .map(|r0| (r0, self.chunk_rows.min(self.rows - r0)))
    }

    /// `(chunk index, first column, column count)` of each vocabulary chunk.
    pub(super) fn col_chunks(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.vocab)
            .step_by(self.chunk_vocab)
            .enumerate()
            .map(|(c, c0)| (c, c0, self.chunk_vocab.min(self.vocab - c0)))
    }

    pub(super) fn num_col_chunks(&self) -> usize {
        self.vocab.div_ceil(self.chunk_vocab)
    }
}

/// `tile[rows, cols] = hidden[r0..r0 + rows] W[c0..c0 + cols]^T + b[c0..]`,
/// f32, from device addresses of the inputs.
#[allow(clippy::too_many_arguments)]
pub(super) fn logits_tile<T: GpuFloat>(
    gpu: &Gpu,
    op: &'static str,
    plan: &Plan,
    hidden_rows: u64,
    weight: u64,
    bias: Option<u64>,
    (rows, c0, cols): (usize, usize, usize),
    tile: u64,
) -> Result<()> {
    let size = std::mem::size_of::<T>() as u64;
    let h = plan.hidden;
    let w_cols = Mat::new::<T>(weight + (c0 * h) as u64 * size, cols, h);
    let c = Mat::new::<f32>(tile, rows, cols);
    gemm(
        gpu,
        op,
        c,
        0.0,
        (Mat::new::<T>(hidden_rows, rows, h), false),
        (w_cols, true),
    )?;
    if let Some(bias) = bias {
        let bias_cols = DevAddr::<T>::new(bias + c0 as u64 * size);
        // SAFETY: the tile holds `rows * cols` values, the bias (the
        // caller's, guarded) `c0 + cols`.
        unsafe {
            kernel::fused_add_bias::<T>(
                gpu,
                elementwise(gpu, rows * cols),
                DevAddr::new(tile),
                bias_cols,
                rows as i64,
                cols as i64,
            )
        }?;
    }
    Ok(())
}

/// [`crate::fused_linear_logprobs`] on the GPU, into caller-provided
/// buffers: per-row log-probs, optional entropies and log-sum-exps of
/// `softmax((h W^T + b) / T)`, one cuBLAS tile of logits at a time. A
/// target out of range, a non-finite logit or a non-finite target log-prob
/// is reported by [`Gpu::check`] (the row's outputs are NaN).
///
/// Errors (on the host): those of the CPU op's validation, output lengths,
/// dimensions past cuBLAS's 32-bit limits, cuBLAS not loadable.
pub fn fused_linear_logprobs_into<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    rows: &LinearRows<'_, T, I, Device>,
    cfg: &FusedLinearConfig,
    out: &mut LogProbsOut<'_>,
) -> Result<()> {
    let plan = Plan::new(OP, rows, cfg)?;
    let (n, chunks) = (plan.rows, plan.num_col_chunks());
    out.validate(OP, n, cfg.logprob.entropy)?;
    let stream = gpu.stream();
    let mut partials = gpu.alloc::<SoftmaxPartial>(n * chunks)?;
    let mut target_logits = gpu.alloc::<f32>(n)?;
    let mut tile = gpu.alloc::<f32>(plan.chunk_rows * plan.chunk_vocab)?;

    let (hidden, _h) = rows.hidden.device_ptr(stream);
    let (weight, _w) = rows.weight.device_ptr(stream);
    let bias_guard = rows.bias.as_ref().map(|b| b.device_ptr(stream));
    let bias = bias_guard.as_ref().map(|(p, _)| *p);
    let (tile_ptr, _t) = tile.device_ptr_mut(stream);
    let size = std::mem::size_of::<T>();
    let (vocab_i, chunks_i, entropy_i) = (plan.vocab as i64, chunks as i64, cfg.logprob.entropy as i32);
    let status = gpu.status();
    for (r0, r) in plan.row_chunks() {
        let hidden_rows = hidden + (r0 * plan.hidden * size) as u64;
        for (c, c0, cols) in plan.col_chunks() {
            logits_tile::<T>(gpu, OP, &plan, hidden_rows, weight, bias, (r, c0, cols), tile_ptr)?;
            // SAFETY: the tile holds `r * cols` values, `targets` and `mask`
            // `n` (validated), `partials` `n * chunks` and `target_logits`
            // `n` (allocated above); rows `r0..r0 + r` of `n`.
            unsafe {
                kernel::fused_tile_fwd::<I>(
                    gpu,
                    per_row(r, abi::LOGPROB_THREADS),
                    DevAddr::new(tile_ptr),
                    cols as i64,
                    c0 as i64,
                    vocab_i,
                    r0 as i64,
                    &rows.targets,
                    rows.mask.as_ref(),
                    plan.ignore,
                    plan.has_ignore,
                    plan.inv_t,
                    entropy_i,
                    c as i64,
                    chunks_i,
                    &mut partials,
                    &mut target_logits,
                )
            }?;
        }
    }

    // SAFETY: every buffer holds `n` rows (`partials` `n * chunks`), the
    // outputs validated above; the blocks cover the `n` rows.
    unsafe {
        kernel::fused_merge::<I>(
            gpu,
            warp_per_row(n),
            &target_logits,
            &rows.targets,
            rows.mask.as_ref(),
            n as i64,
            vocab_i,
            plan.ignore,
            plan.has_ignore,
            plan.inv_t,
            chunks_i,
            &partials,
            &mut out.logp,
            out.entropy.as_mut(),
            &mut out.lse,
            &*status,
        )
    }
}

/// [`fused_linear_logprobs_into`], allocating its outputs.
pub fn fused_linear_logprobs<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    rows: &LinearRows<'_, T, I, Device>,
    cfg: &FusedLinearConfig,
) -> Result<LogProbs<Device>> {
    let n = rows.rows();
    let (mut logp, mut lse) = (gpu.alloc::<f32>(n)?, gpu.alloc::<f32>(n)?);
    let mut entropy = if cfg.logprob.entropy {
        Some(gpu.alloc::<f32>(n)?)
    } else {
        None
    };
    let mut out = LogProbsOut {
        logp: logp.as_view_mut(),
        entropy: entropy.as_mut().map(|e| e.as_view_mut()),
        lse: lse.as_view_mut(),
    };
    fused_linear_logprobs_into(gpu, rows, cfg, &mut out)?;
    Ok(LogProbs { logp, entropy, lse })
}

/// Where [`fused_linear_logprobs_backward_into`] writes its gradients, in
/// the inputs' dtype.
pub struct LinearGradsOut<'a, T> {
    /// `[rows, H]`.
    pub hidden: CudaViewMut<'a, T>,
    /// `[V, H]`.
    pub weight: CudaViewMut<'a, T>,
    /// `[V]`; present exactly when the inputs have a bias.
    pub bias: Option<CudaViewMut<'a, T>>,
}

/// [`crate::fused_linear_logprobs_backward`] on the GPU, into
/// caller-provided buffers: `dh`, `dW` and `db`, recomputing each logits
/// tile. A row whose target is out of range, or whose saved values or
/// upstream gradients are not finite, is reported by [`Gpu::check`] and
/// poisons the gradients with NaN: its own `dh` row, and all of `dW` and
/// `db`, to which every row contributes (never a plausible value). The
/// finished gradients are then checked for non-finite values, as on the
/// CPU. One difference: `dz` is rounded to `T` before the GEMMs here, so a
/// row whose `dz` bound exceeds `T`'s range is refused (f16: 65504), where
/// the CPU, whose tiles stay f32, bounds it by f32's.
///
/// Errors (on the host): those of the CPU op's validation, output lengths,
/// dimensions past cuBLAS's 32-bit limits, cuBLAS not loadable.
pub fn fused_linear_logprobs_backward_into<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    rows: &LinearRows<'_, T, I, Device>,
    cfg: &FusedLinearConfig,
    saved: &LogProbSaved<'_, Device>,
    grads: &LogProbGrads<'_, Device>,
    out: &mut LinearGradsOut<'_, T>,
) -> Result<()> {
    let plan = Plan::new(OP_BWD, rows, cfg)?;
    grads.validate(OP_BWD, plan.rows, saved)?;
    let (h, rc, vc) = (plan.hidden, plan.chunk_rows, plan.chunk_vocab);
    check::len(OP_BWD, "dhidden (output)", plan.rows * h, out.hidden.len())?;
    check::len(OP_BWD, "dweight (output)", plan.vocab * h, out.weight.len())?;
    check::paired_len(
        OP_BWD,
        "dbias (output)",
        rows.bias.as_ref().map(|_| plan.vocab),
        out.bias.as_ref().map(|b| b.len()),
        "a dbias output buffer is given exactly when the inputs have a bias",
    )?;
    let stream = gpu.stream();
    let mut tile = gpu.alloc::<f32>(rc * vc)?;
    let mut d_tile = gpu.alloc::<T>(rc * vc)?;
    let mut hidden_active = gpu.alloc::<T>(rc * h)?;
    let mut d_hidden_acc = gpu.alloc::<f32>(rc * h)?;
    // The ones of db's GEMV, only with a bias.
    let mut ones = match rows.bias {
        Some(_) => Some(gpu.alloc::<T>(rc)?),
        None => None,
    };
    {
        let (hidden, _h) = rows.hidden.device_ptr(stream);
        let (weight, _w) = rows.weight.device_ptr(stream);
        let bias_guard = rows.bias.as_ref().map(|b| b.device_ptr(stream));
        let bias = bias_guard.as_ref().map(|(p, _)| *p);
        let (tile, _t) = tile.device_ptr_mut(stream);
        let (d_tile, _dt) = d_tile.device_ptr_mut(stream);
        let (active, _a) = hidden_active.device_ptr_mut(stream);
        let (acc, _acc) = d_hidden_acc.device_ptr_mut(stream);
        let ones_guard = ones.as_mut().map(|o| o.device_ptr_mut(stream));
        let ones = ones_guard.as_ref().map(|(p, _)| *p);
        let (d_hidden, _dh) = out.hidden.device_ptr_mut(stream);
        let (d_weight, _dw) = out.weight.device_ptr_mut(stream);
        let d_bias_guard = out.bias.as_mut().map(|b| b.device_ptr_mut(stream));
        let d_bias = d_bias_guard.as_ref().map(|(p, _)| *p);
        let size = std::mem::size_of::<T>() as u64;
        let offset = |rows: usize| rows as u64 * h as u64 * size;

        if let Some(ones) = ones {
            // SAFETY: `ones` holds `rc` elements.
            unsafe {
                kernel::fused_fill::<T>(gpu, elementwise(gpu, rc), DevAddr::new(ones), 1.0, rc as i64)
            }?;
        }

        let (vocab_i, h_i) = (plan.vocab as i64, h as i64);
        let status = gpu.status();
        for (chunk, (r0, r)) in plan.row_chunks().enumerate() {
            let r0_i = r0 as i64;
            // SAFETY: `hidden` holds `n * h` values and `targets`, `mask`
            // `n` (validated), `active` `rc * h >= r * h`; rows
            // `r0..r0 + r` of `n`.
            unsafe {
                kernel::fused_active_hidden::<T, I>(
                    gpu,
                    active_hidden_grid(r),
                    DevAddr::new(hidden),
                    DevAddr::new(active),
                    h_i,
                    r0_i,
                    &rows.targets,
                    rows.mask.as_ref(),
                    plan.ignore,
                    plan.has_ignore,
                )
            }?;

            let h_active = Mat::new::<T>(active, r, h);
            let acc_rows = Mat::new::<f32>(acc, r, h);
            let first_rows = if chunk == 0 { 0.0 } else { 1.0 };
            for (_, c0, cols) in plan.col_chunks() {
                logits_tile::<T>(gpu, OP_BWD, &plan, active, weight, bias, (r, c0, cols), tile)?;
                // SAFETY: `tile` and `d_tile` hold `rc * vc >= r * cols`
                // values, the rows' inputs, saved values and gradients `n`
                // (validated); rows `r0..r0 + r` of `n`.
                unsafe {
                    kernel::fused_tile_bwd::<T, I>(
                        gpu,
                        per_row(r, abi::LOGPROB_THREADS),
                        DevAddr::new(tile),
                        DevAddr::new(d_tile),
                        cols as i64,
                        c0 as i64,
                        vocab_i,
                        r0_i,
                        &rows.targets,
                        rows.mask.as_ref(),
                        plan.ignore,
                        plan.has_ignore,
                        plan.inv_t,
                        &saved.lse,
                        saved.entropy.as_ref(),
                        &grads.logp,
                        grads.entropy.as_ref(),
                        grads.lse.as_ref(),
                        &*status,
                    )
                }?;

                let dz = Mat::new::<T>(d_tile, r, cols);
                let w_cols = Mat::new::<T>(weight + offset(c0), cols, h);
                // dh[r, H] (+)= dz W_cols: f32, over the whole vocabulary.
                let first_cols = if c0 == 0 { 0.0 } else { 1.0 };
                gemm(gpu, OP_BWD, acc_rows, first_cols, (dz, false), (w_cols, false))?;
                // dW_cols (+)= dz^T h: one rounding per row chunk.
                let dw_cols = Mat::new::<T>(d_weight + offset(c0), cols, h);
                gemm(gpu, OP_BWD, dw_cols, first_rows, (dz, true), (h_active, false))?;
                // db_cols (+)= 1^T dz.
                if let (Some(db), Some(ones)) = (d_bias, ones) {
                    let db_cols = Mat::new::<T>(db + c0 as u64 * size, 1, cols);
                    let ones = Mat::new::<T>(ones, 1, r);
                    gemm(gpu, OP_BWD, db_cols, first_rows, (ones, false), (dz, false))?;
                }
            }
            let dst = DevAddr::<T>::new(d_hidden + offset(r0));
            // SAFETY: `acc` holds `rc * h >= r * h` values, `dh` rows
            // `r0..r0 + r` of `n` (validated above).
            unsafe {
                kernel::fused_cast::<T>(
                    gpu,
                    elementwise(gpu, r * h),
                    DevAddr::new(acc),
                    dst,
                    (r * h) as i64,
                )
            }?;
        }
        // The finished gradients, checked as the CPU checks them.
        let finished = [
            Some((d_hidden, plan.rows * h)),
            Some((d_weight, plan.vocab * h)),
            d_bias.map(|db| (db, plan.vocab)),
        ];
        for (ptr, n) in finished.into_iter().flatten() {
            // SAFETY: each gradient buffer holds `n` elements (validated above).
            unsafe {
                kernel::fused_check_finite::<T>(
                    gpu,
                    elementwise(gpu, n),
                    DevAddr::new(ptr),
                    n as i64,
                    &*status,
                )
            }?;
        }
    }
    Ok(())
}

/// [`fused_linear_logprobs_backward_into`], allocating its outputs.
pub fn fused_linear_logprobs_backward<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    rows: &LinearRows<'_, T, I, Device>,
    cfg: &FusedLinearConfig,
    saved: &LogProbSaved<'_, Device>,
    grads: &LogProbGrads<'_, Device>,
) -> Result<LinearGrads<T, Device>> {
    let shape = rows.validate(OP_BWD)?;
    // Every element is written: dh by the casts, dW and db by the first row
    // chunk's beta = 0 GEMMs.
    let mut hidden = gpu.alloc::<T>(shape.rows * shape.hidden)?;
    let mut weight = gpu.alloc::<T>(shape.vocab * shape.hidden)?;
    let mut bias = match rows.bias {
        Some(_) => Some(gpu.alloc::<T>(shape.vocab)?),
        None => None,
    };
    let mut out = LinearGradsOut {
        hidden: hidden.as_view_mut(),
        weight: weight.as_view_mut(),
        bias: bias.as_mut().map(|b| b.as_view_mut()),
    };
    fused_linear_logprobs_backward_into(gpu, rows, cfg, saved, grads, &mut out)?;
    Ok(LinearGrads { hidden, weight, bias })
}
