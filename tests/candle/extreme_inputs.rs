//! The candle ops fed random finite inputs of any magnitude, drawn alike
//! with the CPU suite's (`tests/cpu/extreme_inputs.rs`; the strategies are
//! `common::extreme`'s), forward and `backward()` with upstream gradients of
//! any magnitude: a typed error (this crate's, wrapped) or finite outputs
//! and gradients.

use crate::common::extreme::{
    batch, extremes, head, logprob_cfg, policy_cfg, rows, Batch, Head, Rows, ESTIMATORS,
};
use candle_core::{DType, Device, Tensor, Var};
use grpo_kernels::candle as ops;
use grpo_kernels::{
    AdvantageMode, FusedLinearConfig, KlEstimator, LogProbConfig, PolicyLossConfig, SamplingConfig,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

type CResult<T> = candle_core::Result<T>;

fn tensor(xs: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(xs.to_vec(), shape, &Device::Cpu).unwrap()
}

/// `sum(x * g)`: its gradient with respect to `x` is `g`.
fn weighted(x: &Tensor, g: &[f32]) -> CResult<Tensor> {
    (x * tensor(&g[..x.elem_count()], x.dims()))?.sum_all()
}

/// Ok: every tensor finite. Err: this crate's error (candle wraps it).
#[track_caller]
fn check(r: CResult<Vec<Tensor>>) {
    match r {
        Ok(ts) => {
            for t in ts {
                let v = t
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
            }
        }
        Err(mut e) => {
            if let candle_core::Error::WithBacktrace { inner, .. } = e {
                e = *inner;
            }
            assert!(
                matches!(e, candle_core::Error::Wrapped(_)),
                "candle's own error: {e:?}"
            );
        }
    }
}

fn logprob_step(r: &Rows, cfg: &LogProbConfig, g: &[f32]) -> CResult<Vec<Tensor>> {
    let n = r.targets.len();
    let logits = Var::from_tensor(&tensor(&r.logits, &[n, r.vocab]))?;
    let targets = Tensor::new(&r.targets[..], &Device::Cpu)?;
    let mask = Tensor::new(&r.mask[..], &Device::Cpu)?;
    let out = ops::token_logprobs(&logits, &targets, Some(&mask), cfg)?;
    let mut loss = (weighted(&out.logp, g)? + weighted(&out.lse, &g[n..])?)?;
    if let Some(h) = &out.entropy {
        loss = (loss + weighted(h, &g[2 * n..])?)?;
    }
    let grads = loss.backward()?;
    Ok(vec![out.logp, out.lse, grads.get(&logits).unwrap().clone()])
}

fn fused_step(x: &Head, cfg: &FusedLinearConfig, g: &[f32]) -> CResult<Vec<Tensor>> {
    let n = x.targets.len();
    let hidden = Var::from_tensor(&tensor(&x.hidden, &[n, x.h]))?;
    let weight = Var::from_tensor(&tensor(&x.weight, &[x.weight.len() / x.h, x.h]))?;
    let targets = Tensor::new(&x.targets[..], &Device::Cpu)?;
    let out = ops::fused_linear_logprobs(&hidden, &weight, &targets, None, cfg)?;
    let grads = (weighted(&out.logp, g)? + weighted(&out.lse, &g[n..])?)?.backward()?;
    Ok(vec![
        out.logp,
        grads.get(&hidden).unwrap().clone(),
        grads.get(&weight).unwrap().clone(),
    ])
}

fn kl_step(x: &[f32], est: KlEstimator) -> CResult<Vec<Tensor>> {
    let n = x.len() / 3;
    let logp = Var::from_tensor(&tensor(&x[..n], &[n]))?;
    let kl = ops::kl_divergence(&logp, &tensor(&x[n..2 * n], &[n]), est)?;
    let grads = weighted(&kl, &x[2 * n..])?.backward()?;
    Ok(vec![kl, grads.get(&logp).unwrap().clone()])
}

fn policy_step(b: &Batch, cfg: &PolicyLossConfig) -> CResult<Vec<Tensor>> {
    let shape = [b.s, b.logp.len() / b.s];
    let logp = Var::from_tensor(&tensor(&b.logp, &shape))?;
    let (old, reference) = (tensor(&b.old, &shape), tensor(&b.reference, &shape));
    let (adv, mask) = (
        tensor(&b.adv, &[b.s]),
        Tensor::from_vec(b.mask.clone(), &shape[..], &Device::Cpu)?,
    );
    let inputs = ops::PolicyLossTensors {
        old_logp: Some(&old),
        ref_logp: (cfg.beta > 0.0).then_some(&reference),
        advantages: &adv,
        mask: Some(&mask),
        cu_seqlens: None,
        pg_weights: None,
    };
    let out = ops::policy_loss(&logp, &inputs, cfg)?;
    let n = b.logp.len();
    let loss = (out.loss.affine(b.grad[n] as f64, 0.0)? + weighted(&out.per_token, &b.grad)?)?;
    let grads = loss.backward()?;
    Ok(vec![out.loss, out.per_token, grads.get(&logp).unwrap().clone()])
}

proptest! {
    // Its own regressions: by default proptest names the file after the
    // source's path below its binary's `main.rs`, the CPU suite's file.
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/candle_extreme_inputs.txt"
        )))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn candle_ops_and_backward(
        r in rows(),
        x in head(),
        b in batch(),
        logprob in logprob_cfg(),
        policy in policy_cfg(),
        g in extremes(12),
        est in 0..4usize,
    ) {
        check(logprob_step(&r, &logprob, &g));
        let fused = FusedLinearConfig { logprob, ..FusedLinearConfig::default() };
        check(fused_step(&x, &fused, &g));
        check(kl_step(&g[..9], ESTIMATORS[est]));
        check(policy_step(&b, &policy));
        let rewards = tensor(&g[..4], &[2, 2]);
        check(ops::group_advantages(&rewards, None, AdvantageMode::LeaveOneOut)
            .map(|a| vec![a.advantages, a.group_std]));
        let cfg = SamplingConfig { temperature: logprob.temperature, ..SamplingConfig::default() };
        check(ops::sample(&tensor(&r.logits, &[r.targets.len(), r.vocab]), &cfg).map(|(_, logp)| vec![logp]));
    }
}
