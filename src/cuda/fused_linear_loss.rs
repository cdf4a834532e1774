//! The fused LM-head + GRPO loss on the GPU: cuBLAS GEMMs by tile feeding
//! the kernels of `cuda/fused_linear_loss.cu`. Spec, math and validation are
//! those of [`crate::ops::fused_linear_loss`], and so are the loops: per row
//! chunk, GEMM 1 for every vocab chunk into the chunk's `[rows, V]` f32
//! logits (folded into softmax partials as each block lands), then the
//! rows' log-probs, token losses and `dL/dlogp`, then per vocab chunk `dz`
//! (in the inputs' dtype) and GEMMs 2 (`dh += dz W`, f32 accumulator) and 3
//! (`dW (+)= dz^T h`). Three GEMMs a tile, as on the CPU.
//!
//! **Not yet run on a GPU.** This launcher and its kernels are compiled
//! and checked by ptxas (`.ci/run`); `tests/cuda/fused_linear_loss.rs`
//! holds the parity test against the CPU op, ignored until a GPU machine
//! runs it (`--include-ignored`).
//!
//! **Workspace**, with `R = min(chunk_rows, N)`, `C = chunk_vocab`, `s`
//! the dtype's size: `4 R V` (the chunk's logits) + `s R C` (a dz block) +
//! `(4 + s) R H` (dh accumulator, active hidden rows) + `12 R ceil(V / C)`
//! (softmax partials) + `56 N + 8 S` (per-row values and statistics,
//! sequence counts). [`FusedLossConfig::chunk_rows`] bounds it: at
//! V = 151936, 1024 rows hold 622 MB of logits.
//!
//! **Faults** are reported through [`Gpu::check`] as the other kernels
//! report them (`fused_linear_policy_loss` in [`crate::Error::Device`]): a
//! target out of range, a non-finite logit, log-prob, input at an active
//! row, token loss or gradient, bad `cu_seqlens`; the rows concerned get
//! NaN, and so do `dW` and `db`, to which every row contributes.

use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut};

use super::abi::{self, DevAddr, FusedLossRowParams, PolicyLossPartial, SoftmaxPartial};
use super::fused_linear::{
    self, active_hidden_grid, elementwise, gemm, logits_tile, per_row, warp_per_row, Mat, Plan,
};
use super::{grid_x, ptx, Addresses, Device, Gpu, GpuFloat, GpuId, KernelFile};
use crate::error::{check, Result};
use crate::ops::fused_linear_loss::{FusedLossConfig, LinearLossInputs, OP};
use crate::ops::layout::SeqLayout;
use crate::ops::policy_loss::{Advantage, PolicyLossStats};

const FILE: KernelFile = KernelFile {
    name: "fused_linear_loss",
    ptx: ptx::FUSED_LINEAR_LOSS,
};

abi::kernels! {
    file: FILE;
    /// Raises NON_FINITE at the first non-finite `x[i]`, `i < n`, unless the
    /// op already raised; grid-stride, any grid and block.
    fn fll_check_finite<T: GpuFloat>(x: In<T>, n: i64, status: Status);
    /// Each sequence's masked-in token count into `counts` (`[seqs]`) and
    /// each row's sequence into `seq_of` (`[rows]`): one block of
    /// `FUSED_LOSS_THREADS` per sequence (grid = `seqs`). `targets`, `mask`:
    /// `[rows]`; `cu_seqlens`: `[seqs + 1]`, or null for padded sequences
    /// of `seq_len` (`seqs * seq_len = rows`).
    fn fll_counts<I: GpuId>(
        targets: In<I>,
        mask: Opt<In<u8>>,
        ignore_index: i64,
        has_ignore: i32,
        cu_seqlens: Opt<In<u32>>,
        seq_len: i64,
        seqs: i64,
        rows: i64,
        counts: Out<f32>,
        seq_of: Out<i32>,
        status: Status,
    ) threads(abi::FUSED_LOSS_THREADS);
    /// `total[0]` = the sum of `counts` (`[seqs]`), in a fixed order: one
    /// block of `FUSED_LOSS_THREADS`.
    fn fll_total(counts: In<f32>, seqs: i64, total: Out<f32>) threads(abi::FUSED_LOSS_THREADS);
    /// The loss and statistics (`summary`: `[SUMMARY_LEN]`) from the
    /// per-row statistics (`stats`: `[rows]`) and the token total
    /// (`total`: `[1]`): one block of `FUSED_LOSS_THREADS`.
    fn fll_summary(stats: In<PolicyLossPartial>, rows: i64, total: In<f32>, summary: Out<f32>, status: Status) threads(abi::FUSED_LOSS_THREADS);
    /// Folds the chunk's logits block (`[grid, cols]`, columns `col0..` of
    /// `vocab`, rows `row0..` of the batch) into per-row softmax states:
    /// one block of `LOGPROB_THREADS` per chunk row. `targets`, `mask`:
    /// the batch's; `partials`: `[grid * chunks]` by chunk row, this vocab
    /// chunk's at `chunk`; `target_logits`: `[rows]` of the batch, the
    /// row's target logit where it lies in the block.
    fn fll_tile_fwd<I: GpuId>(
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
    /// Rows `row0..row0 + n` of the batch: each row's `chunks` softmax
    /// states (`partials`: `[n * chunks]`) folded into its log-prob, then
    /// its token loss, `dL/dlogp` into `coef` and its statistics into
    /// `stats`: one warp per row, any number of whole warps per block,
    /// blocks covering `n`. `p`'s inputs, `target_logits`, `targets`,
    /// `mask` and the outputs: `[p.rows]` (`p.adv_seq`, `p.counts`:
    /// `[p.seqs]`; `p.total`: `[1]`).
    fn fll_rows<I: GpuId>(
        p: FusedLossRowParams,
        target_logits: In<f32>,
        targets: In<I>,
        mask: Opt<In<u8>>,
        ignore_index: i64,
        has_ignore: i32,
        row0: i64,
        n: i64,
        chunks: i64,
        partials: In<SoftmaxPartial>,
        logp: Out<f32>,
        entropy: Opt<Out<f32>>,
        lse: Out<f32>,
        per_token: Out<f32>,
        coef: Out<f32>,
        stats: Out<PolicyLossPartial>,
        status: Status,
    );
    /// `dz` (`dtile`, `[grid, cols]` in `T`) of the chunk's logits block
    /// (`tile`, as in `fll_tile_fwd`) from `lse` and `coef` (`[rows]` of
    /// the batch, read at `row0..`): one block of `LOGPROB_THREADS` per
    /// chunk row.
    fn fll_tile_dz<T: GpuFloat, I: GpuId>(
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
        coef: In<f32>,
    ) threads(abi::LOGPROB_THREADS);
}

/// Where [`fused_linear_policy_loss_into`] writes, on the device: the
/// buffers of the CPU op's [`crate::LinearLossOut`].
pub struct LinearLossOut<'a, T> {
    /// `[N]` log-probs.
    pub logp: CudaViewMut<'a, f32>,
    /// `[N]` entropies, exactly when `cfg.logprob.entropy`.
    pub entropy: Option<CudaViewMut<'a, f32>>,
    /// `[N]` per-token losses.
    pub per_token: CudaViewMut<'a, f32>,
    /// `[PolicyLossStats::SUMMARY_LEN]` loss and statistics.
    pub summary: CudaViewMut<'a, f32>,
    /// `[N, H]`.
    pub dhidden: CudaViewMut<'a, T>,
    /// `[V, H]`.
    pub dweight: CudaViewMut<'a, T>,
    /// `[V]`, exactly when the inputs have a bias.
    pub dbias: Option<CudaViewMut<'a, T>>,
}

/// [`crate::fused_linear_policy_loss`] on the GPU, into caller-provided
/// buffers. Asynchronous: data faults are reported by [`Gpu::check`].
///
/// Errors (on the host): those of the CPU op's validation (GSPO refused
/// included), output lengths, dimensions past cuBLAS's 32-bit limits,
/// cuBLAS not loadable.
pub fn fused_linear_policy_loss_into<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    inputs: &LinearLossInputs<'_, T, I, Device>,
    cfg: &FusedLossConfig,
    out: &mut LinearLossOut<'_, T>,
) -> Result<()> {
    let (shape, seqs) = inputs.validate(OP, cfg)?;
    let rows = &inputs.rows;
    let plan = Plan::new(OP, rows, &cfg.linear())?;
    let (n, h, v) = (shape.rows, shape.hidden, shape.vocab);
    check::len(OP, "logp (output)", n, out.logp.len())?;
    check::len(OP, "per_token (output)", n, out.per_token.len())?;
    check::len(
        OP,
        "summary (output)",
        PolicyLossStats::SUMMARY_LEN,
        out.summary.len(),
    )?;
    check::len(OP, "dhidden (output)", n * h, out.dhidden.len())?;
    check::len(OP, "dweight (output)", v * h, out.dweight.len())?;
    check::paired_len(
        OP,
        "entropy (output)",
        cfg.logprob.entropy.then_some(n),
        out.entropy.as_ref().map(|e| e.len()),
        "an entropy output buffer is given exactly when `logprob.entropy` is set",
    )?;
    check::paired_len(
        OP,
        "dbias (output)",
        rows.bias.as_ref().map(|_| v),
        out.dbias.as_ref().map(|b| b.len()),
        "a dbias output buffer is given exactly when the inputs have a bias",
    )?;
    grid_x(OP, "sequences", seqs)?;
    let (rc, vc, chunks) = (plan.chunk_rows, plan.chunk_vocab, plan.num_col_chunks());
    let stream = gpu.stream();
    let mut logits = gpu.alloc::<f32>(rc * v)?;
    let mut d_tile = gpu.alloc::<T>(rc * vc)?;
    let mut hidden_active = gpu.alloc::<T>(rc * h)?;
    let mut d_hidden_acc = gpu.alloc::<f32>(rc * h)?;
    let mut partials = gpu.alloc::<SoftmaxPartial>(rc * chunks)?;
    let mut target_logits = gpu.alloc::<f32>(n)?;
    let mut lse = gpu.alloc::<f32>(n)?;
    let mut coef = gpu.alloc::<f32>(n)?;
    let mut row_stats = gpu.alloc::<PolicyLossPartial>(n)?;
    let mut counts = gpu.alloc::<f32>(seqs)?;
    let mut total = gpu.alloc::<f32>(1)?;
    let mut seq_of = gpu.alloc::<i32>(n)?;
    let mut ones = match rows.bias {
        Some(_) => Some(gpu.alloc::<T>(rc)?),
        None => None,
    };
    let status = gpu.status();
    let (ignore, has_ignore, inv_t) = (plan.ignore, plan.has_ignore, plan.inv_t);
    let (n_i, v_i, h_i, seqs_i, chunks_i) = (n as i64, v as i64, h as i64, seqs as i64, chunks as i64);

    // Sequence counts, then their total: every row's weight, before the pass.
    let (cu_seqlens, seq_len) = match &inputs.layout {
        SeqLayout::Padded { seq_len, .. } => (None, *seq_len as i64),
        SeqLayout::Packed { cu_seqlens } => (Some(cu_seqlens), 0),
    };
    // SAFETY: `targets` and `mask` hold `n` rows and `cu_seqlens` `seqs + 1`
    // offsets, or the padded layout `seqs * seq_len = n` rows (validated
    // above); `counts` holds `seqs`, `seq_of` `n` (allocated above); one
    // block of FUSED_LOSS_THREADS per sequence (`seqs` fits a grid).
    unsafe {
        kernel::fll_counts::<I>(
            gpu,
            per_row(seqs, abi::FUSED_LOSS_THREADS),
            &rows.targets,
            rows.mask.as_ref(),
            ignore,
            has_ignore,
            cu_seqlens,
            seq_len,
            seqs_i,
            n_i,
            &mut counts,
            &mut seq_of,
            &*status,
        )
    }?;
    // SAFETY: `counts` holds `seqs`, `total` one (allocated above); one
    // block of FUSED_LOSS_THREADS.
    unsafe {
        kernel::fll_total(
            gpu,
            per_row(1, abi::FUSED_LOSS_THREADS),
            &counts,
            seqs_i,
            &mut total,
        )
    }?;

    let mut at = Addresses::new(stream);
    let old_logp = at.opt(inputs.old_logp.as_ref());
    let ref_logp = at.opt(inputs.ref_logp.as_ref());
    let (adv_seq, adv_tok) = match &inputs.advantages {
        Advantage::PerSequence(a) => (at.of(a), 0),
        Advantage::PerToken(a) => (0, at.of(a)),
    };
    let (aggregation, agg_constant) = cfg.loss.aggregation.kernel_params();
    let (counts_ptr, _c) = counts.device_ptr(stream);
    let (total_ptr, _t) = total.device_ptr(stream);
    let (seq_of_ptr, _s) = seq_of.device_ptr(stream);
    let params = FusedLossRowParams {
        old_logp,
        ref_logp,
        adv_seq,
        adv_tok,
        counts: counts_ptr,
        total: total_ptr,
        seq_of: seq_of_ptr,
        rows: n_i,
        vocab: v_i,
        seqs: seqs_i,
        inv_t,
        eps_low: cfg.loss.eps_low,
        eps_high: cfg.loss.eps_high,
        dual_clip: cfg.loss.dual_clip.unwrap_or(0.0),
        log_ratio_clamp: cfg.loss.log_ratio_clamp,
        beta: cfg.loss.beta,
        agg_constant,
        kl_kind: cfg.loss.kl.kind(),
        aggregation,
    };

    // Buffers that the GEMMs read or write, or that kernels use at an
    // offset, by address (their guards held to the end).
    let (weight, _w) = rows.weight.device_ptr(stream);
    let bias_guard = rows.bias.as_ref().map(|b| b.device_ptr(stream));
    let bias = bias_guard.as_ref().map(|(p, _)| *p);
    let (logits_ptr, _l) = logits.device_ptr_mut(stream);
    let (d_tile_ptr, _dt) = d_tile.device_ptr_mut(stream);
    let (active, _a) = hidden_active.device_ptr_mut(stream);
    let (acc, _acc) = d_hidden_acc.device_ptr_mut(stream);
    let ones_guard = ones.as_mut().map(|o| o.device_ptr_mut(stream));
    let ones = ones_guard.as_ref().map(|(p, _)| *p);
    let (d_hidden, _dh) = out.dhidden.device_ptr_mut(stream);
    let (d_weight, _dw) = out.dweight.device_ptr_mut(stream);
    let d_bias_guard = out.dbias.as_mut().map(|b| b.device_ptr_mut(stream));
    let d_bias = d_bias_guard.as_ref().map(|(p, _)| *p);
    let size = std::mem::size_of::<T>() as u64;
    let offset = |rows: usize| rows as u64 * h as u64 * size;

    if let Some(ones) = ones {
        // SAFETY: `ones` holds `rc` elements.
        unsafe {
            fused_linear::kernel::fused_fill::<T>(
                gpu,
                elementwise(gpu, rc),
                DevAddr::new(ones),
                1.0,
                rc as i64,
            )
        }?;
    }
    let entropy_i = cfg.logprob.entropy as i32;

    for (chunk, (r0, r)) in plan.row_chunks().enumerate() {
        let r0_i = r0 as i64;
        // Hidden rows with skipped rows zeroed (a NaN there times a zero dz is NaN).
        // SAFETY: `hidden` holds `n * h` values and `targets`, `mask` `n`
        // (validated), `active` `rc * h >= r * h`; rows `r0..r0 + r` of `n`.
        unsafe {
            fused_linear::kernel::fused_active_hidden::<T, I>(
                gpu,
                active_hidden_grid(r),
                &rows.hidden,
                DevAddr::new(active),
                h_i,
                r0_i,
                &rows.targets,
                rows.mask.as_ref(),
                ignore,
                has_ignore,
            )
        }?;

        // 1. GEMM 1 per vocab chunk into the chunk's logits, folded as it lands.
        for (c, c0, cols) in plan.col_chunks() {
            let block = logits_ptr + 4 * (r * c0) as u64;
            logits_tile::<T>(gpu, OP, &plan, active, weight, bias, (r, c0, cols), block)?;
            // SAFETY: the block holds `r * cols` values of `logits` (`rc * v`),
            // `targets` and `mask` `n` (validated), `partials` `rc * chunks`
            // and `target_logits` `n` (allocated above); rows `r0..r0 + r`
            // of `n`, `c < chunks`.
            unsafe {
                kernel::fll_tile_fwd::<I>(
                    gpu,
                    per_row(r, abi::LOGPROB_THREADS),
                    DevAddr::new(block),
                    cols as i64,
                    c0 as i64,
                    v_i,
                    r0_i,
                    &rows.targets,
                    rows.mask.as_ref(),
                    ignore,
                    has_ignore,
                    inv_t,
                    entropy_i,
                    c as i64,
                    chunks_i,
                    &mut partials,
                    &mut target_logits,
                )
            }?;
        }

        // 2. The rows' log-probs, token losses and dL/dlogp.
        // SAFETY: `params`' buffers hold what it says (the inputs validated
        // above, their guards and `counts`', `total`'s and `seq_of`'s held
        // to the end); `partials` holds `rc * chunks >= r * chunks`, the
        // outputs and `target_logits`, `lse`, `coef`, `row_stats` `n`
        // (validated or allocated above); rows `r0..r0 + r` of `n`, one
        // warp each.
        unsafe {
            kernel::fll_rows::<I>(
                gpu,
                warp_per_row(r),
                params,
                &target_logits,
                &rows.targets,
                rows.mask.as_ref(),
                ignore,
                has_ignore,
                r0_i,
                r as i64,
                chunks_i,
                &partials,
                &mut out.logp,
                out.entropy.as_mut(),
                &mut lse,
                &mut out.per_token,
                &mut coef,
                &mut row_stats,
                &*status,
            )
        }?;

        // 3. dz per vocab chunk, then GEMMs 2 and 3 (and db's GEMV).
        let h_active = Mat::new::<T>(active, r, h);
        let acc_rows = Mat::new::<f32>(acc, r, h);
        let first_rows = if chunk == 0 { 0.0 } else { 1.0 };
        for (_, c0, cols) in plan.col_chunks() {
            let block = logits_ptr + 4 * (r * c0) as u64;
            // SAFETY: the block holds `r * cols` values of `logits` and
            // `d_tile` `rc * vc >= r * cols`, `targets` and `mask` `n`
            // (validated), `lse` and `coef` `n`; rows `r0..r0 + r` of `n`.
            unsafe {
                kernel::fll_tile_dz::<T, I>(
                    gpu,
                    per_row(r, abi::LOGPROB_THREADS),
                    DevAddr::new(block),
                    DevAddr::new(d_tile_ptr),
                    cols as i64,
                    c0 as i64,
                    v_i,
                    r0_i,
                    &rows.targets,
                    rows.mask.as_ref(),
                    ignore,
                    has_ignore,
                    inv_t,
                    &lse,
                    &coef,
                )
            }?;
            let dz = Mat::new::<T>(d_tile_ptr, r, cols);
            let w_cols = Mat::new::<T>(weight + offset(c0), cols, h);
            let first_cols = if c0 == 0 { 0.0 } else { 1.0 };
            gemm(gpu, OP, acc_rows, first_cols, (dz, false), (w_cols, false))?;
            let dw_cols = Mat::new::<T>(d_weight + offset(c0), cols, h);
            gemm(gpu, OP, dw_cols, first_rows, (dz, true), (h_active, false))?;
            if let (Some(db), Some(ones)) = (d_bias, ones) {
                let db_cols = Mat::new::<T>(db + c0 as u64 * size, 1, cols);
                let ones = Mat::new::<T>(ones, 1, r);
                gemm(gpu, OP, db_cols, first_rows, (ones, false), (dz, false))?;
            }
        }
        // SAFETY: `acc` holds `rc * h >= r * h` values, `dhidden` rows
        // `r0..r0 + r` of `n` (validated above).
        unsafe {
            fused_linear::kernel::fused_cast::<T>(
                gpu,
                elementwise(gpu, r * h),
                DevAddr::new(acc),
                DevAddr::<T>::new(d_hidden + offset(r0)),
                (r * h) as i64,
            )
        }?;
    }

    // The loss and statistics, then the finished gradients checked.
    // SAFETY: `row_stats` holds `n`, `total` one, `summary` SUMMARY_LEN
    // (validated above); one block of FUSED_LOSS_THREADS.
    unsafe {
        kernel::fll_summary(
            gpu,
            per_row(1, abi::FUSED_LOSS_THREADS),
            &row_stats,
            n_i,
            &total,
            &mut out.summary,
            &*status,
        )
    }?;
    let finished = [
        Some((d_hidden, n * h)),
        Some((d_weight, v * h)),
        d_bias.map(|db| (db, v)),
    ];
    for (ptr, len) in finished.into_iter().flatten() {
        // SAFETY: each gradient buffer holds `len` elements (validated above).
        unsafe {
            kernel::fll_check_finite::<T>(
                gpu,
                elementwise(gpu, len),
                DevAddr::new(ptr),
                len as i64,
                &*status,
            )
        }?;
    }
    Ok(())
}

/// The outputs of [`fused_linear_policy_loss`] on the device.
pub struct LinearLossDevice<T> {
    /// `[N]` log-probs.
    pub logp: CudaSlice<f32>,
    /// `[N]` entropies, when asked for.
    pub entropy: Option<CudaSlice<f32>>,
    /// `[N]` per-token losses.
    pub per_token: CudaSlice<f32>,
    /// `[PolicyLossStats::SUMMARY_LEN]` loss and statistics.
    pub summary: CudaSlice<f32>,
    /// `[N, H]`, `[V, H]`, `[V]`: gradients of the loss.
    pub grads: crate::ops::fused_linear::LinearGrads<T, Device>,
}

/// [`fused_linear_policy_loss_into`], allocating its outputs.
pub fn fused_linear_policy_loss<T: GpuFloat, I: GpuId>(
    gpu: &Gpu,
    inputs: &LinearLossInputs<'_, T, I, Device>,
    cfg: &FusedLossConfig,
) -> Result<LinearLossDevice<T>> {
    let (shape, _) = inputs.validate(OP, cfg)?;
    let (n, h, v) = (shape.rows, shape.hidden, shape.vocab);
    let mut logp = gpu.alloc::<f32>(n)?;
    let mut entropy = if cfg.logprob.entropy {
        Some(gpu.alloc::<f32>(n)?)
    } else {
        None
    };
    let mut per_token = gpu.alloc::<f32>(n)?;
    let mut summary = gpu.alloc::<f32>(PolicyLossStats::SUMMARY_LEN)?;
    let mut hidden = gpu.alloc::<T>(n * h)?;
    let mut weight = gpu.alloc::<T>(v * h)?;
    let mut bias = match inputs.rows.bias {
        Some(_) => Some(gpu.alloc::<T>(v)?),
        None => None,
    };
    fused_linear_policy_loss_into(
        gpu,
        inputs,
        cfg,
        &mut LinearLossOut {
            logp: logp.as_view_mut(),
            entropy: entropy.as_mut().map(|e| e.as_view_mut()),
            per_token: per_token.as_view_mut(),
            summary: summary.as_view_mut(),
            dhidden: hidden.as_view_mut(),
            dweight: weight.as_view_mut(),
            dbias: bias.as_mut().map(|b| b.as_view_mut()),
        },
    )?;
    Ok(LinearLossDevice {
        logp,
        entropy,
        per_token,
        summary,
        grads: crate::ops::fused_linear::LinearGrads { hidden, weight, bias },
    })
}
