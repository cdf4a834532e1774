//! [`kl_divergence`] on candle tensors: one `CustomOp2` on `(logp,
//! ref_logp)`, differentiable in both (the math of [`crate::ops::kl`]).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{host_slice, same_device, with_cpu, wrap};
use crate::ops::kl::{self as op, KlEstimator, KlInputs, OP};

/// Per-token estimates of `KL(policy || ref)` from `logp` and `ref_logp`
/// (F32, one shape, one device): `k1`, `k2`, `k3` or verl's `low_var_kl`
/// with `d = ref_logp - logp`; see [`crate::kl_divergence`]. Differentiable
/// in both inputs (`dL/dref_logp = -dL/dlogp`: every estimator depends on
/// `d` alone). Non-finite log-probs are an error.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor, Var};
/// use grpo_kernels::{candle::kl_divergence, KlEstimator};
/// let dev = Device::Cpu;
/// let logp = Var::from_tensor(&Tensor::new(&[-1.0f32, -2.0, -0.5], &dev)?)?;
/// let ref_logp = Tensor::new(&[-1.1f32, -1.9, -0.5], &dev)?;
/// let kl = kl_divergence(&logp, &ref_logp, KlEstimator::K3)?;
/// let grads = kl.sum_all()?.backward()?;
/// assert_eq!(grads.get(&logp).unwrap().dims(), &[3]);
/// # Ok(()) }
/// ```
pub fn kl_divergence(logp: &Tensor, ref_logp: &Tensor, est: KlEstimator) -> Result<Tensor> {
    same_device(logp.device(), OP, &[("ref_logp", ref_logp)])?;
    for (name, t) in [("logp", logp), ("ref_logp", ref_logp)] {
        if t.dtype() != candle_core::DType::F32 {
            bail_unsupported!(OP, "`{name}` must be F32, got {:?}", t.dtype());
        }
    }
    if logp.shape() != ref_logp.shape() {
        bail_unsupported!(
            OP,
            "logp {:?} and ref_logp {:?} must have one shape",
            logp.dims(),
            ref_logp.dims()
        );
    }
    logp.contiguous()?
        .apply_op2(&ref_logp.contiguous()?, Kl { est, grad: None })
}

/// The estimates (`grad: None`), or, as the backward, `grad * d kl / d logp`.
struct Kl {
    est: KlEstimator,
    grad: Option<Tensor>,
}

impl CustomOp2 for Kl {
    fn name(&self) -> &'static str {
        match self.grad {
            None => "grpo-kl-divergence",
            Some(_) => "grpo-kl-divergence-backward",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inputs = KlInputs::new(host_slice(s1, l1, "logp")?, host_slice(s2, l2, "ref_logp")?);
        let out = match &self.grad {
            None => op::kl_divergence(&inputs, self.est).map_err(wrap)?,
            Some(grad) => with_cpu(grad, "grad", |s, l| {
                op::kl_divergence_backward(&inputs, self.est, host_slice(s, l, "grad")?).map_err(wrap)
            })?,
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::run(self.est, self.grad.as_ref(), (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        logp: &Tensor,
        ref_logp: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let bwd = Kl {
            est: self.est,
            grad: Some(grad.contiguous()?),
        };
        let d_logp = logp.apply_op2_no_bwd(ref_logp, &bwd)?;
        let d_ref = d_logp.neg()?;
        Ok((Some(d_logp), Some(d_ref)))
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Shape, Tensor};

    use crate::candle::gpu::{checked, gpu, view, with_cuda};
    use crate::candle::wrap;
    use crate::cuda::{self as kernels, Device};
    use crate::ops::kl::{KlEstimator, KlInputs};

    /// The estimates (`grad: None`) or `grad * d kl / d logp`.
    pub fn run(
        est: KlEstimator,
        grad: Option<&Tensor>,
        logp: (&CudaStorage, &Layout),
        ref_logp: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &logp.0.device;
        let g = gpu(dev)?;
        let inputs = KlInputs::<Device> {
            logp: view(logp.0, logp.1, "logp")?,
            ref_logp: view(ref_logp.0, ref_logp.1, "ref_logp")?,
        };
        let out = match grad {
            None => kernels::kl_divergence(&g, &inputs, est).map_err(wrap)?,
            Some(grad) => with_cuda(grad, "grad", |s, l| {
                kernels::kl_divergence_backward(&g, &inputs, est, &view(s, l, "grad")?).map_err(wrap)
            })?,
        };
        checked(&g)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            logp.1.shape().clone(),
        ))
    }
}
