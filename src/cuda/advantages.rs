//! Launches of the group advantage kernels (`cuda/advantages.cu`). The spec,
//! conventions and validation are those of [`crate::ops::advantages`].

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};

use super::{launched, ptx, Device, Gpu, KernelFile, LaunchExt};
use crate::error::{check, Error, Result};
use crate::ops::advantages::{AdvantageMode, GroupAdvantages, Rewards, OP, OP_BROADCAST};
use crate::ops::layout::SeqLayout;

const FILE: KernelFile = KernelFile {
    name: "advantages",
    ptx: ptx::ADVANTAGES,
};
/// Threads of the one block of `group_advantages` (`THREADS` in the .cu).
const THREADS: u32 = 1024;
/// Threads per sequence of `broadcast_to_tokens`.
const BROADCAST_THREADS: u32 = 256;

impl AdvantageMode {
    /// `(mode, eps)` as `cuda/advantages.cu` takes them (`Mode`).
    fn kernel_params(self) -> (i32, f32) {
        match self {
            AdvantageMode::GroupNorm { eps, .. } => (0, eps),
            AdvantageMode::GroupMean => (1, 0.0),
            AdvantageMode::BatchNorm { eps, .. } => (2, eps),
            AdvantageMode::LeaveOneOut => (3, 0.0),
            AdvantageMode::None => (4, 0.0),
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
pub fn group_advantages(
    gpu: &Gpu,
    rewards: &Rewards<'_, Device>,
    mode: AdvantageMode,
) -> Result<GroupAdvantages<Device>> {
    let (components, n) = rewards.validate(OP)?;
    mode.validate(OP)?;
    let g = rewards.group_size;
    let groups = n / g;
    let weights = match rewards.weights {
        Some(w) => Some(gpu.stream().clone_htod(w).map_err(Error::cuda)?),
        None => None,
    };
    let weights_view = weights.as_ref().map(|w| w.as_view());
    let mut advantages = gpu.alloc::<f32>(n)?;
    let mut combined = gpu.alloc::<f32>(n)?;
    let mut group_mean = gpu.alloc::<f32>(groups)?;
    let mut group_std = gpu.alloc::<f32>(groups)?;
    let mut stats = gpu.alloc::<[f64; 4]>(groups)?;
    let (mode_id, eps) = mode.kernel_params();
    let (k_i, n_i, g_i, unbiased) = (components as i64, n as i64, g as i64, mode.unbiased() as i32);
    let f = gpu.function(FILE, "group_advantages")?;
    let status = gpu.status();
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&rewards.values)
        .opt(&weights_view)
        .arg(&k_i)
        .arg(&n_i)
        .arg(&g_i)
        .arg(&mode_id)
        .arg(&eps)
        .arg(&unbiased)
        .arg(&mut advantages)
        .arg(&mut combined)
        .arg(&mut group_mean)
        .arg(&mut group_std)
        .arg(&mut stats)
        .arg(&*status);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(unsafe { launch.launch(cfg) }.map(drop), "group_advantages")?;
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
    if seqs > i32::MAX as usize {
        return Err(Error::Unsupported {
            op: OP_BROADCAST,
            reason: format!("{seqs} sequences exceed a CUDA grid (2^31 - 1)"),
        });
    }
    if tokens > isize::MAX as usize / std::mem::size_of::<f32>() {
        return Err(Error::Allocation {
            op: OP_BROADCAST,
            what: "tokens",
            elements: tokens,
        });
    }
    let mut out = gpu.alloc::<f32>(tokens)?;
    let stream = gpu.stream();
    let (cu_seqlens, seq_len, _guard) = match layout {
        SeqLayout::Padded { seq_len, .. } => (0, *seq_len as i64, None),
        SeqLayout::Packed { cu_seqlens } => {
            let (ptr, guard) = cu_seqlens.device_ptr(stream);
            (ptr, 0, Some(guard))
        }
    };
    let tokens_i = tokens as i64;
    let f = gpu.function(FILE, "broadcast_to_tokens")?;
    let status = gpu.status();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(per_seq)
        .arg(&cu_seqlens)
        .arg(&seq_len)
        .arg(&tokens_i)
        .arg(&mut out)
        .arg(&*status);
    let cfg = LaunchConfig {
        grid_dim: (seqs as u32, 1, 1),
        block_dim: (BROADCAST_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(unsafe { launch.launch(cfg) }.map(drop), "broadcast_to_tokens")?;
    Ok(out)
}
