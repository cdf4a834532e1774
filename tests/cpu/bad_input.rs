//! Bad input, op family by op family, on the CPU ops: every case of
//! `common::bad_input` gives its typed error or succeeds with finite
//! outputs. The same cases through the candle ops and their autograd are
//! `tests/candle/bad_input.rs` (the same errors); on a GPU,
//! `tests/cuda/bad_input.rs`.

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
