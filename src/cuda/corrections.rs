//! Launches of the correction kernels (`cuda/corrections.cu`). The spec,
//! math and validation are those of [`crate::ops::corrections`]; as there,
//! each op multiplies its weights into a caller's `[N]` buffer (start from
//! ones), so corrections compose on the device without allocating, and
//! none has a backward (the weights are detached).
//!
//! Bad data (offsets, a non-finite trainer log-prob, entropy or advantage,
//! an infinite sampler log-prob at a masked-in token, a non-finite weight)
//! is reported by [`Gpu::check`] as op `corrections` with the token's (for
//! an advantage: the sequence's) index. [`high_entropy_mask_into`] finds the
//! quantile in one block (radix selection, about six reads of the
//! entropies: `cuda/corrections.cu`), the threshold staying on the device.

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig};

use super::abi::{self, CorrectionParams, IsModeKind, IsSeqPartial};
use super::{block_per_sequence, ptx, Addresses, Device, Gpu, KernelFile};
use crate::error::{check, Error, Result};
use crate::ops::corrections::{
    entropy_q, validate_entropy_mask, IsMode, IsPartial, SamplerIsConfig, SamplerIsStats, SamplerLogps,
    OP_IS, OP_OPSM,
};
use crate::ops::layout::SeqLayout;

const FILE: KernelFile = KernelFile {
    name: "corrections",
    ptx: ptx::CORRECTIONS,
};
/// Threads per block of the elementwise kernel (grid-stride: any size works).
const THREADS: u32 = 256;

abi::kernels! {
    file: FILE;
    /// Multiplies the sampler importance weights into `weights` (`[p.tokens]`)
    /// and writes each sequence's partial statistics (`partials`,
    /// `[p.seqs]`): one block of `CORRECTIONS_THREADS` per sequence (grid =
    /// `p.seqs`). `p`'s inputs: `[p.tokens]`, `cu_seqlens` `[p.seqs + 1]`.
    fn corr_sampler_is(p: CorrectionParams, weights: Out<f32>, partials: Out<IsSeqPartial>, status: Status) threads(abi::CORRECTIONS_THREADS);
    /// Zeroes `weights` (`[p.tokens]`) on every sequence OPSM drops: one
    /// block of `CORRECTIONS_THREADS` per sequence; `p.advantages`: `[p.seqs]`.
    fn corr_off_policy(p: CorrectionParams, weights: Out<f32>, status: Status) threads(abi::CORRECTIONS_THREADS);
    /// One block of `ENTROPY_SELECT_THREADS`: `threshold` (`[2]`) = the
    /// quantile `q` of the masked-in entropies (`entropy`, `mask`: `[n]`),
    /// and whether there was any.
    fn corr_entropy_select(
        entropy: In<f32>,
        mask: Opt<In<u8>>,
        n: i64,
        q: f32,
        threshold: Out<f32>,
        status: Status,
    ) threads(abi::ENTROPY_SELECT_THREADS);
    /// `weights[i] *= [mask_i and entropy_i >= threshold[0]]` (0 where
    /// `threshold[1] == 0`); grid-stride, any grid and block. Buffers: `[n]`,
    /// `threshold` `[2]`.
    fn corr_entropy_apply(
        entropy: In<f32>,
        mask: Opt<In<u8>>,
        n: i64,
        threshold: In<f32>,
        weights: Out<f32>,
        status: Status,
    );
}

impl IsMode {
    /// The mode's id in `cuda/abi.h`.
    fn kind(self) -> IsModeKind {
        match self {
            IsMode::TokenTruncate => IsModeKind::IS_TOKEN_TRUNCATE,
            IsMode::TokenMask => IsModeKind::IS_TOKEN_MASK,
            IsMode::SequenceTruncate => IsModeKind::IS_SEQUENCE_TRUNCATE,
            IsMode::SequenceMask => IsModeKind::IS_SEQUENCE_MASK,
        }
    }
}

impl From<IsSeqPartial> for IsPartial {
    fn from(p: IsSeqPartial) -> Self {
        IsPartial {
            ratio_sum: p.ratio_sum,
            ratio_count: p.ratio_count,
            ratio_min: p.ratio_min,
            ratio_max: p.ratio_max,
            diff_sum: p.diff_sum,
            diff_count: p.diff_count,
            diff_max: p.diff_max,
        }
    }
}

/// The kernels' parameters, with guards keeping the inputs readable.
struct Pointers<'a> {
    params: CorrectionParams,
    _addresses: Addresses<'a>,
}

fn pointers<'a>(
    stream: &'a CudaStream,
    inputs: &'a SamplerLogps<'_, Device>,
    advantages: Option<&'a CudaView<'_, f32>>,
    (n, seqs): (usize, usize),
) -> Pointers<'a> {
    let mut at = Addresses::new(stream);
    let logp = at.of(&inputs.logp);
    let sampler_logp = at.of(&inputs.sampler_logp);
    let mask = at.opt(inputs.mask.as_ref());
    let advantages = at.opt(advantages);
    let (cu_seqlens, seq_len) = match &inputs.layout {
        SeqLayout::Padded { seq_len, .. } => (0, *seq_len as i64),
        SeqLayout::Packed { cu_seqlens } => (at.of(cu_seqlens), 0),
    };
    Pointers {
        params: CorrectionParams {
            logp,
            sampler_logp,
            mask,
            cu_seqlens,
            advantages,
            seqs: seqs as i64,
            tokens: n as i64,
            seq_len,
            clip_min: f32::NEG_INFINITY,
            clip_max: f32::INFINITY,
            threshold: 0.0,
            mode: IsModeKind::IS_TOKEN_TRUNCATE,
        },
        _addresses: at,
    }
}

/// [`crate::sampler_is_weights_into`] on the GPU: multiplies the sampler
/// importance weights into `weights` `[N]` and returns TRL's statistics,
/// folded on the host from one partial per sequence (this waits for the
/// stream; the statistics mean something only if [`Gpu::check`] passes).
pub fn sampler_is_weights_into(
    gpu: &Gpu,
    inputs: &SamplerLogps<'_, Device>,
    cfg: &SamplerIsConfig,
    weights: &mut CudaViewMut<'_, f32>,
) -> Result<SamplerIsStats> {
    cfg.validate(OP_IS)?;
    let (n, seqs) = inputs.validate_shape(OP_IS)?;
    check::len(OP_IS, "weights", n, weights.len())?;
    let launch = block_per_sequence(OP_IS, seqs, abi::CORRECTIONS_THREADS)?;
    let stream = gpu.stream();
    let mut partials = gpu.alloc::<IsSeqPartial>(seqs)?;
    {
        let mut ptrs = pointers(stream, inputs, None, (n, seqs));
        (ptrs.params.clip_min, ptrs.params.clip_max) = cfg.bounds();
        ptrs.params.mode = cfg.mode.kind();
        let status = gpu.status();
        // SAFETY: the inputs hold what `p` says (validated above; the guards
        // in `ptrs` keep them alive), `weights` `n`, `partials` `seqs`; one
        // block per sequence.
        unsafe { kernel::corr_sampler_is(gpu, launch, ptrs.params, &mut *weights, &mut partials, &*status) }?;
    }
    let host = stream.clone_dtoh(&partials).map_err(Error::cuda)?;
    Ok(IsPartial::stats(host.into_iter().map(IsPartial::from)))
}

/// [`crate::off_policy_mask_into`] on the GPU: zeroes `weights` `[N]` on
/// the sequences OPSM drops; `advantages` `[S]`.
pub fn off_policy_mask_into(
    gpu: &Gpu,
    inputs: &SamplerLogps<'_, Device>,
    advantages: &CudaView<'_, f32>,
    threshold: f32,
    weights: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check::param(OP_OPSM, "threshold", threshold as f64, true, "finite")?;
    let (n, seqs) = inputs.validate_shape(OP_OPSM)?;
    check::len(OP_OPSM, "advantages", seqs, advantages.len())?;
    check::len(OP_OPSM, "weights", n, weights.len())?;
    let launch = block_per_sequence(OP_OPSM, seqs, abi::CORRECTIONS_THREADS)?;
    let mut ptrs = pointers(gpu.stream(), inputs, Some(advantages), (n, seqs));
    ptrs.params.threshold = threshold;
    let status = gpu.status();
    // SAFETY: the inputs hold what `p` says (validated above; the guards in
    // `ptrs` keep them alive), `weights` `n`; one block per sequence.
    unsafe { kernel::corr_off_policy(gpu, launch, ptrs.params, &mut *weights, &*status) }
}

/// [`crate::high_entropy_mask_into`] on the GPU: multiplies the high-entropy
/// mask into `weights` `[N]`. The threshold stays on the device: no host
/// round trip.
pub fn high_entropy_mask_into(
    gpu: &Gpu,
    entropy: &CudaView<'_, f32>,
    mask: Option<&CudaView<'_, u8>>,
    top_quantile: f64,
    weights: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let n = validate_entropy_mask(entropy.len(), mask.map(|m| m.len()), top_quantile, weights.len())?;
    let mut threshold = gpu.alloc::<f32>(2)?;
    let status = gpu.status();
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (abi::ENTROPY_SELECT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let q = entropy_q(top_quantile);
    // SAFETY: `entropy` and `mask` hold `n` elements (checked above),
    // `threshold` 2; one block of ENTROPY_SELECT_THREADS.
    unsafe {
        kernel::corr_entropy_select(
            gpu,
            one_block,
            entropy,
            mask,
            n as i64,
            q,
            &mut threshold,
            &*status,
        )
    }?;
    let blocks = n.div_ceil(THREADS as usize).min(8 * gpu.sm_count()).max(1);
    let grid = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every buffer holds `n` elements (checked above), `threshold`
    // 2; grid-stride.
    unsafe {
        kernel::corr_entropy_apply(
            gpu,
            grid,
            entropy,
            mask,
            n as i64,
            &threshold,
            &mut *weights,
            &*status,
        )
    }
}
