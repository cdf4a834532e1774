//! [`policy_loss`] on candle tensors: one `CustomOp1` on the current
//! log-probs whose output packs `[per-token losses (N); summary]`, so the
//! loss (and the per-token terms) flow back to `logp` through this crate's
//! backward (the math of [`crate::ops::policy_loss`]). The summary's
//! statistics are not differentiable: gradients reaching them are ignored.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::{host_slice, same_device, with_cpu, wrap};
use crate::ops::layout::SeqLayout;
use crate::ops::policy_loss::{
    self as op, Advantage, PolicyLossConfig, PolicyLossInputs, PolicyLossStats, OP,
};

/// The tensors beside `logp` (all F32 unless noted, on `logp`'s device).
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossTensors<'a> {
    /// Log-probs under the policy that sampled, shaped like `logp`; `None`:
    /// the detached current log-probs (one update per batch).
    pub old_logp: Option<&'a Tensor>,
    /// Log-probs under the reference policy, shaped like `logp`; needed
    /// when `beta > 0`.
    pub ref_logp: Option<&'a Tensor>,
    /// `[S]` one per sequence, or shaped like `logp` (one per token).
    pub advantages: &'a Tensor,
    /// U8, shaped like `logp`; 0 drops the token.
    pub mask: Option<&'a Tensor>,
    /// Detached weights of the policy-gradient term, shaped like `logp`,
    /// finite and `>= 0` at masked-in tokens (TRL's off-policy and entropy
    /// masks, vLLM importance-sampling ratio); `None`: 1.
    pub pg_weights: Option<&'a Tensor>,
    /// U32 `[S + 1]` offsets when `logp` is packed `[N]`; `None` when `logp`
    /// is padded `[S, T]`.
    pub cu_seqlens: Option<&'a Tensor>,
}

/// Outputs of [`policy_loss`].
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    /// The aggregated loss, a scalar F32 tensor, differentiable in `logp`.
    pub loss: Tensor,
    /// `m_t l_t` shaped like `logp`, differentiable in `logp`.
    pub per_token: Tensor,
    /// Clip fractions, mean ratio, mean KL, token count (read back to the host).
    pub stats: PolicyLossStats,
}

/// The clipped GRPO/PPO policy loss of `logp` (`[S, T]` padded or `[N]`
/// packed, F32): see [`crate::policy_loss`] for the formula and options.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor, Var};
/// use grpo_kernels::candle::{policy_loss, PolicyLossTensors};
/// use grpo_kernels::PolicyLossConfig;
/// let dev = Device::Cpu;
/// let logp = Var::from_tensor(&(Tensor::randn(0f32, 0.1, (2, 4), &dev)? - 1.0)?)?;
/// let adv = Tensor::new(&[1.0f32, -1.0], &dev)?;
/// let inputs = PolicyLossTensors {
///     old_logp: None,
///     ref_logp: None,
///     advantages: &adv,
///     mask: None,
///     pg_weights: None,
///     cu_seqlens: None,
/// };
/// let cfg = PolicyLossConfig { beta: 0.0, ..Default::default() };
/// let out = policy_loss(&logp, &inputs, &cfg)?;
/// let grads = out.loss.backward()?;
/// assert_eq!(grads.get(&logp).unwrap().dims(), &[2, 4]);
/// # Ok(()) }
/// ```
pub fn policy_loss(
    logp: &Tensor,
    inputs: &PolicyLossTensors<'_>,
    cfg: &PolicyLossConfig,
) -> Result<PolicyLossOutput> {
    let shape = logp.shape().clone();
    let layout = match (logp.rank(), inputs.cu_seqlens) {
        (2, None) => Sequences::Padded {
            batch: shape.dims()[0],
            seq_len: shape.dims()[1],
        },
        (1, Some(cu)) => Sequences::Packed(capture(cu, "cu_seqlens", DType::U32)?),
        (r, cu) => bail_unsupported!(
            OP,
            "logp must be [S, T] (padded) or [N] with cu_seqlens (packed); got rank {r} {} cu_seqlens",
            if cu.is_some() { "with" } else { "without" }
        ),
    };
    let mut named = vec![("advantages", inputs.advantages)];
    named.extend(inputs.old_logp.map(|t| ("old_logp", t)));
    named.extend(inputs.ref_logp.map(|t| ("ref_logp", t)));
    named.extend(inputs.mask.map(|t| ("mask", t)));
    named.extend(inputs.pg_weights.map(|t| ("pg_weights", t)));
    same_device(logp.device(), OP, &named)?;
    let n = shape.elem_count();
    let per_token_adv = inputs.advantages.elem_count() == n && inputs.advantages.rank() == logp.rank();
    let fwd = PolicyLossOp {
        captured: std::sync::Arc::new(Captured {
            old: inputs
                .old_logp
                .map(|t| capture(t, "old_logp", DType::F32))
                .transpose()?,
            reference: inputs
                .ref_logp
                .map(|t| capture(t, "ref_logp", DType::F32))
                .transpose()?,
            advantages: capture(inputs.advantages, "advantages", DType::F32)?,
            per_token_adv,
            mask: inputs.mask.map(|t| capture(t, "mask", DType::U8)).transpose()?,
            pg_weights: inputs
                .pg_weights
                .map(|t| capture(t, "pg_weights", DType::F32))
                .transpose()?,
            layout,
            cfg: *cfg,
        }),
    };
    let packed = logp.contiguous()?.flatten_all()?.apply_op1(fwd)?;
    let summary = packed.narrow(0, n, PolicyLossStats::SUMMARY_LEN)?;
    let stats = PolicyLossStats::from_summary(&summary.to_vec1::<f32>()?);
    Ok(PolicyLossOutput {
        loss: summary.get(PolicyLossStats::LOSS)?,
        per_token: packed.narrow(0, 0, n)?.reshape(shape)?,
        stats,
    })
}

/// A captured input, flattened and contiguous, checked for its dtype.
pub(super) fn capture(t: &Tensor, what: &str, dtype: DType) -> Result<Tensor> {
    if t.dtype() != dtype {
        bail_unsupported!(OP, "`{what}` must be {dtype:?}, got {:?}", t.dtype());
    }
    t.contiguous()?.flatten_all()
}

/// The sequence layout, with the packed offsets captured as a tensor.
#[derive(Debug, Clone)]
pub(super) enum Sequences {
    Padded { batch: usize, seq_len: usize },
    Packed(Tensor),
}

/// Everything the forward and backward ops hold besides `logp`.
#[derive(Debug)]
pub(super) struct Captured {
    pub(super) old: Option<Tensor>,
    pub(super) reference: Option<Tensor>,
    pub(super) advantages: Tensor,
    pub(super) per_token_adv: bool,
    pub(super) mask: Option<Tensor>,
    pub(super) pg_weights: Option<Tensor>,
    pub(super) layout: Sequences,
    pub(super) cfg: PolicyLossConfig,
}

struct PolicyLossOp {
    captured: std::sync::Arc<Captured>,
}

/// `dlogp` from the gradient of the packed output (and, on CUDA, the
/// forward's summary, whose token count normalizes `TokenMean`).
struct PolicyLossBackward {
    captured: std::sync::Arc<Captured>,
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    packed: Tensor,
    grad: Tensor,
}

/// Host copies of the captured tensors (F32 / U8 / U32).
pub(super) struct HostInputs {
    pub(super) old: Option<Vec<f32>>,
    pub(super) reference: Option<Vec<f32>>,
    pub(super) advantages: Vec<f32>,
    pub(super) mask: Option<Vec<u8>>,
    pub(super) pg_weights: Option<Vec<f32>>,
    /// Read when packed.
    pub(super) cu_seqlens: Option<Vec<u32>>,
}

impl Captured {
    pub(super) fn host(&self) -> Result<HostInputs> {
        fn read<T: candle_core::WithDType>(t: &Tensor, what: &str) -> Result<Vec<T>> {
            with_cpu(t, what, |s, l| Ok(host_slice::<T>(s, l, what)?.to_vec()))
        }
        Ok(HostInputs {
            old: self.old.as_ref().map(|t| read(t, "old_logp")).transpose()?,
            reference: self.reference.as_ref().map(|t| read(t, "ref_logp")).transpose()?,
            advantages: read(&self.advantages, "advantages")?,
            mask: self.mask.as_ref().map(|t| read(t, "mask")).transpose()?,
            pg_weights: self
                .pg_weights
                .as_ref()
                .map(|t| read(t, "pg_weights"))
                .transpose()?,
            cu_seqlens: match &self.layout {
                Sequences::Packed(t) => Some(read(t, "cu_seqlens")?),
                Sequences::Padded { .. } => None,
            },
        })
    }

    /// Runs `f` on the CPU op's inputs over `logp`.
    fn with_inputs<R>(&self, logp: &[f32], f: impl FnOnce(&PolicyLossInputs<'_>) -> Result<R>) -> Result<R> {
        let host = self.host()?;
        let layout = match (&self.layout, &host.cu_seqlens) {
            (&Sequences::Padded { batch, seq_len }, _) => SeqLayout::Padded { batch, seq_len },
            (Sequences::Packed(_), cu) => SeqLayout::Packed {
                cu_seqlens: cu.as_deref().unwrap_or_default(),
            },
        };
        let advantages = if self.per_token_adv {
            Advantage::PerToken(&host.advantages[..])
        } else {
            Advantage::PerSequence(&host.advantages[..])
        };
        f(&PolicyLossInputs {
            logp,
            old_logp: host.old.as_deref(),
            ref_logp: host.reference.as_deref(),
            advantages,
            mask: host.mask.as_deref(),
            pg_weights: host.pg_weights.as_deref(),
            layout,
        })
    }
}

fn f32_input<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(_) => host_slice::<f32>(storage, layout, "logp"),
        other => bail_unsupported!(
            OP,
            "logp must be F32, got {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

impl CustomOp1 for PolicyLossOp {
    fn name(&self) -> &'static str {
        "grpo-policy-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logp = f32_input(storage, layout)?;
        let out = self.captured.with_inputs(logp, |inputs| {
            op::policy_loss(inputs, &self.captured.cfg).map_err(wrap)
        })?;
        let mut packed = out.per_token;
        packed.extend_from_slice(&out.summary);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(&self.captured, storage, layout)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let bwd = PolicyLossBackward {
            captured: self.captured.clone(),
            packed: res.contiguous()?,
            grad: grad_res.contiguous()?,
        };
        Ok(Some(arg.apply_op1_no_bwd(&bwd)?))
    }
}

impl CustomOp1 for PolicyLossBackward {
    fn name(&self) -> &'static str {
        "grpo-policy-loss-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logp = f32_input(storage, layout)?;
        let n = logp.len();
        let grad = with_cpu(&self.grad, "grad", |s, l| {
            Ok(host_slice::<f32>(s, l, "grad")?.to_vec())
        })?;
        let grad_loss = grad[n + PolicyLossStats::LOSS];
        let dlogp = self.captured.with_inputs(logp, |inputs| {
            op::policy_loss_backward(inputs, &self.captured.cfg, grad_loss, Some(&grad[..n])).map_err(wrap)
        })?;
        Ok((CpuStorage::F32(dlogp), layout.shape().clone()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(self, storage, layout)
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Shape, Tensor};
    use cudarc::driver::CudaView;

    use super::{Captured, PolicyLossBackward, Sequences};
    use crate::candle::gpu::{checked, gpu, view};
    use crate::candle::wrap;
    use crate::cuda::{self as kernels, Device};
    use crate::ops::layout::SeqLayout;
    use crate::ops::policy_loss::{Advantage, PolicyLossInputs, PolicyLossStats};

    /// Runs `f` on the kernels' inputs over `logp`, from the captured CUDA tensors.
    fn with_inputs<R>(
        c: &Captured,
        logp: CudaView<'_, f32>,
        f: impl FnOnce(&PolicyLossInputs<'_, Device>) -> Result<R>,
    ) -> Result<R> {
        // A typed view of a guarded storage.
        fn v<'a, T: candle_core::cuda_backend::CudaDType>(
            storage: &'a candle_core::Storage,
            layout: &Layout,
            what: &str,
        ) -> Result<CudaView<'a, T>> {
            match storage {
                candle_core::Storage::Cuda(s) => view(s, layout, what),
                _ => bail_unsupported!(crate::candle::LAYER, "{what} is not on a CUDA device"),
            }
        }
        let old = c.old.as_ref().map(Tensor::storage_and_layout);
        let reference = c.reference.as_ref().map(Tensor::storage_and_layout);
        let adv = c.advantages.storage_and_layout();
        let mask = c.mask.as_ref().map(Tensor::storage_and_layout);
        let pg_weights = c.pg_weights.as_ref().map(Tensor::storage_and_layout);
        let cu = match &c.layout {
            Sequences::Packed(t) => Some(t.storage_and_layout()),
            Sequences::Padded { .. } => None,
        };
        let adv_view = v::<f32>(&adv.0, adv.1, "advantages")?;
        let inputs = PolicyLossInputs::<Device> {
            logp,
            old_logp: old
                .as_ref()
                .map(|g| v::<f32>(&g.0, g.1, "old_logp"))
                .transpose()?,
            ref_logp: reference
                .as_ref()
                .map(|g| v::<f32>(&g.0, g.1, "ref_logp"))
                .transpose()?,
            advantages: if c.per_token_adv {
                Advantage::PerToken(adv_view)
            } else {
                Advantage::PerSequence(adv_view)
            },
            mask: mask.as_ref().map(|g| v::<u8>(&g.0, g.1, "mask")).transpose()?,
            pg_weights: pg_weights
                .as_ref()
                .map(|g| v::<f32>(&g.0, g.1, "pg_weights"))
                .transpose()?,
            layout: match (&c.layout, &cu) {
                (&Sequences::Padded { batch, seq_len }, _) => SeqLayout::Padded { batch, seq_len },
                (Sequences::Packed(_), Some(g)) => SeqLayout::Packed {
                    cu_seqlens: v::<u32>(&g.0, g.1, "cu_seqlens")?,
                },
                (Sequences::Packed(_), None) => bail_unsupported!(crate::candle::LAYER, "cu_seqlens missing"),
            },
        };
        f(&inputs)
    }

    pub fn forward(c: &Captured, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &storage.device;
        let g = gpu(dev)?;
        let logp: CudaView<'_, f32> = view(storage, layout, "logp")?;
        let n = logp.len();
        let out = with_inputs(c, logp, |inputs| {
            kernels::policy_loss(&g, inputs, &c.cfg).map_err(wrap)
        })?;
        // Pack [per-token; summary] like the CPU op.
        let stream = g.stream();
        let mut packed = stream
            .alloc_zeros::<f32>(n + PolicyLossStats::SUMMARY_LEN)
            .map_err(candle_core::Error::wrap)?;
        stream
            .memcpy_dtod(&out.per_token, &mut packed.slice_mut(0..n))
            .map_err(candle_core::Error::wrap)?;
        stream
            .memcpy_dtod(&out.summary, &mut packed.slice_mut(n..))
            .map_err(candle_core::Error::wrap)?;
        checked(&g)?;
        Ok((
            CudaStorage::wrap_cuda_slice(packed, dev.clone()),
            Shape::from(n + PolicyLossStats::SUMMARY_LEN),
        ))
    }

    pub fn backward(
        op: &PolicyLossBackward,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &storage.device;
        let g = gpu(dev)?;
        let logp: CudaView<'_, f32> = view(storage, layout, "logp")?;
        let n = logp.len();
        let (packed, grad) = (op.packed.storage_and_layout(), op.grad.storage_and_layout());
        let (candle_core::Storage::Cuda(ps), candle_core::Storage::Cuda(gs)) = (&*packed.0, &*grad.0) else {
            bail_unsupported!(
                crate::ops::policy_loss::OP_BWD,
                "saved output and gradient must be on the CUDA device"
            );
        };
        let packed_view: CudaView<'_, f32> = view(ps, packed.1, "saved")?;
        let grad_view: CudaView<'_, f32> = view(gs, grad.1, "grad")?;
        let summary = packed_view.slice(n..n + PolicyLossStats::SUMMARY_LEN);
        let grad_loss = grad_view.slice(n + PolicyLossStats::LOSS..n + PolicyLossStats::LOSS + 1);
        let grad_per_token = grad_view.slice(0..n);
        let dlogp = with_inputs(&op.captured, logp, |inputs| {
            kernels::policy_loss_backward(
                &g,
                inputs,
                &op.captured.cfg,
                &summary,
                &grad_loss,
                Some(&grad_per_token),
            )
            .map_err(wrap)
        })?;
        checked(&g)?;
        Ok((
            CudaStorage::wrap_cuda_slice(dlogp, dev.clone()),
            layout.shape().clone(),
        ))
    }
}
