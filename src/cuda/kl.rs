//! Launches of the KL estimator kernels (`cuda/kl.cu`, math in `cuda/kl.cuh`).
//! The spec and validation are those of [`crate::ops::kl`].

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::{launched, ptx, Device, Gpu, KernelFile};
use crate::error::{check, Result};
use crate::ops::kl::{KlEstimator, KlInputs, OP, OP_BWD};

const FILE: KernelFile = KernelFile {
    name: "kl",
    ptx: ptx::KL,
};
const THREADS: u32 = 256;

impl KlEstimator {
    /// The estimator's id in `cuda/kl.cuh` (`KlKind`).
    pub(crate) fn kind(self) -> i32 {
        match self {
            KlEstimator::K1 => 0,
            KlEstimator::K2 => 1,
            KlEstimator::K3 => 2,
            KlEstimator::LowVarK3 => 3,
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
    let (n_i, kind) = (n as i64, est.kind());
    let f = gpu.function(FILE, "kl_fwd")?;
    let status = gpu.status();
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&inputs.logp)
        .arg(&inputs.ref_logp)
        .arg(&n_i)
        .arg(&kind)
        .arg(&mut out)
        .arg(&*status);
    launched(unsafe { launch.launch(grid(gpu, n)) }.map(drop), "kl_fwd")?;
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
    let (n_i, kind) = (n as i64, est.kind());
    let f = gpu.function(FILE, "kl_bwd")?;
    let status = gpu.status();
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&inputs.logp)
        .arg(&inputs.ref_logp)
        .arg(grad)
        .arg(&n_i)
        .arg(&kind)
        .arg(&mut out)
        .arg(&*status);
    launched(unsafe { launch.launch(grid(gpu, n)) }.map(drop), "kl_bwd")?;
    Ok(out)
}
