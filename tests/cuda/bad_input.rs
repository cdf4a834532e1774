//! The bad-input cases of `crate::common::bad_input` on the CUDA ops: what the
//! host validates gives the CPU's error before any launch; what only the
//! data shows is raised by the kernels and reported by `Gpu::check` as
//! `Error::Device` with the same fault and index as the CPU's error; and
//! the cases that succeed on the CPU succeed here, with finite outputs.
#![cfg(feature = "cuda")]

use crate::common::bad_input::{
    advantage_cases, broadcast_cases, correction_cases, cuda_op, for_dtype, fused_cases, kl_cases,
    logprob_cases, policy_cases, sample_cases, to, widened, AdvCase, Correction, CorrectionCase, FusedCase,
    KlCase, LogProbCase, PolicyCase, SampleCase,
};
use crate::common::gpu::{down, gpu, up};
use cudarc::driver::{CudaSlice, DeviceRepr};
use grpo_kernels::cuda::{self, Device, Gpu, GpuFloat};
use grpo_kernels::{
    Advantage, DeviceFault, Error, Float, KlInputs, LinearRows, LogProbGrads, LogitRows, PolicyLossInputs,
    Result, Rewards, SampleInputs, SeqLayout,
};

/// The CPU's error as the GPU reports it: data faults through the status
/// word (named by the family's forward op), the rest unchanged.
fn on_gpu(want: &Option<Error>) -> Option<Error> {
    want.clone().map(|e| match e {
        Error::NonFinite { op, index, .. } => Error::Device {
            op: cuda_op(op),
            fault: DeviceFault::NonFinite,
            index,
        },
        Error::TokenOutOfRange { op, index, .. } => Error::Device {
            op: cuda_op(op),
            fault: DeviceFault::TokenOutOfRange,
            index,
        },
        other => other,
    })
}

/// Device outputs, downloaded once the status word is clean.
type Outs = Vec<Vec<f32>>;

#[track_caller]
fn check(gpu: &Gpu, name: &str, r: Result<Outs>, want: &Option<Error>) {
    let r = r.and_then(|outs| gpu.check().map(|()| outs));
    match (r, on_gpu(want)) {
        (Err(got), Some(want)) => assert_eq!(got, want, "{name}"),
        (Err(got), None) => panic!("{name}: unexpected {got}"),
        (Ok(_), Some(want)) => panic!("{name}: expected {want}"),
        (Ok(outs), None) => {
            for o in outs {
                assert!(o.iter().all(|x| x.is_finite()), "{name}: {o:?}");
            }
        }
    }
    gpu.check().expect("check clears the status");
}

fn up_as<T: Float + DeviceRepr>(gpu: &Gpu, xs: &[f32]) -> CudaSlice<T> {
    up(gpu, &to::<T>(xs))
}

fn down32<T: Float + DeviceRepr + Default>(gpu: &Gpu, xs: &CudaSlice<T>) -> Vec<f32> {
    widened(&down(gpu, xs))
}

fn logprob_gpu<T: GpuFloat>(gpu: &Gpu, c: &LogProbCase) -> Result<Outs> {
    let (logits, targets) = (up_as::<T>(gpu, &c.logits), up(gpu, &c.targets));
    let mask = c.mask.as_ref().map(|m| up(gpu, m));
    let rows = LogitRows::<T, i64, Device> {
        logits: logits.as_view(),
        targets: targets.as_view(),
        mask: mask.as_ref().map(|m| m.as_view()),
        vocab: c.vocab,
    };
    let out = cuda::token_logprobs(gpu, &rows, &c.cfg)?;
    let Some(g) = &c.grads else {
        return Ok(vec![down(gpu, &out.logp), down(gpu, &out.lse)]);
    };
    gpu.check().expect("the forward of a backward case is clean");
    let (g_logp, g_lse) = (up(gpu, &g.logp), up(gpu, &g.lse));
    let g_h = g.entropy.as_ref().map(|e| up(gpu, e));
    let grads = LogProbGrads::<Device> {
        logp: g_logp.as_view(),
        entropy: g_h.as_ref().map(|e| e.as_view()),
        lse: Some(g_lse.as_view()),
    };
    let d = cuda::token_logprobs_backward(gpu, &rows, &c.cfg, &out.saved(), &grads)?;
    Ok(vec![down32(gpu, &d)])
}

#[test]
#[ignore = "needs a CUDA device"]
fn logprob_cuda_cases() {
    let gpu = gpu();
    for c in logprob_cases() {
        let r = for_dtype!(c.dtype, T => logprob_gpu::<T>(&gpu, &c));
        check(&gpu, c.name, r, &c.want);
    }
}

fn fused_gpu<T: GpuFloat>(gpu: &Gpu, c: &FusedCase) -> Result<Outs> {
    let (hidden, weight, targets) = (
        up_as::<T>(gpu, &c.hidden),
        up_as::<T>(gpu, &c.weight),
        up(gpu, &c.targets),
    );
    let bias = c.bias.as_ref().map(|b| up_as::<T>(gpu, b));
    let rows = LinearRows::<T, i64, Device> {
        hidden: hidden.as_view(),
        weight: weight.as_view(),
        bias: bias.as_ref().map(|b| b.as_view()),
        targets: targets.as_view(),
        mask: None,
        hidden_size: c.h,
    };
    let out = cuda::fused_linear_logprobs(gpu, &rows, &c.cfg)?;
    let Some(g) = &c.grads else {
        return Ok(vec![down(gpu, &out.logp), down(gpu, &out.lse)]);
    };
    gpu.check().expect("the forward of a backward case is clean");
    let (g_logp, g_lse) = (up(gpu, &g.logp), up(gpu, &g.lse));
    let grads = LogProbGrads::<Device> {
        logp: g_logp.as_view(),
        entropy: None,
        lse: Some(g_lse.as_view()),
    };
    let d = cuda::fused_linear_logprobs_backward(gpu, &rows, &c.cfg, &out.saved(), &grads)?;
    let bias = d.bias.as_ref().map_or_else(Vec::new, |b| down32(gpu, b));
    Ok(vec![down32(gpu, &d.hidden), down32(gpu, &d.weight), bias])
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_linear_cuda_cases() {
    let gpu = gpu();
    for c in fused_cases() {
        let r = for_dtype!(c.dtype, T => fused_gpu::<T>(&gpu, &c));
        check(&gpu, c.name, r, &c.want);
    }
}

fn advantages_gpu(gpu: &Gpu, c: &AdvCase) -> Result<Outs> {
    let values = up(gpu, &c.values);
    let rewards = Rewards::<Device> {
        values: values.as_view(),
        weights: c.weights.as_deref(),
        group_size: c.group_size,
    };
    let out = cuda::group_advantages(gpu, &rewards, c.mode)?;
    Ok([&out.advantages, &out.rewards, &out.group_mean, &out.group_std]
        .map(|o| down(gpu, o))
        .to_vec())
}

#[test]
#[ignore = "needs a CUDA device"]
fn advantages_cuda_cases() {
    let gpu = gpu();
    for c in advantage_cases() {
        check(&gpu, c.name, advantages_gpu(&gpu, &c), &c.want);
    }
    for c in broadcast_cases() {
        let per_seq = up(&gpu, &c.per_seq);
        let layout: SeqLayout<'_, Device> = SeqLayout::Padded {
            batch: c.batch,
            seq_len: c.seq_len,
        };
        let r = cuda::broadcast_to_tokens(&gpu, &per_seq.as_view(), &layout, c.batch * c.seq_len)
            .map(|out| vec![down(&gpu, &out)]);
        check(&gpu, c.name, r, &c.want);
    }
}

fn correction_gpu(gpu: &Gpu, c: &CorrectionCase) -> Result<Outs> {
    let (logp, sampler, adv) = (up(gpu, &c.logp), up(gpu, &c.sampler_logp), up(gpu, &c.advantages));
    let mask = c.mask.as_ref().map(|m| up(gpu, m));
    let inputs = grpo_kernels::SamplerLogps::<Device> {
        logp: logp.as_view(),
        sampler_logp: sampler.as_view(),
        mask: mask.as_ref().map(|m| m.as_view()),
        layout: SeqLayout::Padded {
            batch: c.batch,
            seq_len: c.logp.len() / c.batch,
        },
    };
    let mut w = up(gpu, &vec![1.0f32; c.logp.len()]);
    match c.op {
        Correction::SamplerIs(cfg) => {
            cuda::sampler_is_weights_into(gpu, &inputs, &cfg, &mut w.as_view_mut())?;
        }
        Correction::OffPolicy { threshold } => {
            cuda::off_policy_mask_into(gpu, &inputs, &adv.as_view(), threshold, &mut w.as_view_mut())?
        }
        Correction::Entropy { top_quantile } => {
            let m = mask.as_ref().map(|m| m.as_view());
            cuda::high_entropy_mask_into(
                gpu,
                &logp.as_view(),
                m.as_ref(),
                top_quantile,
                &mut w.as_view_mut(),
            )?
        }
    }
    Ok(vec![down(gpu, &w)])
}

#[test]
#[ignore = "needs a CUDA device"]
fn corrections_cuda_cases() {
    let gpu = gpu();
    for c in correction_cases() {
        check(&gpu, c.name, correction_gpu(&gpu, &c), &c.want);
    }
}

fn kl_gpu(gpu: &Gpu, c: &KlCase) -> Result<Outs> {
    let (logp, ref_logp) = (up(gpu, &c.logp), up(gpu, &c.ref_logp));
    let inputs = KlInputs::<Device> {
        logp: logp.as_view(),
        ref_logp: ref_logp.as_view(),
    };
    let kl = cuda::kl_divergence(gpu, &inputs, c.est)?;
    let Some(g) = &c.grad else {
        return Ok(vec![down(gpu, &kl)]);
    };
    gpu.check().expect("the forward of a backward case is clean");
    let d = cuda::kl_divergence_backward(gpu, &inputs, c.est, &up(gpu, g).as_view())?;
    Ok(vec![down(gpu, &d)])
}

#[test]
#[ignore = "needs a CUDA device"]
fn kl_cuda_cases() {
    let gpu = gpu();
    for c in kl_cases() {
        check(&gpu, c.name, kl_gpu(&gpu, &c), &c.want);
    }
}

fn policy_gpu(gpu: &Gpu, c: &PolicyCase) -> Result<Outs> {
    let (logp, adv) = (up(gpu, &c.logp), up(gpu, &c.advantages));
    let old = c.old_logp.as_ref().map(|o| up(gpu, o));
    let reference = c.ref_logp.as_ref().map(|r| up(gpu, r));
    let mask = c.mask.as_ref().map(|m| up(gpu, m));
    let inputs = PolicyLossInputs::<Device> {
        logp: logp.as_view(),
        old_logp: old.as_ref().map(|o| o.as_view()),
        ref_logp: reference.as_ref().map(|r| r.as_view()),
        advantages: Advantage::PerSequence(adv.as_view()),
        mask: mask.as_ref().map(|m| m.as_view()),
        pg_weights: None,
        layout: SeqLayout::Padded {
            batch: c.batch,
            seq_len: c.logp.len() / c.batch,
        },
    };
    let out = cuda::policy_loss(gpu, &inputs, &c.cfg)?;
    let Some((grad_loss, per_token)) = &c.backward else {
        return Ok(vec![down(gpu, &out.per_token), down(gpu, &out.summary)]);
    };
    gpu.check().expect("the forward of a backward case is clean");
    let (g_loss, g_tok) = (up(gpu, &[*grad_loss]), up(gpu, per_token));
    let d = cuda::policy_loss_backward(
        gpu,
        &inputs,
        &c.cfg,
        &out.summary.as_view(),
        &g_loss.as_view(),
        Some(&g_tok.as_view()),
    )?;
    Ok(vec![down(gpu, &d)])
}

#[test]
#[ignore = "needs a CUDA device"]
fn policy_loss_cuda_cases() {
    let gpu = gpu();
    for c in policy_cases() {
        check(&gpu, c.name, policy_gpu(&gpu, &c), &c.want);
    }
}

fn sample_gpu(gpu: &Gpu, c: &SampleCase) -> Result<Outs> {
    let logits = up(gpu, &c.logits);
    let inputs = SampleInputs::<f32, Device> {
        logits: logits.as_view(),
        vocab: c.vocab,
    };
    let out = cuda::sample(gpu, &inputs, &c.cfg)?;
    Ok(vec![down(gpu, &out.logp)])
}

#[test]
#[ignore = "needs a CUDA device"]
fn sampling_cuda_cases() {
    let gpu = gpu();
    for c in sample_cases() {
        check(&gpu, c.name, sample_gpu(&gpu, &c), &c.want);
    }
}
