//! Launch of the fused sampling kernel (`cuda/sampling.cu`): one block per
//! row. The rule (filters, Philox stream, Gumbel-max draw, log-prob) and
//! validation are those of [`crate::ops::sampling`], so for the same seed
//! and step the GPU picks the CPU's token, except where two candidates'
//! keys tie within an ulp (the GPU's `logf` and the CPU's `ln` may round
//! differently there).

use cudarc::driver::LaunchConfig;

use super::abi;
use super::{grid_x, ptx, Device, Gpu, GpuFloat, KernelFile};
use crate::error::Result;
use crate::ops::sampling::{SampleInputs, Samples, SamplingConfig, OP};

const FILE: KernelFile = KernelFile {
    name: "sampling",
    ptx: ptx::SAMPLING,
};

abi::kernels! {
    file: FILE;
    /// One token per row of `logits` (`[grid, vocab]`): one block of
    /// `SAMPLING_THREADS` per row. `tokens`, `logp`: `[grid]`.
    fn sample<T: GpuFloat>(
        logits: In<T>,
        vocab: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        seed: u64,
        step: u64,
        tokens: Out<u32>,
        logp: Out<f32>,
        status: Status,
    ) threads(abi::SAMPLING_THREADS);
}

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
    grid_x(OP, "rows", rows)?;
    let mut tokens = gpu.alloc::<u32>(rows)?;
    let mut logp = gpu.alloc::<f32>(rows)?;
    let vocab = inputs.vocab as i64;
    // top_k = 0 or >= V keeps all, as on the CPU.
    let top_k = cfg.top_k.min(i64::MAX as usize) as i64;
    let status = gpu.status();
    let launch_cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (abi::SAMPLING_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `logits` holds `rows * vocab` values (validated above), the
    // outputs `rows`; one block of SAMPLING_THREADS per row.
    unsafe {
        kernel::sample::<T>(
            gpu,
            launch_cfg,
            &inputs.logits,
            vocab,
            cfg.temperature,
            top_k,
            cfg.top_p,
            cfg.min_p,
            cfg.seed,
            cfg.step,
            &mut tokens,
            &mut logp,
            &*status,
        )
    }?;
    Ok(Samples { tokens, logp })
}
