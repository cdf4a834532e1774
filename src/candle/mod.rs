//! Every op on candle tensors, taking part in candle's autograd on CPU and
//! CUDA (feature `candle`; `candle-cuda` adds the CUDA path).
//!
//! Differentiable ops are `CustomOp`s applied with `apply_op*` (never the
//! `_no_bwd` variants), whose `bwd` runs this crate's backward kernels, so
//! `loss.backward()` reaches logits (or hidden states and the LM head) and
//! from there the model. Inputs must be contiguous (call `.contiguous()`),
//! on one device, in F32, BF16 or F16 (token ids U32 or I64, masks U8).
//!
//! On CUDA each op runs on the tensor's device stream with the same kernels
//! as `grpo_kernels::cuda` (feature `cuda`), then checks the kernels' status word, which waits for
//! the stream once, so bad data is a typed error here too.
//!
//! # A GRPO step in 20 lines
//! A policy (here only an LM head over fixed hidden states) samples `G`
//! completions per prompt, a reward scores them, and one clipped update
//! follows, gradients reaching the head through `backward`:
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{Device, Tensor, Var};
//! use candle_nn::{AdamW, Optimizer, ParamsAdamW};
//! use grpo_kernels::candle::{fused_linear_logprobs, group_advantages, policy_loss, sample, PolicyLossTensors};
//! use grpo_kernels::{AdvantageMode, FusedLinearConfig, PolicyLossConfig, SamplingConfig};
//! let (dev, prompts, group, hidden, vocab) = (Device::Cpu, 2, 4, 16, 50);
//! let h = Tensor::randn(0f32, 1., (prompts * group, hidden), &dev)?; // one token per completion
//! let head = Var::randn(0f32, 0.1, (vocab, hidden), &dev)?;
//! let mut opt = AdamW::new(vec![head.clone()], ParamsAdamW { lr: 1e-2, ..Default::default() })?;
//! // Roll out, and reward even tokens.
//! let cfg = SamplingConfig { temperature: 1.0, seed: 7, ..Default::default() };
//! let (tokens, old_logp) = sample(&h.matmul(&head.t()?)?, &cfg)?;
//! let rewards: Vec<f32> = tokens.to_vec1::<u32>()?.iter().map(|t| (t % 2 == 0) as u8 as f32).collect();
//! let adv = group_advantages(&Tensor::from_vec(rewards, (prompts, group), &dev)?, None, AdvantageMode::default())?;
//! // Update: log-probs straight from the hidden states, the clipped loss, a step.
//! let lp = fused_linear_logprobs(&h, &head, &tokens, None, &FusedLinearConfig::default())?;
//! let (old, advantages) = (old_logp.unsqueeze(1)?, adv.advantages.flatten_all()?);
//! let inputs = PolicyLossTensors { old_logp: Some(&old), ref_logp: None, advantages: &advantages, mask: None, pg_weights: None, cu_seqlens: None };
//! let out = policy_loss(&lp.logp.unsqueeze(1)?, &inputs, &PolicyLossConfig::default())?;
//! opt.backward_step(&out.loss)?;
//! println!("loss {} clip fraction {}", out.loss.to_scalar::<f32>()?, out.stats.clip_frac_high);
//! # Ok(()) }
//! ```
//!
//! On CUDA tensors the same code runs the CUDA kernels (feature
//! `candle-cuda`); pass [`crate::FusedLinearConfig::gpu`]'s chunk sizes there.
//!
//! # Gradients that stop silently in candle-nn
//! candle-nn's `rotary_emb::rope`, `ops::rms_norm` (which `RmsNorm` uses on
//! contiguous input), `ops::layer_norm` (which `LayerNorm` uses on
//! contiguous input when it has a bias) and `ops::softmax_last_dim` are
//! applied with `apply_op*_no_bwd`: no error, no gradient. A model trained
//! through them learns nothing upstream of them. [`nn`] has differentiable
//! replacements for CPU and CUDA (fused on f32 CPU tensors, composed of
//! candle tensor ops elsewhere), and the quick GELU of Qwen2-VL's vision
//! tower.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// `return Err(unsupported(op, format!(...)))`.
macro_rules! bail_unsupported {
    ($op:expr, $($fmt:tt)+) => {
        return Err($crate::candle::unsupported($op, format!($($fmt)+)))
    };
}

pub(crate) use bail_unsupported;

pub mod advantages;
pub mod corrections;
pub mod fused_linear;
pub mod fused_linear_loss;
pub mod kl;
pub mod logprob;
pub mod nn;
pub mod policy_loss;
pub mod sampling;

pub use advantages::{group_advantages, AdvantageTensors};
pub use corrections::{
    high_entropy_mask, mask_truncated_completions, off_policy_mask, sampler_is_weights, SamplerLogpTensors,
};
pub use fused_linear::fused_linear_logprobs;
pub use fused_linear_loss::{fused_linear_policy_loss, FusedLossOutput};
pub use kl::kl_divergence;
pub use logprob::{token_logprobs, LogProbTensors};
pub use policy_loss::{policy_loss, PolicyLossOutput, PolicyLossTensors};
pub use sampling::sample;

/// Runs `$body` with `$s` bound to a float storage as a typed slice (F32,
/// BF16 or F16), `$what` naming it in errors.
macro_rules! with_float_slice {
    ($storage:expr, $layout:expr, $what:expr, |$s:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                let $s = $crate::candle::host_slice::<f32>($storage, $layout, $what)?;
                $body
            }
            candle_core::CpuStorage::BF16(_) => {
                let $s = $crate::candle::host_slice::<half::bf16>($storage, $layout, $what)?;
                $body
            }
            candle_core::CpuStorage::F16(_) => {
                let $s = $crate::candle::host_slice::<half::f16>($storage, $layout, $what)?;
                $body
            }
            other => $crate::candle::bail_unsupported!(
                $crate::candle::LAYER,
                "{} must be F32, BF16 or F16, got {:?}",
                $what,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}

pub(crate) use with_float_slice;

/// This crate's error as candle's.
pub(crate) fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The op named in errors of the layer's shared checks (contiguity, dtype,
/// device of a storage), which do not know which op called them.
pub(crate) const LAYER: &str = "grpo_kernels::candle";

/// An input this layer cannot take (dtype, device, shape, layout), as this
/// crate's [`crate::Error::Unsupported`], wrapped like every other error of
/// the candle ops.
pub(crate) fn unsupported(op: &'static str, reason: String) -> candle_core::Error {
    wrap(crate::Error::Unsupported { op, reason })
}

/// The contiguous elements of a CPU storage under `layout`.
pub(crate) fn host_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| unsupported(LAYER, format!("`{what}` must be contiguous (call .contiguous())")))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Fails unless every tensor is on `device`.
pub(crate) fn same_device(
    device: &candle_core::Device,
    op: &'static str,
    tensors: &[(&str, &Tensor)],
) -> Result<()> {
    for (name, t) in tensors {
        if !t.device().same_device(device) {
            bail_unsupported!(
                op,
                "`{name}` is on {:?}, the other inputs on {:?}",
                t.device(),
                device
            );
        }
    }
    Ok(())
}

/// Token ids of a captured tensor as a host slice, for whatever id dtype it has.
pub(crate) enum HostIds<'a> {
    U32(&'a [u32]),
    I64(&'a [i64]),
}

/// Reads a captured tensor's CPU storage with `f` (contiguous only).
pub(crate) fn with_cpu<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(s, layout),
        _ => bail_unsupported!(LAYER, "{what} is not on the CPU"),
    }
}

pub(crate) fn host_ids<'a>(s: &'a CpuStorage, l: &Layout) -> Result<HostIds<'a>> {
    match s {
        CpuStorage::U32(_) => Ok(HostIds::U32(host_slice(s, l, "targets")?)),
        CpuStorage::I64(_) => Ok(HostIds::I64(host_slice(s, l, "targets")?)),
        other => bail_unsupported!(
            LAYER,
            "token ids must be U32 or I64, got {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

#[cfg(feature = "candle-cuda")]
pub(crate) mod gpu {
    //! CUDA plumbing: one [`Gpu`] per candle device, views of storages.
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::{DType, Layout, Result, Storage, Tensor};
    use cudarc::driver::CudaView;

    use crate::cuda::{Gpu, GpuFloat, GpuId};

    /// The [`Gpu`] on a candle device's stream (created once per device).
    pub fn gpu(dev: &CudaDevice) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<candle_core::cuda_backend::DeviceId, Arc<Gpu>>>> =
            OnceLock::new();
        let mut gpus = GPUS.get_or_init(Default::default).lock().unwrap();
        if let Some(g) = gpus.get(&dev.id()) {
            return Ok(g.clone());
        }
        let g = Arc::new(Gpu::new(dev.cuda_stream()).map_err(super::wrap)?);
        gpus.insert(dev.id(), g.clone());
        Ok(g)
    }

    /// The contiguous elements of a CUDA storage under `layout`, as a view.
    pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            super::unsupported(
                super::LAYER,
                format!("`{what}` must be contiguous (call .contiguous())"),
            )
        })?;
        Ok(s.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// Reads a captured tensor's CUDA storage with `f`.
    pub fn with_cuda<R>(
        t: &Tensor,
        what: &str,
        f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
    ) -> Result<R> {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => f(s, layout),
            _ => bail_unsupported!(super::LAYER, "{what} is not on a CUDA device"),
        }
    }

    /// Reports the kernels' data errors (waits for the stream).
    pub fn checked(gpu: &Gpu) -> Result<()> {
        gpu.check().map_err(super::wrap)
    }

    /// A computation generic over the float and token id types.
    pub trait ForDTypes<R> {
        fn run<T: GpuFloat + CudaDType, I: GpuId + CudaDType>(self) -> Result<R>;
    }

    /// Runs `job` for a tensor of dtype `float` (`what` names it in errors)
    /// and token ids of dtype `ids`.
    pub fn for_dtypes<R>(float: DType, ids: DType, what: &str, job: impl ForDTypes<R>) -> Result<R> {
        use half::{bf16, f16};
        match (float, ids) {
            (DType::F32, DType::U32) => job.run::<f32, u32>(),
            (DType::F32, DType::I64) => job.run::<f32, i64>(),
            (DType::BF16, DType::U32) => job.run::<bf16, u32>(),
            (DType::BF16, DType::I64) => job.run::<bf16, i64>(),
            (DType::F16, DType::U32) => job.run::<f16, u32>(),
            (DType::F16, DType::I64) => job.run::<f16, i64>(),
            (DType::F32 | DType::BF16 | DType::F16, d) => {
                bail_unsupported!(super::LAYER, "token ids must be U32 or I64, got {d:?}")
            }
            (d, _) => bail_unsupported!(super::LAYER, "{what} must be F32, BF16 or F16, got {d:?}"),
        }
    }
}
