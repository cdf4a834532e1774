//! The bad-input cases of `crate::common::bad_input` through the candle
//! ops and their autograd: every case gives the CPU ops' typed error
//! (candle wraps it; compared by message) or succeeds with finite outputs.
//! Backward cases run `backward()` on a loss whose gradients with respect to
//! the op's outputs are exactly the case's upstream gradients. The same
//! cases on the CPU ops: `tests/cpu/bad_input.rs`; on a GPU:
//! `tests/cuda/bad_input.rs`.

use crate::common::bad_input::{
    advantage_cases, correction_cases, fused_cases, kl_cases, logprob_cases, policy_cases, sample_cases,
    AdvCase, Correction, CorrectionCase, FusedCase, KlCase, LogProbCase, PolicyCase,
};
use candle_core::{DType as CDType, Device, Tensor, Var};
use grpo_kernels::candle as ops;
use grpo_kernels::{DType, Error};

type CResult<T> = candle_core::Result<T>;

/// A candle outcome against `want`, compared by message (candle 0.11
/// wraps this crate's errors as `Display` only; see
/// `crate::common::assert_typed_error`).
#[track_caller]
fn check(name: &str, r: CResult<Vec<Tensor>>, want: &Option<Error>) {
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
        check(c.name, logprob_candle(&c), &c.want);
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
        check(c.name, fused_candle(&c), &c.want);
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
        check(c.name, advantages_candle(&c), &c.want);
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
        Correction::Entropy { top_quantile } => ops::high_entropy_mask(&logp, mask.as_ref(), top_quantile)?,
    }])
}

/// Lengths that disagree are shapes candle checks itself (its own error).
#[test]
fn corrections_candle_cases() {
    let shapes_agree = |c: &CorrectionCase| c.sampler_logp.len() == c.logp.len();
    for c in correction_cases().into_iter().filter(shapes_agree) {
        check(c.name, correction_candle(&c), &c.want);
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
        check(c.name, kl_candle(&c), &c.want);
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
        check(c.name, policy_candle(&c), &c.want);
    }
}

#[test]
fn sampling_candle_cases() {
    for c in sample_cases() {
        let logits = tensor(&c.logits, &[c.logits.len() / c.vocab, c.vocab]);
        let r = ops::sample(&logits, &c.cfg)
            .map(|(tokens, logp)| vec![tokens.to_dtype(CDType::F32).unwrap(), logp]);
        check(c.name, r, &c.want);
    }
}
