//! [`token_logprobs`] on candle tensors: one `CustomOp1` on the logits whose
//! output packs `[logp; entropy; lse]` as `[3, N]`, so a gradient reaching
//! any of the three flows back to the logits through this crate's backward
//! kernel (the math of [`crate::ops::logprob`]).

use super::{host_ids, host_slice, same_device, with_cpu, with_float_slice, wrap, HostIds};
use crate::ops::logprob::{self as op, LogProbConfig, LogProbGrads, LogProbSaved, LogitRows};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Outputs of [`token_logprobs`], shaped like the logits without their last
/// dimension.
#[derive(Debug, Clone)]
pub struct LogProbTensors {
    /// `log p(target)`, F32.
    pub logp: Tensor,
    /// Entropy of each row's distribution (F32), when asked for.
    pub entropy: Option<Tensor>,
    /// `logsumexp(logits / T)`, F32.
    pub lse: Tensor,
}

/// Token log-probs of `logits` (`[..., V]`, F32/BF16/F16) at `targets`
/// (`[...]`, U32 or I64), with an optional U8 `mask` (0 = skip): see
/// [`crate::token_logprobs`] for the math. Differentiable with respect to
/// the logits through all three outputs.
///
/// ```
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::{Device, Tensor};
/// use grpo_kernels::{candle::token_logprobs, LogProbConfig};
/// let logits = candle_core::Var::randn(0f32, 1., (2, 5, 11), &Device::Cpu)?;
/// let targets = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &Device::Cpu)?;
/// let out = token_logprobs(&logits, &targets, None, &LogProbConfig::default())?;
/// let grads = out.logp.sum_all()?.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 5, 11]);
/// # Ok(()) }
/// ```
pub fn token_logprobs(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    cfg: &LogProbConfig,
) -> Result<LogProbTensors> {
    let logits = logits.contiguous()?;
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let lead = logits.dims()[..logits.rank() - 1].to_vec();
    same_device(logits.device(), op::OP, &[("targets", targets)])?;
    if let Some(m) = mask {
        same_device(logits.device(), op::OP, &[("mask", m)])?;
    }
    let fwd = TokenLogProbs {
        targets: targets.contiguous()?.flatten_all()?,
        mask: mask.map(|m| m.contiguous()?.flatten_all()).transpose()?,
        cfg: *cfg,
        vocab,
    };
    let packed = logits.apply_op1(fwd)?;
    let row = |i: usize| packed.get(i)?.reshape(lead.as_slice());
    Ok(LogProbTensors {
        logp: row(0)?,
        entropy: if cfg.entropy { Some(row(1)?) } else { None },
        lse: row(2)?,
    })
}

/// The forward op; targets and mask are captured (not differentiable).
struct TokenLogProbs {
    targets: Tensor,
    mask: Option<Tensor>,
    cfg: LogProbConfig,
    vocab: usize,
}

/// The backward op: dlogits from the forward's packed output and its gradient.
struct TokenLogProbsBackward {
    fwd: TokenLogProbsInputs,
    saved: Tensor,
    grads: Tensor,
}

/// What both ops capture.
#[derive(Clone)]
pub(super) struct TokenLogProbsInputs {
    pub(super) targets: Tensor,
    pub(super) mask: Option<Tensor>,
    pub(super) cfg: LogProbConfig,
    pub(super) vocab: usize,
}

impl TokenLogProbs {
    fn inputs(&self) -> TokenLogProbsInputs {
        TokenLogProbsInputs {
            targets: self.targets.clone(),
            mask: self.mask.clone(),
            cfg: self.cfg,
            vocab: self.vocab,
        }
    }
}

/// Runs `f` with the captured targets and mask as host slices.
pub(super) fn with_host_rows<R>(
    inputs: &TokenLogProbsInputs,
    f: impl FnOnce(HostIds<'_>, Option<&[u8]>) -> Result<R>,
) -> Result<R> {
    with_cpu(&inputs.targets, "targets", |ts, tl| {
        let ids = host_ids(ts, tl)?;
        match &inputs.mask {
            None => f(ids, None),
            Some(m) => with_cpu(m, "mask", |ms, ml| {
                f(ids, Some(host_slice::<u8>(ms, ml, "mask")?))
            }),
        }
    })
}

/// Runs `f` with the forward's packed `[logp; entropy; lse]` outputs
/// (`saved`, `[3, N]`) and their gradients (`grads`, `[3, N]`) as the
/// backward's inputs, on the host.
pub(super) fn with_host_grads<R>(
    saved: &Tensor,
    grads: &Tensor,
    entropy: bool,
    f: impl for<'a> FnOnce(LogProbSaved<'a>, LogProbGrads<'a>) -> Result<R>,
) -> Result<R> {
    with_cpu(saved, "saved", |ss, sl| {
        with_cpu(grads, "grads", |gs, gl| {
            let [_, saved_h, saved_lse] = thirds(host_slice(ss, sl, "saved")?);
            let [g_logp, g_h, g_lse] = thirds(host_slice(gs, gl, "grads")?);
            f(
                LogProbSaved {
                    lse: saved_lse,
                    entropy: entropy.then_some(saved_h),
                },
                LogProbGrads {
                    logp: g_logp,
                    entropy: entropy.then_some(g_h),
                    lse: Some(g_lse),
                },
            )
        })
    })
}

/// Rows 0, 1, 2 of a packed `[3, N]` buffer.
fn thirds(x: &[f32]) -> [&[f32]; 3] {
    let n = x.len() / 3;
    [0, 1, 2].map(|k| &x[k * n..(k + 1) * n])
}

/// [`thirds`] of a buffer in CUDA memory.
#[cfg(feature = "candle-cuda")]
fn device_thirds<'a>(x: &'a cudarc::driver::CudaView<'_, f32>) -> [cudarc::driver::CudaView<'a, f32>; 3] {
    let n = x.len() / 3;
    [0, 1, 2].map(move |k| x.slice(k * n..(k + 1) * n))
}

/// [`with_host_grads`] for tensors in CUDA memory.
#[cfg(feature = "candle-cuda")]
pub(super) fn with_device_grads<R>(
    saved: &Tensor,
    grads: &Tensor,
    entropy: bool,
    f: impl for<'a> FnOnce(
        LogProbSaved<'a, crate::cuda::Device>,
        LogProbGrads<'a, crate::cuda::Device>,
    ) -> Result<R>,
) -> Result<R> {
    use super::gpu::{view, with_cuda};
    with_cuda(saved, "saved", |ss, sl| {
        with_cuda(grads, "grads", |gs, gl| {
            let (saved, grads) = (view::<f32>(ss, sl, "saved")?, view::<f32>(gs, gl, "grads")?);
            let [_, saved_h, saved_lse] = device_thirds(&saved);
            let [g_logp, g_h, g_lse] = device_thirds(&grads);
            f(
                LogProbSaved {
                    lse: saved_lse,
                    entropy: entropy.then_some(saved_h),
                },
                LogProbGrads {
                    logp: g_logp,
                    entropy: entropy.then_some(g_h),
                    lse: Some(g_lse),
                },
            )
        })
    })
}

/// Runs `f` with the captured targets and mask as views of CUDA memory.
#[cfg(feature = "candle-cuda")]
pub(super) fn with_device_rows<I: candle_core::cuda_backend::CudaDType, R>(
    inputs: &TokenLogProbsInputs,
    f: impl FnOnce(cudarc::driver::CudaView<'_, I>, Option<cudarc::driver::CudaView<'_, u8>>) -> Result<R>,
) -> Result<R> {
    use super::gpu::{view, with_cuda};
    with_cuda(&inputs.targets, "targets", |ts, tl| {
        let targets = view::<I>(ts, tl, "targets")?;
        match &inputs.mask {
            None => f(targets, None),
            Some(m) => with_cuda(m, "mask", |ms, ml| f(targets, Some(view::<u8>(ms, ml, "mask")?))),
        }
    })
}

/// Packs per-row outputs as `[logp; entropy; lse]`.
pub(super) fn pack(out: op::LogProbs) -> Vec<f32> {
    let n = out.logp.len();
    let mut packed = out.logp;
    match out.entropy {
        Some(e) => packed.extend_from_slice(&e),
        None => packed.resize(2 * n, 0.0),
    }
    packed.extend_from_slice(&out.lse);
    packed
}

impl CustomOp1 for TokenLogProbs {
    fn name(&self) -> &'static str {
        "grpo-token-logprobs"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let vocab = self.vocab;
        let packed = with_host_rows(&self.inputs(), |ids, mask| {
            with_float_slice!(storage, layout, "logits", |logits| {
                let out = match ids {
                    HostIds::U32(t) => op::token_logprobs(
                        &LogitRows {
                            logits,
                            targets: t,
                            mask,
                            vocab,
                        },
                        &self.cfg,
                    ),
                    HostIds::I64(t) => op::token_logprobs(
                        &LogitRows {
                            logits,
                            targets: t,
                            mask,
                            vocab,
                        },
                        &self.cfg,
                    ),
                };
                out.map(pack).map_err(wrap)
            })
        })?;
        let n = packed.len() / 3;
        Ok((CpuStorage::F32(packed), Shape::from((3, n))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(&self.inputs(), storage, layout)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let bwd = TokenLogProbsBackward {
            fwd: self.inputs(),
            saved: res.contiguous()?,
            grads: grad_res.contiguous()?,
        };
        Ok(Some(arg.apply_op1_no_bwd(&bwd)?))
    }
}

impl CustomOp1 for TokenLogProbsBackward {
    fn name(&self) -> &'static str {
        "grpo-token-logprobs-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (cfg, vocab) = (self.fwd.cfg, self.fwd.vocab);
        let shape = layout.shape().clone();
        let out = with_host_grads(&self.saved, &self.grads, cfg.entropy, |saved, grads| {
            with_host_rows(&self.fwd, |ids, mask| {
                with_float_slice!(storage, layout, "logits", |logits| {
                    macro_rules! run {
                        ($t:expr) => {
                            op::token_logprobs_backward(
                                &LogitRows {
                                    logits,
                                    targets: $t,
                                    mask,
                                    vocab,
                                },
                                &cfg,
                                &saved,
                                &grads,
                            )
                            .map(candle_core::WithDType::to_cpu_storage_owned)
                            .map_err(wrap)
                        };
                    }
                    match ids {
                        HostIds::U32(t) => run!(t),
                        HostIds::I64(t) => run!(t),
                    }
                })
            })
        })?;
        Ok((out, shape))
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
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{Layout, Result, Shape};
    use cudarc::driver::CudaView;

    use super::{with_device_grads, with_device_rows, TokenLogProbsBackward, TokenLogProbsInputs};
    use crate::candle::gpu::{checked, for_dtypes, gpu, view, ForDTypes};
    use crate::candle::wrap;
    use crate::cuda::{self as kernels, Device, GpuFloat, GpuId, LogProbsOut};
    use crate::ops::logprob::LogitRows;

    pub fn forward(
        inputs: &TokenLogProbsInputs,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        dispatch(inputs, storage, layout, Work::Forward)
    }

    pub fn backward(
        op: &TokenLogProbsBackward,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        dispatch(
            &op.fwd,
            storage,
            layout,
            Work::Backward {
                saved: &op.saved,
                grads: &op.grads,
            },
        )
    }

    enum Work<'a> {
        Forward,
        Backward {
            saved: &'a candle_core::Tensor,
            grads: &'a candle_core::Tensor,
        },
    }

    fn dispatch(
        inputs: &TokenLogProbsInputs,
        storage: &CudaStorage,
        layout: &Layout,
        work: Work<'_>,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let job = Job {
            inputs,
            storage,
            layout,
            work,
        };
        for_dtypes(storage.dtype(), inputs.targets.dtype(), "logits", job)
    }

    struct Job<'a> {
        inputs: &'a TokenLogProbsInputs,
        storage: &'a CudaStorage,
        layout: &'a Layout,
        work: Work<'a>,
    }

    impl ForDTypes<(CudaStorage, Shape)> for Job<'_> {
        fn run<T: GpuFloat + CudaDType, I: GpuId + CudaDType>(self) -> Result<(CudaStorage, Shape)> {
            run::<T, I>(self.inputs, self.storage, self.layout, self.work)
        }
    }

    fn run<T: GpuFloat + CudaDType, I: GpuId + CudaDType>(
        inputs: &TokenLogProbsInputs,
        storage: &CudaStorage,
        layout: &Layout,
        work: Work<'_>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &storage.device;
        let g = gpu(dev)?;
        let logits: CudaView<'_, T> = view(storage, layout, "logits")?;
        with_device_rows::<I, _>(inputs, |targets, mask| {
            let rows = LogitRows::<T, I, Device> {
                logits,
                targets,
                mask,
                vocab: inputs.vocab,
            };
            let n = rows.rows();
            let cfg = &inputs.cfg;
            match work {
                Work::Forward => {
                    let mut packed = g
                        .stream()
                        .alloc_zeros::<f32>(3 * n)
                        .map_err(candle_core::Error::wrap)?;
                    {
                        let (logp, mut rest) = packed.split_at_mut(n);
                        let (entropy, lse) = rest.split_at_mut(n);
                        let mut out = LogProbsOut {
                            logp,
                            entropy: cfg.entropy.then_some(entropy),
                            lse,
                        };
                        kernels::token_logprobs_into(&g, &rows, cfg, &mut out).map_err(wrap)?;
                    }
                    checked(&g)?;
                    Ok((
                        CudaStorage::wrap_cuda_slice(packed, dev.clone()),
                        Shape::from((3, n)),
                    ))
                }
                Work::Backward { saved, grads } => {
                    with_device_grads(saved, grads, cfg.entropy, |saved, grads| {
                        let d =
                            kernels::token_logprobs_backward(&g, &rows, cfg, &saved, &grads).map_err(wrap)?;
                        checked(&g)?;
                        Ok((
                            CudaStorage::wrap_cuda_slice(d, dev.clone()),
                            layout.shape().clone(),
                        ))
                    })
                }
            }
        })
    }
}
