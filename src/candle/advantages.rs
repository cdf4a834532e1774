//! [`group_advantages`] on candle tensors (not differentiable: in GRPO the
//! advantages are constants of the loss). The math is
//! [`crate::ops::advantages`]'s.

use candle_core::{DType, Result, Storage, Tensor};

use super::{host_slice, wrap};
use crate::ops::advantages::{self as op, AdvantageConfig, GroupAdvantages, Rewards, OP};

/// Outputs of [`group_advantages`], F32 on the rewards' device.
#[derive(Debug, Clone)]
pub struct AdvantageTensors {
    /// `[P, G]` advantages.
    pub advantages: Tensor,
    /// `[P, G]` combined rewards `sum_k w_k values[k]`.
    pub rewards: Tensor,
    /// `[P]` group means of the combined rewards.
    pub group_mean: Tensor,
    /// `[P]` group standard deviations (see [`GroupAdvantages::group_std`]).
    pub group_std: Tensor,
}

/// Group-relative advantages of `rewards`, F32 `[P, G]` (one component)
/// or `[K, P, G]` with `weights` of length `K` (R1-SGG's format, node and
/// edge rewards weighted 1, 2, 5); `config` an
/// [`AdvantageConfig`] (TRL's NaN rewards and
/// `normalize_then_sum`, verl's groups of one) or just an
/// [`AdvantageMode`](crate::AdvantageMode); see [`crate::group_advantages`]
/// for the modes and the exact 0 of flat groups. On CUDA the kernel of
/// `grpo_kernels::cuda::group_advantages` runs on the tensor's stream.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use grpo_kernels::{candle::group_advantages, AdvantageMode};
/// let rewards = Tensor::new(&[[1.0f32, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]], &Device::Cpu)?;
/// let out = group_advantages(&rewards, None, AdvantageMode::default())?;
/// assert_eq!(out.advantages.to_vec2::<f32>()?[1], vec![0.0; 4]); // a flat group
/// # Ok(()) }
/// ```
pub fn group_advantages(
    rewards: &Tensor,
    weights: Option<&[f32]>,
    config: impl Into<AdvantageConfig>,
) -> Result<AdvantageTensors> {
    let config: AdvantageConfig = config.into();
    if rewards.dtype() != DType::F32 {
        bail_unsupported!(OP, "rewards must be F32, got {:?}", rewards.dtype());
    }
    let (p, g) = match (rewards.dims(), weights) {
        (&[p, g], None) => (p, g),
        (&[k, p, g], Some(w)) if w.len() == k => (p, g),
        (dims, w) => bail_unsupported!(
            OP,
            "rewards must be [P, G] without weights or [K, P, G] with K weights; got {dims:?} and {} weights",
            w.map_or("no".to_string(), |w| w.len().to_string())
        ),
    };
    let rewards = rewards.contiguous()?;
    let (storage, layout) = rewards.storage_and_layout();
    let out: GroupAdvantages = match &*storage {
        Storage::Cpu(s) => {
            let values = host_slice::<f32>(s, layout, "rewards")?;
            let host = Rewards {
                values,
                weights,
                group_size: g,
            };
            op::group_advantages(&host, config).map_err(wrap)?
        }
        #[cfg(feature = "candle-cuda")]
        Storage::Cuda(s) => return cuda::run(s, layout, weights, g, config, p),
        _ => bail_unsupported!(
            OP,
            "rewards on an unsupported device (build with `candle-cuda` for CUDA)"
        ),
    };
    let dev = rewards.device();
    Ok(AdvantageTensors {
        advantages: Tensor::from_vec(out.advantages, (p, g), dev)?,
        rewards: Tensor::from_vec(out.rewards, (p, g), dev)?,
        group_mean: Tensor::from_vec(out.group_mean, p, dev)?,
        group_std: Tensor::from_vec(out.group_std, p, dev)?,
    })
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::op::BackpropOp;
    use candle_core::{Layout, Result, Shape, Storage, Tensor};

    use super::AdvantageTensors;
    use crate::candle::gpu::{checked, gpu, view};
    use crate::candle::wrap;
    use crate::cuda::{self as kernels, Device};
    use crate::ops::advantages::{AdvantageConfig, Rewards};

    pub fn run(
        storage: &CudaStorage,
        layout: &Layout,
        weights: Option<&[f32]>,
        group_size: usize,
        config: AdvantageConfig,
        prompts: usize,
    ) -> Result<AdvantageTensors> {
        let dev = &storage.device;
        let g = gpu(dev)?;
        let rewards = Rewards::<Device> {
            values: view(storage, layout, "rewards")?,
            weights,
            group_size,
        };
        let out = kernels::group_advantages(&g, &rewards, config).map_err(wrap)?;
        checked(&g)?;
        let tensor = |s: cudarc::driver::CudaSlice<f32>, shape: Shape| {
            let s = CudaStorage::wrap_cuda_slice(s, dev.clone());
            Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
        };
        Ok(AdvantageTensors {
            advantages: tensor(out.advantages, (prompts, group_size).into()),
            rewards: tensor(out.rewards, (prompts, group_size).into()),
            group_mean: tensor(out.group_mean, prompts.into()),
            group_std: tensor(out.group_std, prompts.into()),
        })
    }
}
