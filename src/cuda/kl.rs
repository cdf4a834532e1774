//! Launches of the KL estimator kernels (`cuda/kl.cu`, math in `cuda/kl.cuh`).
//! The spec and validation are those of [`crate::ops::kl`].

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig};

use super::abi::{self, KlKind};
use super::{ptx, Device, Gpu, KernelFile};
use crate::error::{check, Result};
use crate::ops::kl::{KlEstimator, KlInputs, OP, OP_BWD};

const FILE: KernelFile = KernelFile {
    name: "kl",
    ptx: ptx::KL,
};
/// Threads per block (the kernels are grid-stride: any size works).
const THREADS: u32 = 256;

abi::kernels! {
    file: FILE;
    /// `kl[i]` = the `kind` estimate at `ref_logp[i] - logp[i]`, for `i < n`;
    /// grid-stride, any grid and block. Buffers: `[n]`.
    fn kl_fwd(logp: In<f32>, ref_logp: In<f32>, n: i64, kind: KlKind, kl: Out<f32>, status: Status);
    /// `dlogp[i] = grad[i] * d kl[i] / d logp[i]`, for `i < n`; grid-stride,
    /// any grid and block. Buffers: `[n]`.
    fn kl_bwd(logp: In<f32>, ref_logp: In<f32>, grad: In<f32>, n: i64, kind: KlKind, dlogp: Out<f32>, status: Status);
}

impl KlEstimator {
    /// The estimator's id in `cuda/abi.h`.
    pub(crate) fn kind(self) -> KlKind {
        match self {
            KlEstimator::K1 => KlKind::KL_K1,
            KlEstimator::K2 => KlKind::KL_K2,
            KlEstimator::K3 => KlKind::KL_K3,
            KlEstimator::LowVarK3 => KlKind::KL_LOW_VAR_K3,
            KlEstimator::Abs => KlKind::KL_ABS,
            KlEstimator::K1StraightThrough => KlKind::KL_K1_ST,
            KlEstimator::LowVarK3StraightThrough => KlKind::KL_LOW_VAR_K3_ST,
            KlEstimator::AbsStraightThrough => KlKind::KL_ABS_ST,
        }
    }
}

/// An elementwise grid: a few blocks per SM, grid-stride beyond.
fn grid(gpu: &Gpu, n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).min(8 * gpu.sm_count()).max(1);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// [`crate::kl_divergence`] on the GPU: `[N]` estimates. A non-finite
/// input, or an estimate (in the backward: a gradient) that overflows f32,
/// is reported by [`Gpu::check`].
pub fn kl_divergence(gpu: &Gpu, inputs: &KlInputs<'_, Device>, est: KlEstimator) -> Result<CudaSlice<f32>> {
    let n = inputs.validate(OP)?;
    let mut out = gpu.alloc::<f32>(n)?;
    let status = gpu.status();
    // SAFETY: every buffer holds `n` elements (validated above).
    unsafe {
        kernel::kl_fwd(
            gpu,
            grid(gpu, n),
            &inputs.logp,
            &inputs.ref_logp,
            n as i64,
            est.kind(),
            &mut out,
            &*status,
        )
    }?;
    Ok(out)
}

/// [`crate::kl_divergence_backward`] on the GPU: `grad * d kl / d logp`, `[N]`.
pub fn kl_divergence_backward(
    gpu: &Gpu,
    inputs: &KlInputs<'_, Device>,
    est: KlEstimator,
    grad: &CudaView<'_, f32>,
) -> Result<CudaSlice<f32>> {
    let n = inputs.validate(OP_BWD)?;
    check::len(OP_BWD, "grad", n, grad.len())?;
    let mut out = gpu.alloc::<f32>(n)?;
    let status = gpu.status();
    // SAFETY: every buffer holds `n` elements (validated above).
    unsafe {
        kernel::kl_bwd(
            gpu,
            grid(gpu, n),
            &inputs.logp,
            &inputs.ref_logp,
            grad,
            n as i64,
            est.kind(),
            &mut out,
            &*status,
        )
    }?;
    Ok(out)
}
