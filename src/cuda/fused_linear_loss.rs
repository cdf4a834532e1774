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

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};

use super::fused_linear::{
    elementwise, gemm, logits_tile, per_row, Mat, Plan, FILE as LINEAR_FILE, MERGE_ROWS_PER_BLOCK, THREADS,
    TILE_THREADS,
};
use super::{launched, ptx, Device, Gpu, GpuFloat, GpuId, KernelFile, LaunchExt};
use crate::error::{check, Error, Result};
use crate::ops::fused_linear_loss::{FusedLossConfig, LinearLossInputs, OP};
use crate::ops::layout::SeqLayout;
use crate::ops::policy_loss::{Advantage, Aggregation, PolicyLossStats};

const FILE: KernelFile = KernelFile {
    name: "fused_linear_loss",
    ptx: ptx::FUSED_LINEAR_LOSS,
};
/// Floats in a per-row statistics record (`RowStats` in the .cu).
const ROW_STATS_FLOATS: usize = 8;

/// `RowParams` of `cuda/fused_linear_loss.cu`, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct RowParams {
    old_logp: u64,
    ref_logp: u64,
    adv_seq: u64,
    adv_tok: u64,
    counts: u64,
    total: u64,
    seq_of: u64,
    rows: i64,
    vocab: i64,
    seqs: i64,
    inv_t: f32,
    eps_low: f32,
    eps_high: f32,
    dual_clip: f32,
    log_ratio_clamp: f32,
    beta: f32,
    agg_constant: f32,
    kl_kind: i32,
    aggregation: i32,
}

// The .cu asserts the same size.
const _: () = assert!(std::mem::size_of::<RowParams>() == 120);

// SAFETY: plain old data with the C layout of the kernel's `RowParams`.
unsafe impl DeviceRepr for RowParams {}

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

fn ptr_of<'a, T>(
    stream: &'a CudaStream,
    v: Option<&'a CudaView<'_, T>>,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> u64 {
    match v {
        Some(v) => {
            let (p, g) = v.device_ptr(stream);
            guards.push(g);
            p
        }
        None => 0,
    }
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
    match (&out.entropy, cfg.logprob.entropy) {
        (Some(e), true) => check::len(OP, "entropy (output)", n, e.len())?,
        (None, false) => {}
        _ => {
            return Err(Error::Unsupported {
                op: OP,
                reason: "an entropy output buffer is given exactly when `logprob.entropy` is set".into(),
            })
        }
    }
    match (&rows.bias, &out.dbias) {
        (Some(_), Some(db)) => check::len(OP, "dbias (output)", v, db.len())?,
        (None, None) => {}
        _ => {
            return Err(Error::Unsupported {
                op: OP,
                reason: "a dbias output buffer is given exactly when the inputs have a bias".into(),
            })
        }
    }
    if seqs > i32::MAX as usize {
        return Err(Error::Unsupported {
            op: OP,
            reason: format!("{seqs} sequences exceed a CUDA grid (2^31 - 1)"),
        });
    }
    let (rc, vc, chunks) = (plan.chunk_rows, plan.chunk_vocab, plan.num_col_chunks());
    let stream = gpu.stream();
    let mut logits = gpu.alloc::<f32>(rc * v)?;
    let mut d_tile = gpu.alloc::<T>(rc * vc)?;
    let mut hidden_active = gpu.alloc::<T>(rc * h)?;
    let mut d_hidden_acc = gpu.alloc::<f32>(rc * h)?;
    let mut partials = gpu.alloc::<[f32; 3]>(rc * chunks)?;
    let mut target_logits = gpu.alloc::<f32>(n)?;
    let mut lse = gpu.alloc::<f32>(n)?;
    let mut coef = gpu.alloc::<f32>(n)?;
    let mut row_stats = gpu.alloc::<[f32; ROW_STATS_FLOATS]>(n)?;
    let mut counts = gpu.alloc::<f32>(seqs)?;
    let mut total = gpu.alloc::<f32>(1)?;
    let mut seq_of = gpu.alloc::<i32>(n)?;
    let mut ones = match rows.bias {
        Some(_) => Some(gpu.alloc::<T>(rc)?),
        None => None,
    };
    let status = gpu.status();
    let dtype = T::DTYPE.name();
    let (ignore, has_ignore, inv_t) = (plan.ignore, plan.has_ignore, plan.inv_t);
    let (n_i, v_i, h_i, seqs_i, chunks_i) = (n as i64, v as i64, h as i64, seqs as i64, chunks as i64);

    // Sequence counts, then their total: every row's weight, before the pass.
    {
        let name = format!("fll_counts_{}", I::NAME);
        let f = gpu.function(FILE, &name)?;
        let (cu, seq_len) = match &inputs.layout {
            SeqLayout::Padded { seq_len, .. } => (None, *seq_len as i64),
            SeqLayout::Packed { cu_seqlens } => (Some(cu_seqlens), 0),
        };
        let cu_ptr = cu.map(|c| c.device_ptr(stream));
        let cu_arg = cu_ptr.as_ref().map_or(0u64, |(p, _)| *p);
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(&rows.targets)
            .opt(&rows.mask)
            .arg(&ignore)
            .arg(&has_ignore)
            .arg(&cu_arg)
            .arg(&seq_len)
            .arg(&seqs_i)
            .arg(&n_i)
            .arg(&mut counts)
            .arg(&mut seq_of)
            .arg(&*status);
        let grid = LaunchConfig {
            grid_dim: (seqs as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launched(unsafe { launch.launch(grid) }.map(drop), &name)?;
        let f = gpu.function(FILE, "fll_total")?;
        let mut launch = stream.launch_builder(&f);
        launch.arg(&counts).arg(&seqs_i).arg(&mut total);
        launched(
            unsafe { launch.launch(per_row(1, THREADS)) }.map(drop),
            "fll_total",
        )?;
    }

    let mut guards = Vec::new();
    let old_logp = ptr_of(stream, inputs.old_logp.as_ref(), &mut guards);
    let ref_logp = ptr_of(stream, inputs.ref_logp.as_ref(), &mut guards);
    let (adv_seq, adv_tok) = match &inputs.advantages {
        Advantage::PerSequence(a) => (ptr_of(stream, Some(a), &mut guards), 0),
        Advantage::PerToken(a) => (0, ptr_of(stream, Some(a), &mut guards)),
    };
    let (aggregation, agg_constant) = match cfg.loss.aggregation {
        Aggregation::TokenMean { normalizer } => (0, normalizer.unwrap_or(0.0)),
        Aggregation::SeqMeanTokenMean => (1, 0.0),
        Aggregation::SeqMeanTokenSum => (2, 0.0),
        Aggregation::SeqMeanTokenSumNorm { constant } => (3, constant),
    };
    let (counts_ptr, _c) = counts.device_ptr(stream);
    let (total_ptr, _t) = total.device_ptr(stream);
    let (seq_of_ptr, _s) = seq_of.device_ptr(stream);
    let params = RowParams {
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

    let (hidden, _h) = rows.hidden.device_ptr(stream);
    let (weight, _w) = rows.weight.device_ptr(stream);
    let bias_guard = rows.bias.as_ref().map(|b| b.device_ptr(stream));
    let bias = bias_guard.as_ref().map(|(p, _)| *p);
    let (logits_ptr, _l) = logits.device_ptr_mut(stream);
    let (d_tile_ptr, _dt) = d_tile.device_ptr_mut(stream);
    let (active, _a) = hidden_active.device_ptr_mut(stream);
    let (acc, _acc) = d_hidden_acc.device_ptr_mut(stream);
    let (partials_ptr, _p) = partials.device_ptr_mut(stream);
    let (target_ptr, _tl) = target_logits.device_ptr_mut(stream);
    let (lse_ptr, _lse) = lse.device_ptr_mut(stream);
    let (coef_ptr, _coef) = coef.device_ptr_mut(stream);
    let (stats_ptr, _st) = row_stats.device_ptr_mut(stream);
    let ones_guard = ones.as_mut().map(|o| o.device_ptr_mut(stream));
    let ones = ones_guard.as_ref().map(|(p, _)| *p);
    let (logp_ptr, _lp) = out.logp.device_ptr_mut(stream);
    let entropy_guard = out.entropy.as_mut().map(|e| e.device_ptr_mut(stream));
    let entropy_ptr = entropy_guard.as_ref().map_or(0u64, |(p, _)| *p);
    let (per_token_ptr, _pt) = out.per_token.device_ptr_mut(stream);
    let (summary_ptr, _sum) = out.summary.device_ptr_mut(stream);
    let (d_hidden, _dh) = out.dhidden.device_ptr_mut(stream);
    let (d_weight, _dw) = out.dweight.device_ptr_mut(stream);
    let d_bias_guard = out.dbias.as_mut().map(|b| b.device_ptr_mut(stream));
    let d_bias = d_bias_guard.as_ref().map(|(p, _)| *p);
    let size = std::mem::size_of::<T>() as u64;
    let offset = |rows: usize| rows as u64 * h as u64 * size;

    if let Some(ones) = ones {
        let name = format!("fused_fill_{dtype}");
        let f = gpu.function(LINEAR_FILE, &name)?;
        let (one, rc_i) = (1.0f32, rc as i64);
        let mut launch = stream.launch_builder(&f);
        launch.arg(&ones).arg(&one).arg(&rc_i);
        launched(unsafe { launch.launch(elementwise(gpu, rc)) }.map(drop), &name)?;
    }
    let active_name = format!("fused_active_hidden_{dtype}_{}", I::NAME);
    let active_fn = gpu.function(LINEAR_FILE, &active_name)?;
    let cast_name = format!("fused_cast_{dtype}");
    let cast_fn = gpu.function(LINEAR_FILE, &cast_name)?;
    let fwd_name = format!("fll_tile_fwd_{}", I::NAME);
    let fwd_fn = gpu.function(FILE, &fwd_name)?;
    let rows_name = format!("fll_rows_{}", I::NAME);
    let rows_fn = gpu.function(FILE, &rows_name)?;
    let dz_name = format!("fll_tile_dz_{dtype}_{}", I::NAME);
    let dz_fn = gpu.function(FILE, &dz_name)?;
    let entropy_i = cfg.logprob.entropy as i32;

    for (chunk, (r0, r)) in plan.row_chunks().enumerate() {
        let r0_i = r0 as i64;
        // Hidden rows with skipped rows zeroed (a NaN there times a zero dz is NaN).
        let mut launch = stream.launch_builder(&active_fn);
        launch
            .arg(&hidden)
            .arg(&active)
            .arg(&h_i)
            .arg(&r0_i)
            .arg(&rows.targets)
            .opt(&rows.mask)
            .arg(&ignore)
            .arg(&has_ignore);
        launched(
            unsafe { launch.launch(per_row(r, THREADS)) }.map(drop),
            &active_name,
        )?;

        // 1. GEMM 1 per vocab chunk into the chunk's logits, folded as it lands.
        for (c, c0, cols) in plan.col_chunks() {
            let block = logits_ptr + 4 * (r * c0) as u64;
            logits_tile::<T>(gpu, OP, &plan, active, weight, bias, (r, c0, cols), block)?;
            let (cols_i, c0_i, c_i) = (cols as i64, c0 as i64, c as i64);
            let mut launch = stream.launch_builder(&fwd_fn);
            launch
                .arg(&block)
                .arg(&cols_i)
                .arg(&c0_i)
                .arg(&v_i)
                .arg(&r0_i)
                .arg(&rows.targets)
                .opt(&rows.mask)
                .arg(&ignore)
                .arg(&has_ignore)
                .arg(&inv_t)
                .arg(&entropy_i)
                .arg(&c_i)
                .arg(&chunks_i)
                .arg(&partials_ptr)
                .arg(&target_ptr);
            launched(
                unsafe { launch.launch(per_row(r, TILE_THREADS)) }.map(drop),
                &fwd_name,
            )?;
        }

        // 2. The rows' log-probs, token losses and dL/dlogp.
        let r_i = r as i64;
        let mut launch = stream.launch_builder(&rows_fn);
        launch
            .arg(&params)
            .arg(&target_ptr)
            .arg(&rows.targets)
            .opt(&rows.mask)
            .arg(&ignore)
            .arg(&has_ignore)
            .arg(&r0_i)
            .arg(&r_i)
            .arg(&chunks_i)
            .arg(&partials_ptr)
            .arg(&logp_ptr)
            .arg(&entropy_ptr)
            .arg(&lse_ptr)
            .arg(&per_token_ptr)
            .arg(&coef_ptr)
            .arg(&stats_ptr)
            .arg(&*status);
        let grid = LaunchConfig {
            grid_dim: ((r as u32).div_ceil(MERGE_ROWS_PER_BLOCK), 1, 1),
            block_dim: (32 * MERGE_ROWS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launched(unsafe { launch.launch(grid) }.map(drop), &rows_name)?;

        // 3. dz per vocab chunk, then GEMMs 2 and 3 (and db's GEMV).
        let h_active = Mat::new::<T>(active, r, h);
        let acc_rows = Mat::new::<f32>(acc, r, h);
        let first_rows = if chunk == 0 { 0.0 } else { 1.0 };
        for (_, c0, cols) in plan.col_chunks() {
            let block = logits_ptr + 4 * (r * c0) as u64;
            let (cols_i, c0_i) = (cols as i64, c0 as i64);
            let mut launch = stream.launch_builder(&dz_fn);
            launch
                .arg(&block)
                .arg(&d_tile_ptr)
                .arg(&cols_i)
                .arg(&c0_i)
                .arg(&v_i)
                .arg(&r0_i)
                .arg(&rows.targets)
                .opt(&rows.mask)
                .arg(&ignore)
                .arg(&has_ignore)
                .arg(&inv_t)
                .arg(&lse_ptr)
                .arg(&coef_ptr);
            launched(
                unsafe { launch.launch(per_row(r, TILE_THREADS)) }.map(drop),
                &dz_name,
            )?;
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
        let (dst, len_i) = (d_hidden + offset(r0), (r * h) as i64);
        let mut launch = stream.launch_builder(&cast_fn);
        launch.arg(&acc).arg(&dst).arg(&len_i);
        launched(
            unsafe { launch.launch(elementwise(gpu, r * h)) }.map(drop),
            &cast_name,
        )?;
    }

    // The loss and statistics, then the finished gradients checked.
    let f = gpu.function(FILE, "fll_summary")?;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&stats_ptr)
        .arg(&n_i)
        .arg(&total_ptr)
        .arg(&summary_ptr)
        .arg(&*status);
    launched(
        unsafe { launch.launch(per_row(1, THREADS)) }.map(drop),
        "fll_summary",
    )?;
    let check_name = format!("fll_check_finite_{dtype}");
    let check_fn = gpu.function(FILE, &check_name)?;
    let finished = [
        Some((d_hidden, n * h)),
        Some((d_weight, v * h)),
        d_bias.map(|db| (db, v)),
    ];
    for (ptr, len) in finished.into_iter().flatten() {
        let len_i = len as i64;
        let mut launch = stream.launch_builder(&check_fn);
        launch.arg(&ptr).arg(&len_i).arg(&*status);
        launched(
            unsafe { launch.launch(elementwise(gpu, len)) }.map(drop),
            &check_name,
        )?;
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
