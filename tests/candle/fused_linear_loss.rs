//! The fused LM-head + GRPO loss through candle: `loss.backward()` gives
//! the gradients of the two-call form (candle's `fused_linear_logprobs`
//! then `policy_loss`, differentiated by candle's autograd), padded and
//! packed, f32 and bf16; an upstream gradient scales them; bad inputs are
//! the CPU op's typed errors.

use crate::common::tensors::{to32, to64};
use crate::common::{assert_close, assert_typed_error, Rng};
use candle_core::{DType, Device, Tensor, Var};
use grpo_kernels::candle::{fused_linear_logprobs, fused_linear_policy_loss, policy_loss, PolicyLossTensors};
use grpo_kernels::{
    Aggregation, Error, FusedLinearConfig, FusedLossConfig, ImportanceLevel, KlEstimator, LogProbConfig,
    PolicyLossConfig,
};

struct Case {
    hidden: Var,
    weight: Var,
    targets: Tensor,
    old: Tensor,
    reference: Tensor,
    adv: Tensor,
    mask: Tensor,
    cu: Option<Tensor>,
    cfg: FusedLossConfig,
}

fn case(packed: bool, dtype: DType, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let dev = Device::Cpu;
    let (s, t, h, v) = (3, 7, 12, 53);
    let n = s * t;
    let dims: Vec<usize> = if packed { vec![n] } else { vec![s, t] };
    let mut hdims = dims.clone();
    hdims.push(h);
    let hidden: Vec<f32> = rng.normals(n * h, 1.0);
    let weight: Vec<f32> = rng.normals(v * h, 0.4);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let old: Vec<f32> = (0..n).map(|_| (-4.0 + rng.normal() * 0.5) as f32).collect();
    let reference: Vec<f32> = (0..n).map(|_| (-4.0 + rng.normal() * 0.5) as f32).collect();
    let adv: Vec<f32> = (0..s).map(|_| rng.normal() as f32).collect();
    let mask: Vec<u8> = (0..n).map(|i| (i % t < t - i / t * 2) as u8).collect();
    let cfg = FusedLossConfig {
        logprob: LogProbConfig {
            temperature: 0.9,
            entropy: seed.is_multiple_of(2),
            ignore_index: None,
        },
        loss: PolicyLossConfig {
            beta: 0.04,
            kl: KlEstimator::K3,
            aggregation: [
                Aggregation::SeqMeanTokenMean,
                Aggregation::TokenMean { normalizer: None },
            ][seed as usize % 2],
            ..PolicyLossConfig::default()
        },
        chunk_rows: 5,
        chunk_vocab: 16,
    };
    let tensor = |xs: &[f32], shape: &[usize]| Tensor::from_slice(xs, shape, &dev).unwrap();
    Case {
        hidden: Var::from_tensor(&tensor(&hidden, &hdims).to_dtype(dtype).unwrap()).unwrap(),
        weight: Var::from_tensor(&tensor(&weight, &[v, h]).to_dtype(dtype).unwrap()).unwrap(),
        targets: Tensor::from_slice(&targets, dims.as_slice(), &dev).unwrap(),
        old: tensor(&old, &dims),
        reference: tensor(&reference, &dims),
        adv: tensor(&adv, &[s]),
        mask: Tensor::from_slice(&mask, dims.as_slice(), &dev).unwrap(),
        cu: packed.then(|| Tensor::new(&[0u32, t as u32, 2 * t as u32, n as u32], &dev).unwrap()),
        cfg,
    }
}

impl Case {
    fn inputs(&self) -> PolicyLossTensors<'_> {
        PolicyLossTensors {
            old_logp: Some(&self.old),
            ref_logp: Some(&self.reference),
            advantages: &self.adv,
            mask: Some(&self.mask),
            cu_seqlens: self.cu.as_ref(),
            pg_weights: None,
        }
    }
}

#[test]
fn backward_equals_the_two_call_chain() {
    for (packed, dtype, seed, tol) in [
        (false, DType::F32, 1, 1e-5),
        (true, DType::F32, 2, 1e-5),
        (false, DType::BF16, 3, 2e-2),
        (true, DType::F32, 4, 1e-5),
    ] {
        let c = case(packed, dtype, seed);
        let fused = fused_linear_policy_loss(&c.hidden, &c.weight, &c.targets, &c.inputs(), &c.cfg).unwrap();
        let fused_grads = fused.loss.backward().unwrap();

        let lin = FusedLinearConfig {
            logprob: c.cfg.logprob,
            chunk_rows: c.cfg.chunk_rows,
            chunk_vocab: c.cfg.chunk_vocab,
        };
        let lp = fused_linear_logprobs(&c.hidden, &c.weight, &c.targets, Some(&c.mask), &lin).unwrap();
        let chain = policy_loss(&lp.logp, &c.inputs(), &c.cfg.loss).unwrap();
        let chain_grads = chain.loss.backward().unwrap();

        let ctx = format!("packed {packed} {dtype:?}");
        assert_close(
            &format!("{ctx} loss"),
            &to32(&fused.loss),
            &to64(&chain.loss),
            1e-6,
            1e-5,
        );
        assert_close(
            &format!("{ctx} logp"),
            &to32(&fused.logp),
            &to64(&lp.logp),
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("{ctx} per_token"),
            &to32(&fused.per_token),
            &to64(&chain.per_token),
            1e-5,
            1e-4,
        );
        assert_eq!(fused.stats.tokens, chain.stats.tokens);
        assert_eq!(fused.entropy.is_some(), c.cfg.logprob.entropy);
        for (what, var) in [("dh", &c.hidden), ("dW", &c.weight)] {
            let got = fused_grads.get(var).unwrap();
            let want = chain_grads.get(var).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.dtype(), dtype);
            let want = to64(want);
            let scale = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
            assert_close(&format!("{ctx} {what}"), &to32(got), &want, tol * scale, tol);
        }
    }
}

#[test]
fn an_upstream_gradient_scales_the_gradients() {
    let c = case(false, DType::F32, 5);
    let one = fused_linear_policy_loss(&c.hidden, &c.weight, &c.targets, &c.inputs(), &c.cfg).unwrap();
    let g1 = one.loss.backward().unwrap();
    let three = fused_linear_policy_loss(&c.hidden, &c.weight, &c.targets, &c.inputs(), &c.cfg).unwrap();
    let g3 = (three.loss * 3.0).unwrap().backward().unwrap();
    for var in [&c.hidden, &c.weight] {
        let want: Vec<f64> = to64(g1.get(var).unwrap()).iter().map(|x| 3.0 * x).collect();
        assert_close("3 x loss", &to32(g3.get(var).unwrap()), &want, 1e-7, 1e-6);
    }
    // A second backward through the same graph recomputes the gradients.
    let again = one.loss.backward().unwrap();
    assert_close(
        "second backward",
        &to32(again.get(&c.weight).unwrap()),
        &to64(g1.get(&c.weight).unwrap()),
        0.0,
        0.0,
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    const OP: &str = "fused_linear_policy_loss";
    let c = case(false, DType::F32, 6);
    let mut cfg = c.cfg;
    cfg.loss.importance = ImportanceLevel::Sequence;
    let r = fused_linear_policy_loss(&c.hidden, &c.weight, &c.targets, &c.inputs(), &cfg);
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains(OP) && msg.contains("GSPO"), "{msg}");

    let mut old = to32(&c.old);
    old[2] = f32::NAN;
    let old = Tensor::from_slice(&old, c.old.dims(), &Device::Cpu).unwrap();
    let inputs = PolicyLossTensors {
        old_logp: Some(&old),
        ..c.inputs()
    };
    assert_typed_error(
        fused_linear_policy_loss(&c.hidden, &c.weight, &c.targets, &inputs, &c.cfg),
        Error::NonFinite {
            op: OP,
            what: "old_logp",
            index: 2,
        },
    );
    let weights = c.old.ones_like().unwrap();
    let inputs = PolicyLossTensors {
        pg_weights: Some(&weights),
        ..c.inputs()
    };
    let msg = fused_linear_policy_loss(&c.hidden, &c.weight, &c.targets, &inputs, &c.cfg)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(OP) && msg.contains("pg_weights"), "{msg}");
    let short = c.weight.narrow(1, 0, 11).unwrap();
    let msg = fused_linear_policy_loss(&c.hidden, &short, &c.targets, &c.inputs(), &c.cfg)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(OP), "{msg}");
}
