//! Launches of the group advantage kernels (`cuda/advantages.cu`). The spec,
//! conventions and validation are those of [`crate::ops::advantages`].

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig};

use super::abi::{self, GroupStats};
use super::{grid_x, ptx, Device, Gpu, KernelFile};
use crate::error::{check, Error, Result};
use crate::ops::advantages::{
    AdvantageConfig, AdvantageMode, GroupAdvantages, NanRewards, RewardAggregation, Rewards, Singletons, OP,
    OP_BROADCAST,
};
use crate::ops::layout::SeqLayout;

const FILE: KernelFile = KernelFile {
    name: "advantages",
    ptx: ptx::ADVANTAGES,
};
/// Threads per sequence of `broadcast_to_tokens`.
const BROADCAST_THREADS: u32 = 256;

abi::kernels! {
    file: FILE;
    /// Every group's advantages: one block of `ADVANTAGES_THREADS` for the
    /// batch. `values`: `[components, n]`; `weights`: `[components]` or
    /// null (one component); `advantages`, `rewards`: `[n]`; `group_mean`,
    /// `group_std`, `stats` (scratch): `[n / group_size]`; `comp` (scratch,
    /// `NormalizeThenSum` only, else null): `[2 components n / group_size]`.
    fn group_advantages(
        values: In<f32>,
        weights: Opt<In<f32>>,
        components: i64,
        n: i64,
        group_size: i64,
        mode: abi::AdvantageMode,
        eps: f32,
        unbiased: i32,
        verl_singletons: i32,
        skip_nan: i32,
        agg_eps: f32,
        advantages: Out<f32>,
        rewards: Out<f32>,
        group_mean: Out<f32>,
        group_std: Out<f32>,
        stats: Out<GroupStats>,
        comp: Opt<Out<f64>>,
        status: Status,
    ) threads(abi::ADVANTAGES_THREADS);
    /// `per_token[t] = per_seq[s]` for the tokens `t` of sequence `s`: one
    /// block per sequence, any block size. `per_seq`: `[grid]`;
    /// `cu_seqlens`: `[grid + 1]`, or null for padded sequences of
    /// `seq_len`; `per_token`: `[tokens]`.
    fn broadcast_to_tokens(
        per_seq: In<f32>,
        cu_seqlens: Opt<In<u32>>,
        seq_len: i64,
        tokens: i64,
        per_token: Out<f32>,
        status: Status,
    );
}

impl AdvantageMode {
    /// `(mode, eps)` as the kernel takes them.
    fn kernel_params(self) -> (abi::AdvantageMode, f32) {
        match self {
            AdvantageMode::GroupNorm { eps, .. } => (abi::AdvantageMode::GROUP_NORM, eps),
            AdvantageMode::GroupMean => (abi::AdvantageMode::GROUP_MEAN, 0.0),
            AdvantageMode::BatchNorm { eps, .. } => (abi::AdvantageMode::BATCH_NORM, eps),
            AdvantageMode::LeaveOneOut => (abi::AdvantageMode::LEAVE_ONE_OUT, 0.0),
            AdvantageMode::None => (abi::AdvantageMode::NONE, 0.0),
            AdvantageMode::Whiten { eps, .. } => (abi::AdvantageMode::WHITEN, eps),
        }
    }
}

/// [`crate::group_advantages`] on the GPU: the same outputs, in device
/// memory, equal to the CPU's to f32 rounding (both sum in f64; flat groups
/// and groups of one get exactly 0).
///
/// The `K` weights are copied from the host first (a small pageable copy,
/// ordered on the stream). A non-finite reward, or a weighted sum that
/// overflows f32, is reported by [`Gpu::check`] with its index, and its
/// group's outputs are NaN; so is an advantage or a group std that
/// overflows f32 (the CPU op's rule). All `P * G` rewards are handled by one block,
/// which suits GRPO's batches (up to about a million completions).
/// Every [`AdvantageConfig`] runs on the GPU (with [`NanRewards::Skip`]
/// an unscorable completion's combined reward is NaN, as on the CPU).
pub fn group_advantages(
    gpu: &Gpu,
    rewards: &Rewards<'_, Device>,
    config: impl Into<AdvantageConfig>,
) -> Result<GroupAdvantages<Device>> {
    let config: AdvantageConfig = config.into();
    let (components, n) = rewards.validate(OP)?;
    config.validate(OP)?;
    let mode = config.mode;
    let agg_eps = match config.aggregation {
        RewardAggregation::NormalizeThenSum { eps } => Some(eps),
        RewardAggregation::SumThenNormalize => None,
    };
    let g = rewards.group_size;
    let groups = n / g;
    let weights = match rewards.weights {
        Some(w) => Some(gpu.stream().clone_htod(w).map_err(Error::cuda)?),
        None => None,
    };
    let mut advantages = gpu.alloc::<f32>(n)?;
    let mut combined = gpu.alloc::<f32>(n)?;
    let mut group_mean = gpu.alloc::<f32>(groups)?;
    let mut group_std = gpu.alloc::<f32>(groups)?;
    let mut stats = gpu.alloc::<GroupStats>(groups)?;
    let mut comp = match agg_eps {
        Some(_) => Some(gpu.alloc::<f64>(2 * components * groups)?),
        None => None,
    };
    let (mode_id, eps) = mode.kernel_params();
    let status = gpu.status();
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (abi::ADVANTAGES_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `values` holds `components * n` rewards and `weights` (when
    // given) `components` (validated above); the outputs and scratch are
    // allocated at the lengths the kernel writes; one block of
    // ADVANTAGES_THREADS.
    unsafe {
        kernel::group_advantages(
            gpu,
            cfg,
            &rewards.values,
            weights.as_ref(),
            components as i64,
            n as i64,
            g as i64,
            mode_id,
            eps,
            mode.unbiased() as i32,
            (config.singletons == Singletons::Verl) as i32,
            (config.nan_rewards == NanRewards::Skip) as i32,
            agg_eps.unwrap_or(0.0),
            &mut advantages,
            &mut combined,
            &mut group_mean,
            &mut group_std,
            &mut stats,
            comp.as_mut(),
            &*status,
        )
    }?;
    Ok(GroupAdvantages {
        advantages,
        rewards: combined,
        group_mean,
        group_std,
    })
}

/// [`crate::broadcast_to_tokens`] on the GPU: `[S]` per-sequence values to
/// `[tokens]` per-token values. `tokens` is given because a packed
/// layout's `cu_seqlens` live on the device; offsets that do not start at 0,
/// decrease, or do not end at `tokens` are reported by [`Gpu::check`]
/// (`InvalidLayout`, naming the sequence), as is a non-finite value.
///
/// Errors (on the host): no sequence, `tokens == 0`, `per_seq.len() != S`,
/// a padded layout with `batch * seq_len != tokens`, more tokens than an
/// address space holds ([`Error::Allocation`], as on the CPU; a device that
/// merely lacks the memory is [`Error::Cuda`]).
pub fn broadcast_to_tokens(
    gpu: &Gpu,
    per_seq: &CudaView<'_, f32>,
    layout: &SeqLayout<'_, Device>,
    tokens: usize,
) -> Result<CudaSlice<f32>> {
    check::non_empty(OP_BROADCAST, "tokens", tokens)?;
    let seqs = layout.validate_shape(OP_BROADCAST, tokens)?;
    check::len(OP_BROADCAST, "per_seq", seqs, per_seq.len())?;
    grid_x(OP_BROADCAST, "sequences", seqs)?;
    if tokens > isize::MAX as usize / std::mem::size_of::<f32>() {
        return Err(Error::Allocation {
            op: OP_BROADCAST,
            what: "tokens",
            elements: tokens,
        });
    }
    let mut out = gpu.alloc::<f32>(tokens)?;
    let (cu_seqlens, seq_len) = match layout {
        SeqLayout::Padded { seq_len, .. } => (None, *seq_len as i64),
        SeqLayout::Packed { cu_seqlens } => (Some(cu_seqlens), 0),
    };
    let status = gpu.status();
    let cfg = LaunchConfig {
        grid_dim: (seqs as u32, 1, 1),
        block_dim: (BROADCAST_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `per_seq` holds `seqs` values, `cu_seqlens` (packed) `seqs + 1`
    // offsets and `out` `tokens` elements (validated above); the kernel
    // checks the offsets' values before using them.
    unsafe {
        kernel::broadcast_to_tokens(
            gpu,
            cfg,
            per_seq,
            cu_seqlens,
            seq_len,
            tokens as i64,
            &mut out,
            &*status,
        )
    }?;
    Ok(out)
}
