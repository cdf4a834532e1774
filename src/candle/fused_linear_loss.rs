//! [`fused_linear_policy_loss`](crate::fused_linear_policy_loss) on candle
//! tensors: the GRPO loss straight from hidden states and an LM head, one
//! `CustomOp2` on `(hidden, weight)` whose forward already computes `dh`
//! and `dW` (the three matrix products of [`crate::ops::fused_linear_loss`])
//! and keeps them for `loss.backward()`, which then does no work beyond
//! scaling them by the loss's upstream gradient (none when it is 1, as for
//! `loss.backward()` itself). This is how Liger-Kernel's
//! `LigerFusedLinearGRPOLoss` works in PyTorch: its `forward` computes the
//! gradients and its `backward` returns them.
//!
//! Only the loss is differentiable: the log-probs, entropies, per-token
//! terms and statistics the op also returns carry no gradient (gradients
//! reaching them are ignored). The gradients are held by the graph from the
//! forward until the backward takes them (the size of `hidden` and
//! `weight`); a forward only (evaluation) should use `fused_linear_logprobs`
//! and `policy_loss`, which skip the two gradient products. A second
//! backward through the same graph recomputes the pass.
//!
//! CPU only for now: on CUDA tensors the op is candle's "no cuda
//! implementation" error (the CUDA kernels of `crate::cuda::fused_linear_loss`
//! are not wired into candle yet).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::logprob::{with_host_rows, TokenLogProbsInputs};
use super::policy_loss::{capture, Captured, HostInputs, PolicyLossTensors, Sequences};
use super::{host_slice, same_device, wrap, HostIds};
use crate::element::{Float, TokenId};
use crate::ops::fused_linear::LinearRows;
use crate::ops::fused_linear_loss::{self as op, FusedLossConfig, LinearLossInputs, OP};
use crate::ops::layout::SeqLayout;
use crate::ops::policy_loss::{Advantage, PolicyLossStats};
use crate::Error;

/// Outputs of [`fused_linear_policy_loss`].
#[derive(Debug, Clone)]
pub struct FusedLossOutput {
    /// The aggregated loss, a scalar F32 tensor, differentiable with
    /// respect to `hidden` and `weight`.
    pub loss: Tensor,
    /// Log-probs of the targets, F32 shaped like `targets` (no gradient).
    pub logp: Tensor,
    /// Entropies, when `cfg.logprob.entropy` (no gradient).
    pub entropy: Option<Tensor>,
    /// `m_t l_t`, F32 shaped like `targets` (no gradient).
    pub per_token: Tensor,
    /// Clip fractions, mean ratio, mean KL, token count.
    pub stats: PolicyLossStats,
}

/// The GRPO policy loss of `softmax(hidden W^T / T)`'s log-probs at
/// `targets`, in one pass of three matrix products whose gradients
/// `loss.backward()` returns (see [`crate::fused_linear_policy_loss`] for
/// the formula, the aggregations it fuses and why GSPO is refused).
///
/// `hidden` is `[S, T, H]` (padded; `targets` `[S, T]`) or `[N, H]` with
/// `inputs.cu_seqlens` (packed; `targets` `[N]`), `weight` `[V, H]` (no
/// bias), both F32, BF16 or F16 of one dtype; `targets` U32 or I64; the
/// other inputs as [`super::policy_loss()`] takes them, shaped like `targets`
/// (`inputs.mask` also skips the rows of the LM head).
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor, Var};
/// use grpo_kernels::candle::{fused_linear_policy_loss, PolicyLossTensors};
/// use grpo_kernels::FusedLossConfig;
/// let dev = Device::Cpu;
/// let hidden = Var::randn(0f32, 1., (2, 3, 8), &dev)?;
/// let weight = Var::randn(0f32, 0.3, (17, 8), &dev)?;
/// let targets = Tensor::new(&[[1u32, 2, 3], [4, 5, 16]], &dev)?;
/// let adv = Tensor::new(&[1.0f32, -1.0], &dev)?;
/// let inputs = PolicyLossTensors { old_logp: None, ref_logp: None, advantages: &adv, mask: None, pg_weights: None, cu_seqlens: None };
/// let out = fused_linear_policy_loss(&hidden, &weight, &targets, &inputs, &FusedLossConfig::default())?;
/// let grads = out.loss.backward()?;
/// assert_eq!(grads.get(&weight).unwrap().dims(), &[17, 8]);
/// # Ok(()) }
/// ```
pub fn fused_linear_policy_loss(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    inputs: &PolicyLossTensors<'_>,
    cfg: &FusedLossConfig,
) -> Result<FusedLossOutput> {
    if inputs.pg_weights.is_some() {
        return Err(wrap(Error::Unsupported {
            op: OP,
            reason: "pg_weights: use fused_linear_logprobs + policy_loss".into(),
        }));
    }
    let (vocab, h) = weight.dims2()?;
    let shape = targets.shape().clone();
    if hidden.dims().last() != Some(&h)
        || hidden.dims()[..hidden.rank() - 1] != *shape.dims()
        || hidden.dtype() != weight.dtype()
    {
        return Err(wrap(Error::Unsupported {
            op: OP,
            reason: format!(
                "hidden {:?} {:?} must be targets' shape {:?} plus weight's last dimension, \
                 of weight's dtype (weight {:?} {:?})",
                hidden.dims(),
                hidden.dtype(),
                shape.dims(),
                weight.dims(),
                weight.dtype()
            ),
        }));
    }
    let layout = match (targets.rank(), inputs.cu_seqlens) {
        (2, None) => Sequences::Padded {
            batch: shape.dims()[0],
            seq_len: shape.dims()[1],
        },
        (1, Some(cu)) => Sequences::Packed(capture(cu, "cu_seqlens", DType::U32)?),
        (r, cu) => {
            return Err(wrap(Error::Unsupported {
                op: OP,
                reason: format!(
                "targets must be [S, T] (padded) or [N] with cu_seqlens (packed); got rank {r} {} cu_seqlens",
                if cu.is_some() { "with" } else { "without" }
            ),
            }))
        }
    };
    let mut named = vec![
        ("weight", weight),
        ("targets", targets),
        ("advantages", inputs.advantages),
    ];
    named.extend(inputs.old_logp.map(|t| ("old_logp", t)));
    named.extend(inputs.ref_logp.map(|t| ("ref_logp", t)));
    named.extend(inputs.mask.map(|t| ("mask", t)));
    same_device(hidden.device(), OP, &named)?;
    let n = shape.elem_count();
    let per_token_adv = inputs.advantages.elem_count() == n && inputs.advantages.rank() == targets.rank();
    let fwd = FusedLoss {
        rows: TokenLogProbsInputs {
            targets: targets.contiguous()?.flatten_all()?,
            mask: inputs.mask.map(|m| capture(m, "mask", DType::U8)).transpose()?,
            cfg: cfg.logprob,
            vocab,
        },
        captured: Arc::new(Captured {
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
            pg_weights: None,
            // The rows' mask above is the loss's mask.
            mask: None,
            layout,
            cfg: cfg.loss,
        }),
        cfg: *cfg,
        grads: Arc::new(Mutex::new(None)),
    };
    let hidden2 = hidden.contiguous()?.reshape((n, h))?;
    let packed = hidden2.apply_op2(&weight.contiguous()?, fwd)?;
    let summary = packed.narrow(0, 0, PolicyLossStats::SUMMARY_LEN)?;
    let stats = PolicyLossStats::from_summary(&summary.to_vec1::<f32>()?);
    let row = |k: usize| {
        packed
            .narrow(0, PolicyLossStats::SUMMARY_LEN + k * n, n)?
            .reshape(shape.clone())
    };
    let entropy = cfg.logprob.entropy;
    Ok(FusedLossOutput {
        loss: summary.get(PolicyLossStats::LOSS)?,
        logp: row(0)?.detach(),
        entropy: if entropy { Some(row(1)?.detach()) } else { None },
        per_token: row(1 + entropy as usize)?.detach(),
        stats,
    })
}

/// The forward op: everything but `hidden` and `weight` captured; the
/// gradients it computes wait in `grads` (`[dhidden; dweight]`, in the
/// inputs' dtype) for the backward.
#[derive(Clone)]
struct FusedLoss {
    rows: TokenLogProbsInputs,
    captured: Arc<Captured>,
    cfg: FusedLossConfig,
    grads: Arc<Mutex<Option<CpuStorage>>>,
}

/// The backward op: hands over the gradients the forward kept (or, when a
/// second backward finds them taken, runs the pass again).
struct TakeGrads(FusedLoss);

impl FusedLoss {
    /// Runs the CPU op; returns the packed F32 outputs `[summary; logp;
    /// entropy?; per_token]` and the packed gradients `[dhidden; dweight]`.
    fn run<T: Float + candle_core::WithDType>(
        &self,
        hidden: &[T],
        weight: &[T],
    ) -> Result<(Vec<f32>, CpuStorage)> {
        let host = self.captured.host()?;
        let hidden_size = weight.len() / self.rows.vocab.max(1);
        with_host_rows(&self.rows, |ids, mask| match ids {
            HostIds::U32(targets) => self.go(
                LinearRows {
                    hidden,
                    weight,
                    bias: None,
                    targets,
                    mask,
                    hidden_size,
                },
                &host,
            ),
            HostIds::I64(targets) => self.go(
                LinearRows {
                    hidden,
                    weight,
                    bias: None,
                    targets,
                    mask,
                    hidden_size,
                },
                &host,
            ),
        })
    }

    fn go<'a, T: Float + candle_core::WithDType, I: TokenId>(
        &self,
        rows: LinearRows<'a, T, I>,
        host: &'a HostInputs,
    ) -> Result<(Vec<f32>, CpuStorage)> {
        let layout = match (&self.captured.layout, &host.cu_seqlens) {
            (&Sequences::Padded { batch, seq_len }, _) => SeqLayout::Padded { batch, seq_len },
            (Sequences::Packed(_), cu) => SeqLayout::Packed {
                cu_seqlens: cu.as_deref().unwrap_or_default(),
            },
        };
        let advantages = if self.captured.per_token_adv {
            Advantage::PerToken(&host.advantages[..])
        } else {
            Advantage::PerSequence(&host.advantages[..])
        };
        let inputs = LinearLossInputs {
            rows,
            old_logp: host.old.as_deref(),
            ref_logp: host.reference.as_deref(),
            advantages,
            layout,
        };
        let out = op::fused_linear_policy_loss(&inputs, &self.cfg).map_err(wrap)?;
        let mut packed = out.summary;
        packed.extend_from_slice(&out.logp);
        if let Some(e) = &out.entropy {
            packed.extend_from_slice(e);
        }
        packed.extend_from_slice(&out.per_token);
        let mut grads = out.grads.hidden;
        grads.extend_from_slice(&out.grads.weight);
        Ok((packed, T::to_cpu_storage_owned(grads)))
    }

    /// [`Self::run`] on the storages of `hidden` and `weight`.
    fn run_storages(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(Vec<f32>, CpuStorage)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.run(
                host_slice::<f32>(s1, l1, "hidden")?,
                host_slice::<f32>(s2, l2, "weight")?,
            ),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => self.run(
                host_slice::<half::bf16>(s1, l1, "hidden")?,
                host_slice::<half::bf16>(s2, l2, "weight")?,
            ),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => self.run(
                host_slice::<half::f16>(s1, l1, "hidden")?,
                host_slice::<half::f16>(s2, l2, "weight")?,
            ),
            _ => Err(wrap(Error::Unsupported {
                op: OP,
                reason: "hidden and weight must both be F32, BF16 or F16".into(),
            })),
        }
    }
}

impl CustomOp2 for FusedLoss {
    fn name(&self) -> &'static str {
        "grpo-fused-linear-policy-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (packed, grads) = self.run_storages(s1, l1, s2, l2)?;
        *self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: poisoned lock")))? = Some(grads);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res
            .get(PolicyLossStats::LOSS)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if !g.is_finite() {
            return Err(wrap(Error::NonFinite {
                op: OP,
                what: "grad_loss",
                index: 0,
            }));
        }
        let packed = hidden.apply_op2_no_bwd(weight, &TakeGrads(self.clone()))?;
        let nh = hidden.elem_count();
        let mut dhidden = packed.narrow(0, 0, nh)?.reshape(hidden.shape())?;
        let mut dweight = packed
            .narrow(0, nh, weight.elem_count())?
            .reshape(weight.shape())?;
        if g != 1.0 {
            dhidden = dhidden.affine(g as f64, 0.0)?;
            dweight = dweight.affine(g as f64, 0.0)?;
        }
        Ok((Some(dhidden), Some(dweight)))
    }
}

impl CustomOp2 for TakeGrads {
    fn name(&self) -> &'static str {
        "grpo-fused-linear-policy-loss-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let kept = self
            .0
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: poisoned lock")))?
            .take();
        let grads = match kept {
            Some(g) => g,
            None => self.0.run_storages(s1, l1, s2, l2)?.1,
        };
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        Ok((grads, Shape::from(len)))
    }
}
