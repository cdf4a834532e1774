//! Launches of the clipped policy loss kernels (`cuda/policy_loss.cu`). The
//! spec, math and validation are those of [`crate::ops::policy_loss`].
//!
//! The forward is one launch: a block per sequence, the last block to finish
//! folding the per-sequence sums in sequence order into the summary (loss
//! and statistics), so results are deterministic. The backward takes the
//! loss gradient as a device scalar, so an autograd backward never waits
//! for the host.

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};

use super::{launched, ptx, Device, Gpu, KernelFile};
use crate::error::{check, Error, Result};
use crate::ops::layout::SeqLayout;
use crate::ops::policy_loss::{
    Advantage, Aggregation, ImportanceLevel, PolicyLoss, PolicyLossConfig, PolicyLossInputs, PolicyLossStats,
    OP, OP_BWD,
};

const FILE: KernelFile = KernelFile {
    name: "policy_loss",
    ptx: ptx::POLICY_LOSS,
};
/// Threads per block (`THREADS` in the .cu).
const THREADS: u32 = 256;
/// Floats in a per-sequence partial (`Partial` in the .cu).
const PARTIAL_FLOATS: usize = 8;

/// `Params` of `cuda/policy_loss.cu`, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    logp: u64,
    old_logp: u64,
    ref_logp: u64,
    adv_seq: u64,
    adv_tok: u64,
    mask: u64,
    cu_seqlens: u64,
    seqs: i64,
    tokens: i64,
    seq_len: i64,
    eps_low: f32,
    eps_high: f32,
    dual_clip: f32,
    log_ratio_clamp: f32,
    beta: f32,
    agg_constant: f32,
    seq_level: i32,
    kl_kind: i32,
    aggregation: i32,
}

// SAFETY: plain old data with the C layout of the kernel's `Params`.
unsafe impl DeviceRepr for Params {}

/// Device pointers of the inputs, kept readable until the guards drop.
struct Pointers<'a> {
    params: Params,
    _guards: Vec<SyncOnDrop<'a>>,
}

fn pointers<'a>(
    stream: &'a CudaStream,
    inputs: &'a PolicyLossInputs<'_, Device>,
    cfg: &PolicyLossConfig,
    n: usize,
    seqs: usize,
) -> Pointers<'a> {
    let mut guards = Vec::new();
    let mut ptr = |v: Option<&'a CudaView<'_, f32>>| match v {
        Some(v) => {
            let (p, g) = v.device_ptr(stream);
            guards.push(g);
            p
        }
        None => 0,
    };
    let logp = ptr(Some(&inputs.logp));
    let old_logp = ptr(inputs.old_logp.as_ref());
    let ref_logp = ptr(inputs.ref_logp.as_ref());
    let (adv_seq, adv_tok) = match &inputs.advantages {
        Advantage::PerSequence(a) => (ptr(Some(a)), 0),
        Advantage::PerToken(a) => (0, ptr(Some(a))),
    };
    let mask = inputs.mask.as_ref().map_or(0, |m| {
        let (p, g) = m.device_ptr(stream);
        guards.push(g);
        p
    });
    let (cu_seqlens, seq_len) = match &inputs.layout {
        SeqLayout::Padded { seq_len, .. } => (0, *seq_len as i64),
        SeqLayout::Packed { cu_seqlens } => {
            let (p, g) = cu_seqlens.device_ptr(stream);
            guards.push(g);
            (p, 0)
        }
    };
    let (aggregation, agg_constant) = match cfg.aggregation {
        Aggregation::TokenMean { normalizer } => (0, normalizer.unwrap_or(0.0)),
        Aggregation::SeqMeanTokenMean => (1, 0.0),
        Aggregation::SeqMeanTokenSum => (2, 0.0),
        Aggregation::SeqMeanTokenSumNorm { constant } => (3, constant),
    };
    Pointers {
        params: Params {
            logp,
            old_logp,
            ref_logp,
            adv_seq,
            adv_tok,
            mask,
            cu_seqlens,
            seqs: seqs as i64,
            tokens: n as i64,
            seq_len,
            eps_low: cfg.eps_low,
            eps_high: cfg.eps_high,
            dual_clip: cfg.dual_clip.unwrap_or(0.0),
            log_ratio_clamp: cfg.log_ratio_clamp,
            beta: cfg.beta,
            agg_constant,
            seq_level: (cfg.importance == ImportanceLevel::Sequence) as i32,
            kl_kind: cfg.kl.kind(),
            aggregation,
        },
        _guards: guards,
    }
}

/// One block per sequence; sequences must fit a grid dimension.
fn per_sequence(op: &'static str, seqs: usize) -> Result<LaunchConfig> {
    if seqs > i32::MAX as usize {
        return Err(Error::Unsupported {
            op,
            reason: format!("{seqs} sequences exceed a CUDA grid (2^31 - 1)"),
        });
    }
    Ok(LaunchConfig {
        grid_dim: (seqs as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// [`crate::policy_loss`] on the GPU: per-token losses `[N]` and the summary
/// `[PolicyLossStats::SUMMARY_LEN]` (loss first), both on the device; read
/// the summary with [`PolicyLossStats::from_summary`]. Bad offsets,
/// non-finite inputs at masked-in tokens, and token losses or KL estimates
/// that overflow f32 are reported by [`Gpu::check`] (the index is the
/// token's, also for per-sequence advantages; 0 for a loss whose f32 sum
/// overflows).
pub fn policy_loss(
    gpu: &Gpu,
    inputs: &PolicyLossInputs<'_, Device>,
    cfg: &PolicyLossConfig,
) -> Result<PolicyLoss<Device>> {
    let (n, seqs) = inputs.validate(OP, cfg)?;
    let launch_cfg = per_sequence(OP, seqs)?;
    let stream = gpu.stream();
    let mut per_token = gpu.alloc::<f32>(n)?;
    let mut summary = gpu.alloc::<f32>(PolicyLossStats::SUMMARY_LEN)?;
    let mut partials = gpu.alloc::<f32>(seqs * PARTIAL_FLOATS)?;
    let mut ticket = stream.alloc_zeros::<u32>(1).map_err(Error::cuda)?;
    let ptrs = pointers(stream, inputs, cfg, n, seqs);
    let f = gpu.function(FILE, "policy_loss_fwd")?;
    let status = gpu.status();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&ptrs.params)
        .arg(&mut per_token)
        .arg(&mut partials)
        .arg(&mut summary)
        .arg(&mut ticket)
        .arg(&*status);
    launched(unsafe { launch.launch(launch_cfg) }.map(drop), "policy_loss_fwd")?;
    Ok(PolicyLoss { per_token, summary })
}

/// [`crate::policy_loss_backward`] on the GPU: `dlogp` `[N]` for
/// `L = g * loss + sum_t grad_per_token_t * per_token_t`, with `g` the single
/// element of `grad_loss` (device memory: no host round trip). `summary` is
/// the forward's (its token count normalizes `TokenMean` without a
/// normalizer). A non-finite `grad_loss` (index 0), `grad_per_token` or
/// input at a masked-in token, or a gradient that overflows f32, is
/// reported by [`Gpu::check`].
pub fn policy_loss_backward(
    gpu: &Gpu,
    inputs: &PolicyLossInputs<'_, Device>,
    cfg: &PolicyLossConfig,
    summary: &CudaView<'_, f32>,
    grad_loss: &CudaView<'_, f32>,
    grad_per_token: Option<&CudaView<'_, f32>>,
) -> Result<CudaSlice<f32>> {
    let (n, seqs) = inputs.validate(OP_BWD, cfg)?;
    check::len(OP_BWD, "summary", PolicyLossStats::SUMMARY_LEN, summary.len())?;
    check::len(OP_BWD, "grad_loss", 1, grad_loss.len())?;
    if let Some(g) = grad_per_token {
        check::len(OP_BWD, "grad_per_token", n, g.len())?;
    }
    let launch_cfg = per_sequence(OP_BWD, seqs)?;
    let stream = gpu.stream();
    let mut dlogp = gpu.alloc::<f32>(n)?;
    let ptrs = pointers(stream, inputs, cfg, n, seqs);
    let f = gpu.function(FILE, "policy_loss_bwd")?;
    let status = gpu.status();
    let mut launch = stream.launch_builder(&f);
    launch.arg(&ptrs.params).arg(summary).arg(grad_loss);
    match grad_per_token {
        Some(g) => launch.arg(g),
        None => launch.arg(&super::NULL),
    };
    launch.arg(&mut dlogp).arg(&*status);
    launched(unsafe { launch.launch(launch_cfg) }.map(drop), "policy_loss_bwd")?;
    Ok(dlogp)
}
