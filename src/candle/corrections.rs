//! The corrections of [`crate::ops::corrections`] on candle tensors (CPU or
//! CUDA): TRL's sampler importance weights, the off-policy sequence mask,
//! the high-entropy token mask, and truncated-completion masking. Each
//! returns a detached F32 weight tensor shaped like its first input
//! (`[S, T]` padded, or `[N]` packed with `cu_seqlens`): the ops are applied
//! without a backward, as TRL computes them from detached tensors. Multiply
//! the results together (`w1 * w2`) and pass the product to the policy
//! loss's per-token `pg_weights`.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::{host_slice, same_device, with_cpu, wrap};
use crate::ops::corrections::{
    self as op, SamplerIsConfig, SamplerIsStats, SamplerLogps, OP_ENTROPY, OP_IS, OP_OPSM, OP_TRUNCATED,
};
use crate::ops::layout::SeqLayout;

/// The trainer's and the sampler's log-probs with their mask and layout
/// (F32 unless noted, on one device).
#[derive(Debug, Clone, Copy)]
pub struct SamplerLogpTensors<'a> {
    /// The trainer's log-probs (`old_logp` for the IS weights, the current
    /// detached `logp` for OPSM), `[S, T]` padded or `[N]` packed.
    pub logp: &'a Tensor,
    /// The sampler's log-probs, shaped like `logp`; NaN where not scored.
    pub sampler_logp: &'a Tensor,
    /// U8, shaped like `logp`; 0 = padding.
    pub mask: Option<&'a Tensor>,
    /// U32 `[S + 1]` offsets when `logp` is packed `[N]`; `None` when padded.
    pub cu_seqlens: Option<&'a Tensor>,
}

/// TRL's sampler importance weights ([`crate::sampler_is_weights`]), shaped
/// like `inputs.logp`, detached, with TRL's statistics.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use grpo_kernels::candle::{high_entropy_mask, off_policy_mask, sampler_is_weights, SamplerLogpTensors};
/// use grpo_kernels::SamplerIsConfig;
/// let dev = Device::Cpu;
/// let old = Tensor::new(&[[-1.0f32, -0.5], [-2.0, -0.3]], &dev)?;
/// let sampler = Tensor::new(&[[-1.1f32, f32::NAN], [-1.8, -0.3]], &dev)?;
/// let logp = old.clone(); // one update per batch
/// let entropy = Tensor::new(&[[0.3f32, 1.2], [0.8, 2.0]], &dev)?;
/// let adv = Tensor::new(&[1.0f32, -1.0], &dev)?;
/// let is = SamplerLogpTensors { logp: &old, sampler_logp: &sampler, mask: None, cu_seqlens: None };
/// let (w_is, _stats) = sampler_is_weights(&is, &SamplerIsConfig::default())?;
/// let w_opsm = off_policy_mask(&SamplerLogpTensors { logp: &logp, ..is }, &adv, 0.5)?;
/// let w_ent = high_entropy_mask(&entropy, None, 0.5)?;
/// let pg_weights = ((w_is * w_opsm)? * w_ent)?; // [2, 2], detached
/// assert_eq!(pg_weights.dims(), &[2, 2]);
/// # Ok(()) }
/// ```
pub fn sampler_is_weights(
    inputs: &SamplerLogpTensors<'_>,
    cfg: &SamplerIsConfig,
) -> Result<(Tensor, SamplerIsStats)> {
    let op = CorrectionOp::new(OP_IS, Kind::SamplerIs(*cfg), inputs)?;
    let w = apply(inputs.logp, &op)?;
    let stats = op.stats.lock().unwrap().unwrap_or_default();
    Ok((w, stats))
}

/// The off-policy sequence mask ([`crate::off_policy_mask`]): 0/1 shaped
/// like `inputs.logp`, detached; `advantages` F32 `[S]`.
pub fn off_policy_mask(
    inputs: &SamplerLogpTensors<'_>,
    advantages: &Tensor,
    threshold: f32,
) -> Result<Tensor> {
    same_device(inputs.logp.device(), OP_OPSM, &[("advantages", advantages)])?;
    let advantages = typed(advantages, "advantages", DType::F32)?;
    let op = CorrectionOp::new(
        OP_OPSM,
        Kind::OffPolicy {
            threshold,
            advantages,
        },
        inputs,
    )?;
    apply(inputs.logp, &op)
}

/// The high-entropy token mask ([`crate::high_entropy_mask`], TRL's
/// `top_entropy_quantile = top_quantile`): 0/1 shaped like `entropy` (F32,
/// any shape), detached; `mask` U8 of the same shape.
pub fn high_entropy_mask(entropy: &Tensor, mask: Option<&Tensor>, top_quantile: f64) -> Result<Tensor> {
    let inputs = SamplerLogpTensors {
        logp: entropy,
        sampler_logp: entropy,
        mask,
        cu_seqlens: None,
    };
    let op = CorrectionOp::new(OP_ENTROPY, Kind::Entropy { top_quantile }, &inputs)?;
    apply(entropy, &op)
}

/// TRL's `mask_truncated_completions` ([`crate::mask_truncated_completions`])
/// on `mask` (U8, `[S, T]` padded, or `[N]` with `cu_seqlens`) given the
/// token ids (U32 or I64, shaped like `mask`): the new mask, on `mask`'s
/// device. Integer preprocessing run once per batch: it goes through the
/// host on every device.
pub fn mask_truncated_completions(
    token_ids: &Tensor,
    mask: &Tensor,
    cu_seqlens: Option<&Tensor>,
    stop_ids: &[i64],
) -> Result<Tensor> {
    let layout = sequences(OP_TRUNCATED, mask, cu_seqlens)?;
    if token_ids.shape() != mask.shape() {
        bail_unsupported!(
            OP_TRUNCATED,
            "token_ids {:?} and mask {:?} differ",
            token_ids.dims(),
            mask.dims()
        );
    }
    let ids: Vec<i64> = match token_ids.dtype() {
        DType::U32 => token_ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::I64 => token_ids.flatten_all()?.to_vec1::<i64>()?,
        d => bail_unsupported!(OP_TRUNCATED, "token_ids must be U32 or I64, got {d:?}"),
    };
    let mut m = typed(mask, "mask", DType::U8)?.to_vec1::<u8>()?;
    let cu = match &layout {
        Sequences::Packed(t) => Some(t.to_vec1::<u32>()?),
        Sequences::Padded { .. } => None,
    };
    let seq_layout = host_layout(&layout, cu.as_deref());
    op::mask_truncated_completions(&ids, &seq_layout, stop_ids, &mut m).map_err(wrap)?;
    Tensor::from_vec(m, mask.shape().clone(), mask.device())
}

/// A tensor flattened and contiguous, checked for its dtype.
fn typed(t: &Tensor, what: &str, dtype: DType) -> Result<Tensor> {
    if t.dtype() != dtype {
        bail_unsupported!(super::LAYER, "`{what}` must be {dtype:?}, got {:?}", t.dtype());
    }
    t.contiguous()?.flatten_all()
}

/// The sequences of `x`: `[S, T]` padded, or `[N]` with `cu_seqlens`.
#[derive(Debug, Clone)]
enum Sequences {
    Padded { batch: usize, seq_len: usize },
    Packed(Tensor),
}

fn sequences(op: &'static str, x: &Tensor, cu_seqlens: Option<&Tensor>) -> Result<Sequences> {
    Ok(match (x.rank(), cu_seqlens) {
        (2, None) => Sequences::Padded {
            batch: x.dims()[0],
            seq_len: x.dims()[1],
        },
        (1, Some(cu)) => Sequences::Packed(typed(cu, "cu_seqlens", DType::U32)?),
        (r, cu) => bail_unsupported!(
            op,
            "inputs must be [S, T] (padded) or [N] with cu_seqlens (packed); got rank {r} {} cu_seqlens",
            if cu.is_some() { "with" } else { "without" }
        ),
    })
}

fn host_layout<'a>(s: &Sequences, cu: Option<&'a [u32]>) -> SeqLayout<'a> {
    match s {
        &Sequences::Padded { batch, seq_len } => SeqLayout::Padded { batch, seq_len },
        Sequences::Packed(_) => SeqLayout::Packed {
            cu_seqlens: cu.unwrap_or_default(),
        },
    }
}

#[derive(Debug, Clone)]
enum Kind {
    SamplerIs(SamplerIsConfig),
    /// `advantages`: F32 `[S]`, flattened.
    OffPolicy {
        threshold: f32,
        advantages: Tensor,
    },
    Entropy {
        top_quantile: f64,
    },
}

/// One correction on its first input (`logp` or `entropy`), the other
/// tensors captured; the IS statistics are left in `stats`.
struct CorrectionOp {
    op: &'static str,
    kind: Kind,
    sampler: Tensor,
    mask: Option<Tensor>,
    layout: Sequences,
    stats: Mutex<Option<SamplerIsStats>>,
}

impl CorrectionOp {
    fn new(op: &'static str, kind: Kind, inputs: &SamplerLogpTensors<'_>) -> Result<Self> {
        let x = inputs.logp;
        let mut named = vec![("sampler_logp", inputs.sampler_logp)];
        named.extend(inputs.mask.map(|t| ("mask", t)));
        named.extend(inputs.cu_seqlens.map(|t| ("cu_seqlens", t)));
        same_device(x.device(), op, &named)?;
        for (what, t) in [("sampler_logp", Some(inputs.sampler_logp)), ("mask", inputs.mask)] {
            if let Some(t) = t {
                if t.shape() != x.shape() {
                    bail_unsupported!(
                        op,
                        "`{what}` {:?} must be shaped like the input {:?}",
                        t.dims(),
                        x.dims()
                    );
                }
            }
        }
        let layout = match &kind {
            Kind::Entropy { .. } => Sequences::Padded {
                batch: 1,
                seq_len: x.elem_count(),
            },
            _ => sequences(op, x, inputs.cu_seqlens)?,
        };
        Ok(Self {
            op,
            kind,
            sampler: typed(inputs.sampler_logp, "sampler_logp", DType::F32)?,
            mask: inputs.mask.map(|t| typed(t, "mask", DType::U8)).transpose()?,
            layout,
            stats: Mutex::new(None),
        })
    }
}

/// A captured tensor's host copy.
fn read<T: candle_core::WithDType>(t: &Tensor, what: &str) -> Result<Vec<T>> {
    with_cpu(t, what, |s, l| Ok(host_slice::<T>(s, l, what)?.to_vec()))
}

impl CorrectionOp {
    /// Runs `f` on the CPU op's inputs over `x`.
    fn with_host<R>(
        &self,
        x: &[f32],
        mask: Option<&[u8]>,
        f: impl FnOnce(&SamplerLogps<'_>) -> Result<R>,
    ) -> Result<R> {
        let sampler = read::<f32>(&self.sampler, "sampler_logp")?;
        let cu = match &self.layout {
            Sequences::Packed(t) => Some(read::<u32>(t, "cu_seqlens")?),
            Sequences::Padded { .. } => None,
        };
        f(&SamplerLogps {
            logp: x,
            sampler_logp: &sampler[..],
            mask,
            layout: host_layout(&self.layout, cu.as_deref()),
        })
    }
}

/// `op` on `x` (F32), detached, shaped like `x`.
fn apply(x: &Tensor, op: &CorrectionOp) -> Result<Tensor> {
    if x.dtype() != DType::F32 {
        bail_unsupported!(op.op, "the input must be F32, got {:?}", x.dtype());
    }
    x.contiguous()?
        .flatten_all()?
        .apply_op1_no_bwd(op)?
        .reshape(x.shape())
}

impl CustomOp1 for CorrectionOp {
    fn name(&self) -> &'static str {
        match &self.kind {
            Kind::SamplerIs(_) => "grpo-sampler-is-weights",
            Kind::OffPolicy { .. } => "grpo-off-policy-mask",
            Kind::Entropy { .. } => "grpo-high-entropy-mask",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_slice::<f32>(storage, layout, "input")?;
        let mask = self.mask.as_ref().map(|t| read::<u8>(t, "mask")).transpose()?;
        let mask = mask.as_deref();
        let w = match &self.kind {
            Kind::Entropy { top_quantile } => op::high_entropy_mask(x, mask, *top_quantile).map_err(wrap)?.0,
            Kind::SamplerIs(cfg) => self.with_host(x, mask, |inputs| {
                let out = op::sampler_is_weights(inputs, cfg).map_err(wrap)?;
                *self.stats.lock().unwrap() = Some(out.stats);
                Ok(out.weights)
            })?,
            Kind::OffPolicy {
                threshold,
                advantages,
            } => {
                let adv = read::<f32>(advantages, "advantages")?;
                self.with_host(x, mask, |inputs| {
                    op::off_policy_mask(inputs, &adv, *threshold).map_err(wrap)
                })?
            }
        };
        let n = w.len();
        Ok((CpuStorage::F32(w), Shape::from(n)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, storage, layout)
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Shape, Tensor};
    use cudarc::driver::CudaView;

    use super::{CorrectionOp, Kind, Sequences};
    use crate::candle::gpu::{checked, gpu, view};
    use crate::candle::wrap;
    use crate::cuda::{self as kernels, Device};
    use crate::ops::corrections::SamplerLogps;
    use crate::ops::layout::SeqLayout;

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

    pub fn forward(
        op: &CorrectionOp,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &storage.device;
        let g = gpu(dev)?;
        let x: CudaView<'_, f32> = view(storage, layout, "input")?;
        let n = x.len();
        let mut w = g
            .stream()
            .clone_htod(&vec![1.0f32; n])
            .map_err(candle_core::Error::wrap)?;
        let mask = op.mask.as_ref().map(Tensor::storage_and_layout);
        let mask_view = mask.as_ref().map(|g| v::<u8>(&g.0, g.1, "mask")).transpose()?;
        if let Kind::Entropy { top_quantile } = op.kind {
            kernels::high_entropy_mask_into(&g, &x, mask_view.as_ref(), top_quantile, &mut w.as_view_mut())
                .map_err(wrap)?;
        } else {
            let sampler = op.sampler.storage_and_layout();
            let cu = match &op.layout {
                Sequences::Packed(t) => Some(t.storage_and_layout()),
                Sequences::Padded { .. } => None,
            };
            let inputs = SamplerLogps::<Device> {
                logp: x,
                sampler_logp: v::<f32>(&sampler.0, sampler.1, "sampler_logp")?,
                mask: mask_view,
                layout: match (&op.layout, &cu) {
                    (&Sequences::Padded { batch, seq_len }, _) => SeqLayout::Padded { batch, seq_len },
                    (Sequences::Packed(_), Some(g)) => SeqLayout::Packed {
                        cu_seqlens: v::<u32>(&g.0, g.1, "cu_seqlens")?,
                    },
                    (Sequences::Packed(_), None) => {
                        bail_unsupported!(crate::candle::LAYER, "cu_seqlens missing")
                    }
                },
            };
            match &op.kind {
                Kind::SamplerIs(cfg) => {
                    let stats = kernels::sampler_is_weights_into(&g, &inputs, cfg, &mut w.as_view_mut())
                        .map_err(wrap)?;
                    *op.stats.lock().unwrap() = Some(stats);
                }
                Kind::OffPolicy {
                    threshold,
                    advantages,
                } => {
                    let adv = advantages.storage_and_layout();
                    let adv = v::<f32>(&adv.0, adv.1, "advantages")?;
                    kernels::off_policy_mask_into(&g, &inputs, &adv, *threshold, &mut w.as_view_mut())
                        .map_err(wrap)?;
                }
                Kind::Entropy { .. } => {}
            }
        }
        checked(&g)?;
        Ok((CudaStorage::wrap_cuda_slice(w, dev.clone()), Shape::from(n)))
    }
}
