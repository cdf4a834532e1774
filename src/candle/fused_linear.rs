//! [`fused_linear_logprobs`] on candle tensors: token log-probs straight from
//! hidden states and an LM head, never holding `[N, V]` logits. One
//! `CustomOp2` on `(hidden, weight)` whose output packs `[logp; entropy;
//! lse]` as `[3, N]`; its backward recomputes logits tile by tile (the math
//! of [`crate::ops::fused_linear`]) and returns both `dhidden` and `dweight`.
//! On CUDA tensors both passes run `crate::cuda::fused_linear`'s cuBLAS
//! tiles (feature `candle-cuda`), where [`FusedLinearConfig::gpu`]'s chunk
//! sizes suit the GPU far better than the CPU-tuned default.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::logprob::{pack, with_host_grads, with_host_rows, LogProbTensors, TokenLogProbsInputs};
use super::{host_slice, same_device, wrap, HostIds};
use crate::element::Float;
use crate::ops::fused_linear::{self as op, FusedLinearConfig, LinearRows, OP};
use crate::ops::logprob::{LogProbGrads, LogProbSaved};

/// Token log-probs of `softmax(hidden W^T / T)` at `targets`: `hidden` is
/// `[..., H]`, `weight` `[V, H]` (PyTorch's `lm_head.weight` layout, no
/// bias), both F32, BF16 or F16 of one dtype; `targets` `[...]` U32 or I64;
/// `mask` `[...]` U8 (0 = skip). Outputs are F32 shaped like `targets`.
/// Differentiable with respect to `hidden` and `weight`; see
/// [`crate::fused_linear_logprobs`] for the math and the chunking.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor, Var};
/// use grpo_kernels::{candle::fused_linear_logprobs, FusedLinearConfig};
/// let dev = Device::Cpu;
/// let hidden = Var::randn(0f32, 1., (2, 3, 8), &dev)?;
/// let weight = Var::randn(0f32, 0.3, (17, 8), &dev)?;
/// let targets = Tensor::new(&[[1u32, 2, 3], [4, 5, 16]], &dev)?;
/// let out = fused_linear_logprobs(&hidden, &weight, &targets, None, &FusedLinearConfig::default())?;
/// let grads = out.logp.sum_all()?.backward()?;
/// assert_eq!(grads.get(&weight).unwrap().dims(), &[17, 8]);
/// # Ok(()) }
/// ```
pub fn fused_linear_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    cfg: &FusedLinearConfig,
) -> Result<LogProbTensors> {
    let (vocab, h) = weight.dims2()?;
    let lead = hidden.dims()[..hidden.rank().saturating_sub(1)].to_vec();
    if hidden.dims().last() != Some(&h) || hidden.dtype() != weight.dtype() {
        bail_unsupported!(
            OP,
            "hidden {:?} {:?} and weight {:?} {:?} must share the last dimension and dtype",
            hidden.dims(),
            hidden.dtype(),
            weight.dims(),
            weight.dtype()
        );
    }
    same_device(hidden.device(), OP, &[("weight", weight), ("targets", targets)])?;
    if let Some(m) = mask {
        same_device(hidden.device(), OP, &[("mask", m)])?;
    }
    let fwd = FusedLinear {
        rows: TokenLogProbsInputs {
            targets: targets.contiguous()?.flatten_all()?,
            mask: mask.map(|m| m.contiguous()?.flatten_all()).transpose()?,
            cfg: cfg.logprob,
            vocab,
        },
        cfg: *cfg,
    };
    let packed = hidden.contiguous()?.apply_op2(&weight.contiguous()?, fwd)?;
    let row = |i: usize| packed.get(i)?.reshape(lead.as_slice());
    Ok(LogProbTensors {
        logp: row(0)?,
        entropy: if cfg.logprob.entropy { Some(row(1)?) } else { None },
        lse: row(2)?,
    })
}

/// The forward op; targets and mask are captured (not differentiable).
#[derive(Clone)]
struct FusedLinear {
    rows: TokenLogProbsInputs,
    cfg: FusedLinearConfig,
}

/// The backward op: `[dhidden; dweight]` flattened into one buffer.
struct FusedLinearBackward {
    fwd: FusedLinear,
    saved: Tensor,
    grads: Tensor,
}

/// Runs `$body` with `$h` and `$w` bound to the hidden and weight storages
/// as slices of one float type.
macro_rules! with_float_pair {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, |$h:ident, $w:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let ($h, $w) = (
                    host_slice::<f32>($s1, $l1, "hidden")?,
                    host_slice::<f32>($s2, $l2, "weight")?,
                );
                $body
            }
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
                let ($h, $w) = (
                    host_slice::<half::bf16>($s1, $l1, "hidden")?,
                    host_slice::<half::bf16>($s2, $l2, "weight")?,
                );
                $body
            }
            (CpuStorage::F16(_), CpuStorage::F16(_)) => {
                let ($h, $w) = (
                    host_slice::<half::f16>($s1, $l1, "hidden")?,
                    host_slice::<half::f16>($s2, $l2, "weight")?,
                );
                $body
            }
            _ => bail_unsupported!(OP, "hidden and weight must both be F32, BF16 or F16"),
        }
    };
}

/// Runs `action` on the CPU op's rows over `hidden` and `weight`, for the
/// captured targets' id type.
fn run_rows<T: Float, R>(
    rows: &TokenLogProbsInputs,
    hidden: &[T],
    weight: &[T],
    action: &impl RowsFn<T, R>,
) -> Result<R> {
    let hidden_size = weight.len() / rows.vocab.max(1);
    with_host_rows(rows, |ids, mask| match ids {
        HostIds::U32(targets) => action.u32(&LinearRows {
            hidden,
            weight,
            bias: None,
            targets,
            mask,
            hidden_size,
        }),
        HostIds::I64(targets) => action.i64(&LinearRows {
            hidden,
            weight,
            bias: None,
            targets,
            mask,
            hidden_size,
        }),
    })
}

/// An action on the CPU op's rows, for either token id type.
trait RowsFn<T, R> {
    fn u32(&self, rows: &LinearRows<'_, T, u32>) -> Result<R>;
    fn i64(&self, rows: &LinearRows<'_, T, i64>) -> Result<R>;
}

struct Forward<'a>(&'a FusedLinearConfig);

impl<T: Float> RowsFn<T, Vec<f32>> for Forward<'_> {
    fn u32(&self, rows: &LinearRows<'_, T, u32>) -> Result<Vec<f32>> {
        op::fused_linear_logprobs(rows, self.0).map(pack).map_err(wrap)
    }
    fn i64(&self, rows: &LinearRows<'_, T, i64>) -> Result<Vec<f32>> {
        op::fused_linear_logprobs(rows, self.0).map(pack).map_err(wrap)
    }
}

struct Backward<'c, 'a> {
    cfg: &'c FusedLinearConfig,
    saved: LogProbSaved<'a>,
    grads: LogProbGrads<'a>,
}

impl<T: Float + candle_core::WithDType> RowsFn<T, CpuStorage> for Backward<'_, '_> {
    fn u32(&self, rows: &LinearRows<'_, T, u32>) -> Result<CpuStorage> {
        self.run(rows)
    }
    fn i64(&self, rows: &LinearRows<'_, T, i64>) -> Result<CpuStorage> {
        self.run(rows)
    }
}

impl Backward<'_, '_> {
    /// `[dhidden; dweight]` as one storage.
    fn run<T: Float + candle_core::WithDType, I: crate::TokenId>(
        &self,
        rows: &LinearRows<'_, T, I>,
    ) -> Result<CpuStorage> {
        let g = op::fused_linear_logprobs_backward(rows, self.cfg, &self.saved, &self.grads).map_err(wrap)?;
        let mut packed = g.hidden;
        packed.extend_from_slice(&g.weight);
        Ok(T::to_cpu_storage_owned(packed))
    }
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "grpo-fused-linear-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let packed = with_float_pair!(s1, l1, s2, l2, |hidden, weight| {
            run_rows(&self.rows, hidden, weight, &Forward(&self.cfg))?
        });
        let n = packed.len() / 3;
        Ok((CpuStorage::F32(packed), Shape::from((3, n))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::run(self, None, (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let bwd = FusedLinearBackward {
            fwd: self.clone(),
            saved: res.contiguous()?,
            grads: grad_res.contiguous()?,
        };
        let packed = hidden.apply_op2_no_bwd(weight, &bwd)?;
        let nh = hidden.elem_count();
        let dhidden = packed.narrow(0, 0, nh)?.reshape(hidden.shape())?;
        let dweight = packed
            .narrow(0, nh, weight.elem_count())?
            .reshape(weight.shape())?;
        Ok((Some(dhidden), Some(dweight)))
    }
}

impl CustomOp2 for FusedLinearBackward {
    fn name(&self) -> &'static str {
        "grpo-fused-linear-logprobs-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = with_host_grads(
            &self.saved,
            &self.grads,
            self.fwd.cfg.logprob.entropy,
            |saved, grads| {
                let bwd = Backward {
                    cfg: &self.fwd.cfg,
                    saved,
                    grads,
                };
                Ok(with_float_pair!(s1, l1, s2, l2, |hidden, weight| {
                    run_rows(&self.fwd.rows, hidden, weight, &bwd)?
                }))
            },
        )?;
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        Ok((out, Shape::from(len)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::run(&self.fwd, Some((&self.saved, &self.grads)), (s1, l1), (s2, l2))
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    //! Both passes on the CUDA kernels of [`crate::cuda::fused_linear`], into
    //! the packed outputs the CPU path produces.
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{Layout, Result, Shape, Tensor};
    use cudarc::driver::CudaView;

    use super::FusedLinear;
    use crate::candle::gpu::{checked, for_dtypes, gpu, view, ForDTypes};
    use crate::candle::logprob::{with_device_grads, with_device_rows};
    use crate::candle::wrap;
    use crate::cuda::{self as kernels, Device, GpuFloat, GpuId, LinearGradsOut, LogProbsOut};
    use crate::ops::fused_linear::LinearRows;

    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    /// The forward (`backward: None`: `[3, N]` F32) or the backward (the
    /// forward's packed outputs and their gradients: `[dhidden; dweight]`).
    pub fn run(
        op: &FusedLinear,
        backward: Option<(&Tensor, &Tensor)>,
        hidden: Operand<'_>,
        weight: Operand<'_>,
    ) -> Result<(CudaStorage, Shape)> {
        if hidden.0.dtype() != weight.0.dtype() {
            bail_unsupported!(super::OP, "hidden and weight must share a dtype");
        }
        let job = Job {
            op,
            backward,
            hidden,
            weight,
        };
        for_dtypes(hidden.0.dtype(), op.rows.targets.dtype(), "hidden", job)
    }

    struct Job<'a> {
        op: &'a FusedLinear,
        backward: Option<(&'a Tensor, &'a Tensor)>,
        hidden: Operand<'a>,
        weight: Operand<'a>,
    }

    impl ForDTypes<(CudaStorage, Shape)> for Job<'_> {
        fn run<T: GpuFloat + CudaDType, I: GpuId + CudaDType>(self) -> Result<(CudaStorage, Shape)> {
            let dev = &self.hidden.0.device;
            let g = gpu(dev)?;
            let hidden: CudaView<'_, T> = view(self.hidden.0, self.hidden.1, "hidden")?;
            let weight: CudaView<'_, T> = view(self.weight.0, self.weight.1, "weight")?;
            let (nh, nw) = (hidden.len(), weight.len());
            let cfg = &self.op.cfg;
            let entropy = cfg.logprob.entropy;
            with_device_rows::<I, _>(&self.op.rows, |targets, mask| {
                let rows = LinearRows::<T, I, Device> {
                    hidden,
                    weight,
                    bias: None,
                    targets,
                    mask,
                    hidden_size: nw / self.op.rows.vocab.max(1),
                };
                let n = rows.rows();
                let Some((saved, grads)) = self.backward else {
                    // Zeros: the entropy row when it is not computed.
                    let mut packed = g
                        .stream()
                        .alloc_zeros::<f32>(3 * n)
                        .map_err(candle_core::Error::wrap)?;
                    {
                        let (logp, mut rest) = packed.split_at_mut(n);
                        let (entropy_row, lse) = rest.split_at_mut(n);
                        let mut out = LogProbsOut {
                            logp,
                            entropy: entropy.then_some(entropy_row),
                            lse,
                        };
                        kernels::fused_linear_logprobs_into(&g, &rows, cfg, &mut out).map_err(wrap)?;
                    }
                    checked(&g)?;
                    return Ok((
                        CudaStorage::wrap_cuda_slice(packed, dev.clone()),
                        Shape::from((3, n)),
                    ));
                };
                with_device_grads(saved, grads, entropy, |saved, grads| {
                    // SAFETY (of the uninitialized buffer): the backward writes
                    // every element of dhidden and dweight.
                    let mut packed = g.alloc::<T>(nh + nw).map_err(wrap)?;
                    {
                        let (d_hidden, d_weight) = packed.split_at_mut(nh);
                        let mut out = LinearGradsOut {
                            hidden: d_hidden,
                            weight: d_weight,
                            bias: None,
                        };
                        kernels::fused_linear_logprobs_backward_into(
                            &g, &rows, cfg, &saved, &grads, &mut out,
                        )
                        .map_err(wrap)?;
                    }
                    checked(&g)?;
                    Ok((
                        CudaStorage::wrap_cuda_slice(packed, dev.clone()),
                        Shape::from(nh + nw),
                    ))
                })
            })
        }
    }
}
