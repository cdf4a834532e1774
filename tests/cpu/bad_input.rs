//! Bad input, op family by op family, on the CPU and (feature `candle`)
//! through the candle ops and their autograd: every case of
//! `common::bad_input` gives its typed error, the same on both paths, or
//! succeeds with finite outputs. `tests/cuda/bad_input.rs` runs the same
//! cases on a GPU.

use crate::common::bad_input::{
    advantage_cases, broadcast_cases, correction_cases, for_dtype, fused_cases, kl_cases, logprob_cases,
    policy_cases, sample_cases, to, widened, AdvCase, Correction, CorrectionCase, FusedCase, KlCase,
    LogProbCase, PolicyCase, SampleCase,
};
use grpo_kernels::{
    broadcast_to_tokens, fused_linear_logprobs, fused_linear_logprobs_backward, group_advantages,
    kl_divergence, kl_divergence_backward, policy_loss, policy_loss_backward, sample, token_logprobs,
    token_logprobs_backward, token_logprobs_backward_inplace, Advantage, Error, Float, KlInputs, LinearRows,
    LogProbGrads, LogitRows, PolicyLossInputs, Result, Rewards, SampleInputs, SeqLayout,
};

/// `r`'s outcome against a case's `want`: its error, or success with every
/// output finite.
#[track_caller]
fn check(name: &str, r: Result<Vec<f32>>, want: &Option<Error>) {
    match (r, want) {
        (Err(got), Some(want)) => assert_eq!(&got, want, "{name}"),
        (Err(got), None) => panic!("{name}: unexpected {got}"),
        (Ok(_), Some(want)) => panic!("{name}: expected {want}"),
        (Ok(out), None) => assert!(out.iter().all(|x| x.is_finite()), "{name}: {out:?}"),
    }
}

// ------------------------------------------------------------------ CPU

fn logprob_cpu<T: Float>(c: &LogProbCase) -> Result<Vec<f32>> {
    let logits = to::<T>(&c.logits);
    let rows = LogitRows {
        logits: &logits[..],
        targets: &c.targets[..],
        mask: c.mask.as_deref(),
        vocab: c.vocab,
    };
    let out = token_logprobs(&rows, &c.cfg)?;
    let Some(g) = &c.grads else {
        return Ok([out.logp, out.lse, out.entropy.unwrap_or_default()].concat());
    };
    let grads = LogProbGrads {
        logp: &g.logp[..],
        entropy: g.entropy.as_deref(),
        lse: Some(&g.lse[..]),
    };
    let d = token_logprobs_backward(&rows, &c.cfg, &out.saved(), &grads)?;
    // In place: the same result, and on error the logits untouched.
    let mut buf = logits.clone();
    let r = token_logprobs_backward_inplace(
        &mut buf,
        &c.targets,
        c.mask.as_deref(),
        c.vocab,
        &c.cfg,
        &out.saved(),
        &grads,
    );
    match &r {
        Ok(()) => assert_eq!(buf, d, "{}: in place", c.name),
        Err(_) => assert_eq!(buf, logits, "{}: in place, on error", c.name),
    }
    r.map(|()| widened(&d))
}

#[test]
fn logprob_cpu_cases() {
    for c in logprob_cases() {
        let r = for_dtype!(c.dtype, T => logprob_cpu::<T>(&c));
        check(c.name, r, &c.want);
    }
}

fn fused_cpu<T: Float>(c: &FusedCase) -> Result<Vec<f32>> {
    let (hidden, weight, bias) = (
        to::<T>(&c.hidden),
        to::<T>(&c.weight),
        c.bias.as_deref().map(to::<T>),
    );
    let rows = LinearRows {
        hidden: &hidden[..],
        weight: &weight[..],
        bias: bias.as_deref(),
        targets: &c.targets[..],
        mask: None,
        hidden_size: c.h,
    };
    let out = fused_linear_logprobs(&rows, &c.cfg)?;
    let Some(g) = &c.grads else {
        return Ok([out.logp, out.lse].concat());
    };
    let grads = LogProbGrads {
        logp: &g.logp[..],
        entropy: g.entropy.as_deref(),
        lse: Some(&g.lse[..]),
    };
    let d = fused_linear_logprobs_backward(&rows, &c.cfg, &out.saved(), &grads)?;
    Ok([
        widened(&d.hidden),
        widened(&d.weight),
        widened(&d.bias.unwrap_or_default()),
    ]
    .concat())
}

#[test]
fn fused_linear_cpu_cases() {
    for c in fused_cases() {
        let r = for_dtype!(c.dtype, T => fused_cpu::<T>(&c));
        check(c.name, r, &c.want);
    }
}

fn advantages_cpu(c: &AdvCase) -> Result<Vec<f32>> {
    let rewards = Rewards {
        values: &c.values[..],
        weights: c.weights.as_deref(),
        group_size: c.group_size,
    };
    let out = group_advantages(&rewards, c.mode)?;
    Ok([out.advantages, out.rewards, out.group_mean, out.group_std].concat())
}

#[test]
fn advantages_cpu_cases() {
    for c in advantage_cases() {
        check(c.name, advantages_cpu(&c), &c.want);
    }
    for c in broadcast_cases() {
        let layout = SeqLayout::Padded {
            batch: c.batch,
            seq_len: c.seq_len,
        };
        check(c.name, broadcast_to_tokens(&c.per_seq, &layout), &c.want);
    }
}

fn kl_cpu(c: &KlCase) -> Result<Vec<f32>> {
    let inputs = KlInputs::new(&c.logp, &c.ref_logp);
    let kl = kl_divergence(&inputs, c.est)?;
    match &c.grad {
        None => Ok(kl),
        Some(g) => kl_divergence_backward(&inputs, c.est, g),
    }
}

fn correction_cpu(c: &CorrectionCase) -> Result<Vec<f32>> {
    let layout = SeqLayout::Padded {
        batch: c.batch,
        seq_len: c.logp.len() / c.batch,
    };
    let inputs = grpo_kernels::SamplerLogps {
        logp: &c.logp[..],
        sampler_logp: &c.sampler_logp[..],
        mask: c.mask.as_deref(),
        layout,
    };
    match c.op {
        Correction::SamplerIs(cfg) => grpo_kernels::sampler_is_weights(&inputs, &cfg).map(|o| o.weights),
        Correction::OffPolicy { threshold } => {
            grpo_kernels::off_policy_mask(&inputs, &c.advantages, threshold)
        }
        Correction::Entropy { top_quantile } => {
            grpo_kernels::high_entropy_mask(&c.logp, c.mask.as_deref(), top_quantile).map(|o| o.0)
        }
    }
}

#[test]
fn corrections_cpu_cases() {
    for c in correction_cases() {
        check(c.name, correction_cpu(&c), &c.want);
    }
}

#[test]
fn kl_cpu_cases() {
    for c in kl_cases() {
        check(c.name, kl_cpu(&c), &c.want);
    }
}

fn policy_cpu(c: &PolicyCase) -> Result<Vec<f32>> {
    let inputs = PolicyLossInputs {
        logp: &c.logp[..],
        old_logp: c.old_logp.as_deref(),
        ref_logp: c.ref_logp.as_deref(),
        advantages: Advantage::PerSequence(&c.advantages[..]),
        mask: c.mask.as_deref(),
        layout: SeqLayout::Padded {
            batch: c.batch,
            seq_len: c.logp.len() / c.batch,
        },
        pg_weights: None,
    };
    let out = policy_loss(&inputs, &c.cfg)?;
    match &c.backward {
        None => Ok([out.per_token, out.summary].concat()),
        Some((grad_loss, per_token)) => policy_loss_backward(&inputs, &c.cfg, *grad_loss, Some(per_token)),
    }
}

#[test]
fn policy_loss_cpu_cases() {
    for c in policy_cases() {
        check(c.name, policy_cpu(&c), &c.want);
    }
}

fn sample_cpu(c: &SampleCase) -> Result<Vec<f32>> {
    sample(&SampleInputs::new(&c.logits, c.vocab), &c.cfg).map(|s| s.logp)
}

#[test]
fn sampling_cpu_cases() {
    for c in sample_cases() {
        check(c.name, sample_cpu(&c), &c.want);
    }
}

// --------------------------------------------------------------- candle

#[cfg(feature = "candle")]
mod candle {
    //! The same cases through the candle ops; backward cases run
    //! `backward()` on a loss whose gradients with respect to the op's
    //! outputs are exactly the case's upstream gradients.
    use candle_core::{DType as CDType, Device, Tensor, Var};
    use grpo_kernels::candle as ops;
    use grpo_kernels::DType;

    use super::*;

    type CResult<T> = candle_core::Result<T>;

    /// A candle outcome against `want`, compared by message (candle 0.11
    /// wraps this crate's errors as `Display` only; see
    /// `crate::common::assert_typed_error`).
    #[track_caller]
    fn check_candle(name: &str, r: CResult<Vec<Tensor>>, want: &Option<Error>) {
        let r = r.map_err(|mut e| {
            if let candle_core::Error::WithBacktrace { inner, .. } = e {
                e = *inner;
            }
            match e {
                candle_core::Error::Wrapped(got) => got.to_string(),
                other => panic!("{name}: candle's own error {other:?}, not this crate's"),
            }
        });
        match (r, want) {
            (Err(got), Some(want)) => assert_eq!(got, want.to_string(), "{name}"),
            (Err(got), None) => panic!("{name}: unexpected {got}"),
            (Ok(_), Some(want)) => panic!("{name}: expected {want}"),
            (Ok(outs), None) => {
                for t in outs {
                    let v = t
                        .flatten_all()
                        .unwrap()
                        .to_dtype(CDType::F32)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    assert!(v.iter().all(|x| x.is_finite()), "{name}: {v:?}");
                }
            }
        }
    }

    fn dtype(d: DType) -> CDType {
        match d {
            DType::F32 => CDType::F32,
            DType::BF16 => CDType::BF16,
            DType::F16 => CDType::F16,
        }
    }

    fn tensor(xs: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(xs.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// `sum(x * g)`: its gradient with respect to `x` is `g`.
    fn weighted(x: &Tensor, g: &[f32]) -> CResult<Tensor> {
        (x * tensor(g, x.dims()))?.sum_all()
    }

    fn logprob_candle(c: &LogProbCase) -> CResult<Vec<Tensor>> {
        let rows = c.targets.len();
        let logits = Var::from_tensor(&tensor(&c.logits, &[rows, c.vocab]).to_dtype(dtype(c.dtype))?)?;
        let targets = Tensor::new(&c.targets[..], &Device::Cpu)?;
        let mask = c
            .mask
            .as_ref()
            .map(|m| Tensor::new(&m[..], &Device::Cpu))
            .transpose()?;
        let out = ops::token_logprobs(&logits, &targets, mask.as_ref(), &c.cfg)?;
        let Some(g) = &c.grads else {
            return Ok([vec![out.logp, out.lse], out.entropy.into_iter().collect()].concat());
        };
        let mut loss = (weighted(&out.logp, &g.logp)? + weighted(&out.lse, &g.lse)?)?;
        if let (Some(h), Some(gh)) = (&out.entropy, &g.entropy) {
            loss = (loss + weighted(h, gh)?)?;
        }
        let grads = loss.backward()?;
        Ok(vec![grads.get(&logits).unwrap().clone()])
    }

    #[test]
    fn logprob_candle_cases() {
        for c in logprob_cases() {
            check_candle(c.name, logprob_candle(&c), &c.want);
        }
    }

    fn fused_candle(c: &FusedCase) -> CResult<Vec<Tensor>> {
        let rows = c.targets.len();
        let d = dtype(c.dtype);
        let hidden = Var::from_tensor(&tensor(&c.hidden, &[rows, c.h]).to_dtype(d)?)?;
        let weight = Var::from_tensor(&tensor(&c.weight, &[c.weight.len() / c.h, c.h]).to_dtype(d)?)?;
        let targets = Tensor::new(&c.targets[..], &Device::Cpu)?;
        let out = ops::fused_linear_logprobs(&hidden, &weight, &targets, None, &c.cfg)?;
        let Some(g) = &c.grads else {
            return Ok(vec![out.logp, out.lse]);
        };
        let grads = (weighted(&out.logp, &g.logp)? + weighted(&out.lse, &g.lse)?)?.backward()?;
        Ok(vec![
            grads.get(&hidden).unwrap().clone(),
            grads.get(&weight).unwrap().clone(),
        ])
    }

    #[test]
    fn fused_linear_candle_cases() {
        // candle's op takes no bias.
        for c in fused_cases().into_iter().filter(|c| c.bias.is_none()) {
            check_candle(c.name, fused_candle(&c), &c.want);
        }
    }

    fn advantages_candle(c: &AdvCase) -> CResult<Vec<Tensor>> {
        let g = c.group_size;
        let k = c.weights.as_ref().map_or(1, Vec::len);
        let p = c.values.len() / (k * g);
        let shape = if c.weights.is_some() {
            vec![k, p, g]
        } else {
            vec![p, g]
        };
        let out = ops::group_advantages(&tensor(&c.values, &shape), c.weights.as_deref(), c.mode)?;
        Ok(vec![out.advantages, out.rewards, out.group_mean, out.group_std])
    }

    #[test]
    fn advantages_candle_cases() {
        for c in advantage_cases() {
            check_candle(c.name, advantages_candle(&c), &c.want);
        }
    }

    fn correction_candle(c: &CorrectionCase) -> CResult<Vec<Tensor>> {
        let shape = [c.batch, c.logp.len() / c.batch];
        let logp = tensor(&c.logp, &shape);
        let sampler = tensor(&c.sampler_logp, &shape);
        let mask = c
            .mask
            .as_ref()
            .map(|m| Tensor::from_vec(m.clone(), &shape[..], &Device::Cpu).unwrap());
        let inputs = ops::SamplerLogpTensors {
            logp: &logp,
            sampler_logp: &sampler,
            mask: mask.as_ref(),
            cu_seqlens: None,
        };
        Ok(vec![match c.op {
            Correction::SamplerIs(cfg) => ops::sampler_is_weights(&inputs, &cfg)?.0,
            Correction::OffPolicy { threshold } => {
                let adv = tensor(&c.advantages, &[c.advantages.len()]);
                ops::off_policy_mask(&inputs, &adv, threshold)?
            }
            Correction::Entropy { top_quantile } => {
                ops::high_entropy_mask(&logp, mask.as_ref(), top_quantile)?
            }
        }])
    }

    /// Lengths that disagree are shapes candle checks itself (its own error).
    #[test]
    fn corrections_candle_cases() {
        let shapes_agree = |c: &CorrectionCase| c.sampler_logp.len() == c.logp.len();
        for c in correction_cases().into_iter().filter(shapes_agree) {
            check_candle(c.name, correction_candle(&c), &c.want);
        }
    }

    fn kl_candle(c: &KlCase) -> CResult<Vec<Tensor>> {
        let n = c.logp.len();
        let logp = Var::from_tensor(&tensor(&c.logp, &[n]))?;
        let kl = ops::kl_divergence(&logp, &tensor(&c.ref_logp, &[n]), c.est)?;
        let Some(g) = &c.grad else { return Ok(vec![kl]) };
        let grads = weighted(&kl, g)?.backward()?;
        Ok(vec![grads.get(&logp).unwrap().clone()])
    }

    #[test]
    fn kl_candle_cases() {
        for c in kl_cases() {
            check_candle(c.name, kl_candle(&c), &c.want);
        }
    }

    fn policy_candle(c: &PolicyCase) -> CResult<Vec<Tensor>> {
        let shape = [c.batch, c.logp.len() / c.batch];
        let logp = Var::from_tensor(&tensor(&c.logp, &shape))?;
        let old = c.old_logp.as_ref().map(|o| tensor(o, &shape));
        let reference = c.ref_logp.as_ref().map(|r| tensor(r, &shape));
        let mask = c
            .mask
            .as_ref()
            .map(|m| Tensor::from_vec(m.clone(), &shape[..], &Device::Cpu))
            .transpose()?;
        let advantages = tensor(&c.advantages, &[c.batch]);
        let inputs = ops::PolicyLossTensors {
            old_logp: old.as_ref(),
            ref_logp: reference.as_ref(),
            advantages: &advantages,
            mask: mask.as_ref(),
            cu_seqlens: None,
            pg_weights: None,
        };
        let out = ops::policy_loss(&logp, &inputs, &c.cfg)?;
        let Some((grad_loss, per_token)) = &c.backward else {
            return Ok(vec![out.loss, out.per_token]);
        };
        let loss = (out.loss.affine(*grad_loss as f64, 0.0)? + weighted(&out.per_token, per_token)?)?;
        let grads = loss.backward()?;
        Ok(vec![grads.get(&logp).unwrap().clone()])
    }

    #[test]
    fn policy_loss_candle_cases() {
        for c in policy_cases() {
            check_candle(c.name, policy_candle(&c), &c.want);
        }
    }

    #[test]
    fn sampling_candle_cases() {
        for c in sample_cases() {
            let logits = tensor(&c.logits, &[c.logits.len() / c.vocab, c.vocab]);
            let r = ops::sample(&logits, &c.cfg)
                .map(|(tokens, logp)| vec![tokens.to_dtype(CDType::F32).unwrap(), logp]);
            check_candle(c.name, r, &c.want);
        }
    }
}
