//! Launches of the clipped policy loss kernels (`cuda/policy_loss.cu`). The
//! spec, math and validation are those of [`crate::ops::policy_loss`].
//!
//! The forward is one launch: a block per sequence, the last block to finish
//! folding the per-sequence sums in sequence order into the summary (loss
//! and statistics), so results are deterministic. The backward takes the
//! loss gradient as a device scalar, so an autograd backward never waits
//! for the host.

use cudarc::driver::{CudaSlice, CudaStream, CudaView};

use super::abi::{self, PolicyLossParams, PolicyLossPartial, Summary};
use super::{block_per_sequence, ptx, Addresses, Device, Gpu, KernelFile};
use crate::error::{check, Error, Result};
use crate::ops::layout::SeqLayout;
use crate::ops::policy_loss::{
    Advantage, Aggregation, ImportanceLevel, PolicyLoss, PolicyLossConfig, PolicyLossInputs, PolicyLossStats,
    PolicyObjective, OP, OP_BWD,
};

const FILE: KernelFile = KernelFile {
    name: "policy_loss",
    ptx: ptx::POLICY_LOSS,
};

abi::kernels! {
    file: FILE;
    /// Per-token losses and the summary: one block of `POLICY_LOSS_THREADS`
    /// per sequence (grid = `p.seqs`), the last to finish folding the
    /// partials. `p`'s inputs: `[p.tokens]` (`adv_seq`: `[p.seqs]`;
    /// `cu_seqlens`: `[p.seqs + 1]`); `per_token`: `[p.tokens]`;
    /// `partials`: `[p.seqs]`; `summary`: `[SUMMARY_LEN]`; `ticket`: one
    /// zeroed counter, which the kernel leaves zeroed.
    fn policy_loss_fwd(
        p: PolicyLossParams,
        per_token: Out<f32>,
        partials: Out<PolicyLossPartial>,
        summary: Out<f32>,
        ticket: Out<u32>,
        status: Status,
    ) threads(abi::POLICY_LOSS_THREADS);
    /// `dlogp` (`[p.tokens]`) from the forward's `summary` (`[SUMMARY_LEN]`),
    /// the loss gradient `grad_loss` (`[1]`) and optionally per-token
    /// gradients (`[p.tokens]`): one block of `POLICY_LOSS_THREADS` per
    /// sequence.
    fn policy_loss_bwd(
        p: PolicyLossParams,
        summary: In<f32>,
        grad_loss: In<f32>,
        grad_per_token: Opt<In<f32>>,
        dlogp: Out<f32>,
        status: Status,
    ) threads(abi::POLICY_LOSS_THREADS);
}

// The summary's order is the kernel's.
const _: () = {
    assert!(PolicyLossStats::LOSS == Summary::LOSS as usize);
    assert!(PolicyLossStats::CLIP_FRAC_LOW == Summary::CLIP_LOW as usize);
    assert!(PolicyLossStats::CLIP_FRAC_HIGH == Summary::CLIP_HIGH as usize);
    assert!(PolicyLossStats::DUAL_CLIP_FRAC == Summary::DUAL_CLIP as usize);
    assert!(PolicyLossStats::RATIO_MEAN == Summary::RATIO_MEAN as usize);
    assert!(PolicyLossStats::RATIO_MAX == Summary::RATIO_MAX as usize);
    assert!(PolicyLossStats::KL_MEAN == Summary::KL_MEAN as usize);
    assert!(PolicyLossStats::TOKENS == Summary::TOKENS as usize);
    assert!(PolicyLossStats::CLIP_FRAC_LOW_SEQ == Summary::CLIP_LOW_SEQ as usize);
    assert!(PolicyLossStats::CLIP_FRAC_HIGH_SEQ == Summary::CLIP_HIGH_SEQ as usize);
    assert!(PolicyLossStats::CLIP_FRAC_LOW_SEQ_MIN == Summary::CLIP_LOW_SEQ_MIN as usize);
    assert!(PolicyLossStats::CLIP_FRAC_HIGH_SEQ_MAX == Summary::CLIP_HIGH_SEQ_MAX as usize);
    assert!(PolicyLossStats::SEQS == Summary::SEQS as usize);
    assert!(PolicyLossStats::SUMMARY_LEN == Summary::SUMMARY_LEN as usize);
};

impl Aggregation {
    /// The aggregation's id in `cuda/abi.h` and its constant (`TokenMean`'s
    /// normalizer, 0 for the batch's count; `SeqMeanTokenSumNorm`'s divisor).
    pub(crate) fn kernel_params(self) -> (abi::Aggregation, f32) {
        match self {
            Aggregation::TokenMean { normalizer } => {
                (abi::Aggregation::TOKEN_MEAN, normalizer.unwrap_or(0.0))
            }
            Aggregation::SeqMeanTokenMean => (abi::Aggregation::SEQ_MEAN_TOKEN_MEAN, 0.0),
            Aggregation::SeqMeanTokenSum => (abi::Aggregation::SEQ_MEAN_TOKEN_SUM, 0.0),
            Aggregation::SeqMeanTokenSumNorm { constant } => {
                (abi::Aggregation::SEQ_MEAN_TOKEN_SUM_NORM, constant)
            }
        }
    }
}

/// Device pointers of the inputs, kept readable until the guards drop.
struct Pointers<'a> {
    params: PolicyLossParams,
    _addresses: Addresses<'a>,
}

fn pointers<'a>(
    stream: &'a CudaStream,
    inputs: &'a PolicyLossInputs<'_, Device>,
    cfg: &PolicyLossConfig,
    n: usize,
    seqs: usize,
) -> Pointers<'a> {
    let mut at = Addresses::new(stream);
    let logp = at.of(&inputs.logp);
    let old_logp = at.opt(inputs.old_logp.as_ref());
    let ref_logp = at.opt(inputs.ref_logp.as_ref());
    let pg_weights = at.opt(inputs.pg_weights.as_ref());
    let (adv_seq, adv_tok) = match &inputs.advantages {
        Advantage::PerSequence(a) => (at.of(a), 0),
        Advantage::PerToken(a) => (0, at.of(a)),
    };
    let mask = at.opt(inputs.mask.as_ref());
    let (cu_seqlens, seq_len) = match &inputs.layout {
        SeqLayout::Padded { seq_len, .. } => (0, *seq_len as i64),
        SeqLayout::Packed { cu_seqlens } => (at.of(cu_seqlens), 0),
    };
    let (aggregation, agg_constant) = cfg.aggregation.kernel_params();
    let (objective, delta, [obj_a, obj_b, obj_c, obj_d]) = match cfg.objective {
        PolicyObjective::Clip { delta } => (abi::Objective::OBJ_CLIP, delta.unwrap_or(0.0), [0.0; 4]),
        PolicyObjective::Cispo { min_ratio, max_ratio } => {
            (abi::Objective::OBJ_CISPO, 0.0, [min_ratio, max_ratio, 0.0, 0.0])
        }
        PolicyObjective::Sapo { tau_pos, tau_neg } => {
            (abi::Objective::OBJ_SAPO, 0.0, [tau_pos, tau_neg, 0.0, 0.0])
        }
        PolicyObjective::Vespo {
            k_pos,
            lambda_pos,
            k_neg,
            lambda_neg,
        } => (
            abi::Objective::OBJ_VESPO,
            0.0,
            [k_pos, lambda_pos, k_neg, lambda_neg],
        ),
    };
    Pointers {
        params: PolicyLossParams {
            logp,
            old_logp,
            ref_logp,
            adv_seq,
            adv_tok,
            mask,
            cu_seqlens,
            pg_weights,
            seqs: seqs as i64,
            tokens: n as i64,
            seq_len,
            eps_low: cfg.eps_low,
            eps_high: cfg.eps_high,
            dual_clip: cfg.dual_clip.unwrap_or(0.0),
            log_ratio_clamp: cfg.log_ratio_clamp,
            beta: cfg.beta,
            agg_constant,
            delta,
            obj_a,
            obj_b,
            obj_c,
            obj_d,
            seq_level: (cfg.importance == ImportanceLevel::Sequence) as i32,
            kl_bias_correction: cfg.kl_bias_correction as i32,
            exclude_empty_seqs: cfg.exclude_empty_seqs as i32,
            kl_kind: cfg.kl.kind(),
            aggregation,
            objective,
        },
        _addresses: at,
    }
}

/// [`crate::policy_loss`] on the GPU: per-token losses `[N]` and the summary
/// `[PolicyLossStats::SUMMARY_LEN]` (loss first), both on the device; read
/// the summary with [`PolicyLossStats::from_summary`]. Bad offsets,
/// non-finite inputs (or a negative `pg_weights`) at masked-in tokens, and token losses or KL estimates
/// that overflow f32 are reported by [`Gpu::check`] (the index is the
/// token's, also for per-sequence advantages; 0 for a loss whose f32 sum
/// overflows).
pub fn policy_loss(
    gpu: &Gpu,
    inputs: &PolicyLossInputs<'_, Device>,
    cfg: &PolicyLossConfig,
) -> Result<PolicyLoss<Device>> {
    let (n, seqs) = inputs.validate(OP, cfg)?;
    let launch_cfg = block_per_sequence(OP, seqs, abi::POLICY_LOSS_THREADS)?;
    let stream = gpu.stream();
    let mut per_token = gpu.alloc::<f32>(n)?;
    let mut summary = gpu.alloc::<f32>(PolicyLossStats::SUMMARY_LEN)?;
    let mut partials = gpu.alloc::<PolicyLossPartial>(seqs)?;
    let mut ticket = stream.alloc_zeros::<u32>(1).map_err(Error::cuda)?;
    let ptrs = pointers(stream, inputs, cfg, n, seqs);
    let status = gpu.status();
    // SAFETY: the inputs hold what `p` says (validated above; the guards in
    // `ptrs` keep them alive), the outputs are allocated at the kernel's
    // lengths, the ticket zeroed; one block per sequence.
    unsafe {
        kernel::policy_loss_fwd(
            gpu,
            launch_cfg,
            ptrs.params,
            &mut per_token,
            &mut partials,
            &mut summary,
            &mut ticket,
            &*status,
        )
    }?;
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
    let launch_cfg = block_per_sequence(OP_BWD, seqs, abi::POLICY_LOSS_THREADS)?;
    let stream = gpu.stream();
    let mut dlogp = gpu.alloc::<f32>(n)?;
    let ptrs = pointers(stream, inputs, cfg, n, seqs);
    let status = gpu.status();
    // SAFETY: the inputs hold what `p` says (validated above; the guards in
    // `ptrs` keep them alive), `summary`, `grad_loss` and `grad_per_token`
    // their lengths (checked above), `dlogp` `n`; one block per sequence.
    unsafe {
        kernel::policy_loss_bwd(
            gpu,
            launch_cfg,
            ptrs.params,
            summary,
            grad_loss,
            grad_per_token,
            &mut dlogp,
            &*status,
        )
    }?;
    Ok(dlogp)
}
