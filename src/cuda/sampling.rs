//! Launch of the fused sampling kernel (`cuda/sampling.cu`): one block per
//! row. The rule (filters, Philox stream, Gumbel-max draw, log-prob) and
//! validation are those of [`crate::ops::sampling`], so for the same seed
//! and step the GPU picks the CPU's token, except where two candidates'
//! keys tie within an ulp (the GPU's `logf` and the CPU's `ln` may round
//! differently there).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{launched, ptx, Device, Gpu, GpuFloat, KernelFile};
use crate::error::{Error, Result};
use crate::ops::sampling::{SampleInputs, Samples, SamplingConfig, OP};

const FILE: KernelFile = KernelFile {
    name: "sampling",
    ptx: ptx::SAMPLING,
};
/// Threads per block (`THREADS` in the .cu).
const THREADS: u32 = 1024;

/// [`crate::sample`] on the GPU: one token and its log-prob per row. A row
/// with a NaN or `+inf` logit (or no finite one), or whose scaled logits
/// overflow (beyond about `±2.36e38`: the kernel's softmax state is in base
/// 2), is reported by [`Gpu::check`]; its token is 0 and its log-prob NaN.
pub fn sample<T: GpuFloat>(
    gpu: &Gpu,
    inputs: &SampleInputs<'_, T, Device>,
    cfg: &SamplingConfig,
) -> Result<Samples<Device>> {
    let rows = inputs.validate(OP)?;
    cfg.validate(OP)?;
    if rows > i32::MAX as usize {
        return Err(Error::Unsupported {
            op: OP,
            reason: format!("{rows} rows exceed a CUDA grid (2^31 - 1)"),
        });
    }
    let mut tokens = gpu.alloc::<u32>(rows)?;
    let mut logp = gpu.alloc::<f32>(rows)?;
    let vocab = inputs.vocab as i64;
    // top_k = 0 or >= V keeps all, as on the CPU.
    let top_k = cfg.top_k.min(i64::MAX as usize) as i64;
    let name = format!("sample_{}", T::DTYPE.name());
    let f = gpu.function(FILE, &name)?;
    let status = gpu.status();
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&inputs.logits)
        .arg(&vocab)
        .arg(&cfg.temperature)
        .arg(&top_k)
        .arg(&cfg.top_p)
        .arg(&cfg.min_p)
        .arg(&cfg.seed)
        .arg(&cfg.step)
        .arg(&mut tokens)
        .arg(&mut logp)
        .arg(&*status);
    let launch_cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launched(unsafe { launch.launch(launch_cfg) }.map(drop), &name)?;
    Ok(Samples { tokens, logp })
}
