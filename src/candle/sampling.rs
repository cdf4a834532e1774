//! [`sample`] on candle tensors: one token per row of `[B, V]` logits and
//! its log-prob, by the rule of [`crate::ops::sampling`] (not differentiable:
//! sampling has no gradient; the trainer recomputes log-probs).

use candle_core::{Result, Storage, Tensor};

use super::{with_float_slice, wrap};
use crate::ops::sampling::{self as op, SampleInputs, SamplingConfig, OP};

/// Draws one token per row of `logits` (`[B, V]`, F32/BF16/F16): returns
/// `(tokens U32 [B], logp F32 [B])` on the logits' device, `logp` being
/// `log softmax(z / T)` at the token before filtering. Reproducible from
/// `(cfg.seed, cfg.step)`; see [`crate::sample`].
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use grpo_kernels::{candle::sample, SamplingConfig};
/// let logits = Tensor::randn(0f32, 3., (4, 50), &Device::Cpu)?;
/// let cfg = SamplingConfig { temperature: 0.7, top_k: 10, ..Default::default() };
/// let (tokens, logp) = sample(&logits, &cfg)?;
/// assert_eq!(tokens.dims(), &[4]);
/// assert!(logp.to_vec1::<f32>()?.iter().all(|&l| l <= 0.0));
/// # Ok(()) }
/// ```
pub fn sample(logits: &Tensor, cfg: &SamplingConfig) -> Result<(Tensor, Tensor)> {
    let (_, vocab) = logits.dims2()?;
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let out = match &*storage {
        Storage::Cpu(s) => with_float_slice!(s, layout, "logits", |x| op::sample(
            &SampleInputs::new(x, vocab),
            cfg
        )
        .map_err(wrap)?),
        #[cfg(feature = "candle-cuda")]
        Storage::Cuda(s) => return cuda::sample(s, layout, vocab, cfg),
        _ => bail_unsupported!(
            OP,
            "logits on an unsupported device (build with `candle-cuda` for CUDA)"
        ),
    };
    let b = out.tokens.len();
    let dev = logits.device();
    Ok((
        Tensor::from_vec(out.tokens, b, dev)?,
        Tensor::from_vec(out.logp, b, dev)?,
    ))
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Layout, Result, Storage, Tensor};

    use crate::candle::gpu::{checked, gpu, view};
    use crate::candle::wrap;
    use crate::cuda::{self as kernels, Device, GpuFloat};
    use crate::ops::sampling::{SampleInputs, SamplingConfig};

    /// The kernel on the logits' stream; outputs stay on the device.
    pub fn sample(
        storage: &CudaStorage,
        layout: &Layout,
        vocab: usize,
        cfg: &SamplingConfig,
    ) -> Result<(Tensor, Tensor)> {
        match storage.dtype() {
            DType::F32 => run::<f32>(storage, layout, vocab, cfg),
            DType::BF16 => run::<half::bf16>(storage, layout, vocab, cfg),
            DType::F16 => run::<half::f16>(storage, layout, vocab, cfg),
            d => bail_unsupported!(crate::candle::LAYER, "logits must be F32, BF16 or F16, got {d:?}"),
        }
    }

    fn run<T: GpuFloat + CudaDType>(
        storage: &CudaStorage,
        layout: &Layout,
        vocab: usize,
        cfg: &SamplingConfig,
    ) -> Result<(Tensor, Tensor)> {
        let dev = &storage.device;
        let g = gpu(dev)?;
        let inputs = SampleInputs::<T, Device> {
            logits: view(storage, layout, "logits")?,
            vocab,
        };
        let out = kernels::sample(&g, &inputs, cfg).map_err(wrap)?;
        checked(&g)?;
        let b = out.tokens.len();
        let tensor = |s: CudaStorage| Tensor::from_storage(Storage::Cuda(s), b, BackpropOp::none(), false);
        Ok((
            tensor(CudaStorage::wrap_cuda_slice(out.tokens, dev.clone())),
            tensor(CudaStorage::wrap_cuda_slice(out.logp, dev.clone())),
        ))
    }
}
