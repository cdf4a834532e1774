//! The policy loss, fused linear log-probs and sampling through candle:
//! same values as the raw ops, and gradients through candle's autograd
//! equal to those of the same math composed from candle tensor ops. And
//! `candle::nn`'s refusals: the typed error for each bad parameter or shape.
#![cfg(feature = "candle")]

use crate::common::composed::composed_grpo;
use crate::common::tensors::{to32, to64};
use crate::common::{assert_close, assert_typed_error, Rng};
use candle_core::{DType, Device, Tensor, Var, D};
use grpo_kernels::candle::{fused_linear_logprobs, policy_loss, sample, token_logprobs, PolicyLossTensors};
use grpo_kernels::{
    Advantage, Aggregation, FusedLinearConfig, KlEstimator, LogProbConfig, PolicyLossConfig,
    PolicyLossInputs, SamplingConfig, SeqLayout,
};

#[test]
fn policy_loss_equals_raw_op_and_composed_candle_math() {
    let mut rng = Rng::new(11);
    let dev = Device::Cpu;
    let (s, t) = (5, 23);
    let n = s * t;
    let logp: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.3 - 2.0) as f32).collect();
    let old: Vec<f32> = logp.iter().map(|&x| x + (rng.normal() * 0.2) as f32).collect();
    let reference: Vec<f32> = logp.iter().map(|&x| x + (rng.normal() * 0.2) as f32).collect();
    let adv: Vec<f32> = (0..s).map(|_| rng.normal() as f32).collect();
    let mask: Vec<u8> = (0..n).map(|i| (i % t < t - (i / t) * 3) as u8).collect();
    let cfg = PolicyLossConfig {
        beta: 0.04,
        kl: KlEstimator::K3,
        aggregation: Aggregation::SeqMeanTokenMean,
        ..Default::default()
    };

    let raw = grpo_kernels::policy_loss(
        &PolicyLossInputs::new(
            &logp,
            Advantage::per_sequence(&adv),
            SeqLayout::Padded { batch: s, seq_len: t },
        )
        .with_old(&old)
        .with_ref(&reference)
        .with_mask(&mask),
        &cfg,
    )
    .unwrap();

    let logp_t = Var::from_tensor(&Tensor::from_vec(logp, (s, t), &dev).unwrap()).unwrap();
    let old_t = Tensor::from_vec(old, (s, t), &dev).unwrap();
    let ref_t = Tensor::from_vec(reference, (s, t), &dev).unwrap();
    let adv_t = Tensor::from_vec(adv, s, &dev).unwrap();
    let mask_t = Tensor::from_vec(mask, (s, t), &dev).unwrap();
    let inputs = PolicyLossTensors {
        old_logp: Some(&old_t),
        ref_logp: Some(&ref_t),
        advantages: &adv_t,
        mask: Some(&mask_t),
        cu_seqlens: None,
    };
    let ours = policy_loss(&logp_t, &inputs, &cfg).unwrap();
    assert_eq!(ours.loss.to_scalar::<f32>().unwrap(), raw.loss());
    assert_eq!(to32(&ours.per_token), raw.per_token);
    assert_eq!(ours.stats, raw.stats());

    let composed = composed_grpo(
        &logp_t,
        &old_t,
        &ref_t,
        &adv_t,
        &mask_t.to_dtype(DType::F32).unwrap(),
        &cfg,
    )
    .unwrap();
    let want_loss = composed.to_scalar::<f32>().unwrap() as f64;
    assert_close("loss", &[raw.loss()], &[want_loss], 1e-6, 1e-5);
    let g_ours = ours.loss.backward().unwrap();
    let g_composed = composed.backward().unwrap();
    assert_close(
        "dlogp",
        &to32(g_ours.get(&logp_t).unwrap()),
        &to64(g_composed.get(&logp_t).unwrap()),
        1e-6,
        1e-4,
    );
}

#[test]
fn policy_loss_packed_per_token_advantages_gradient_matches_raw_backward() {
    let mut rng = Rng::new(12);
    let dev = Device::Cpu;
    let cu: Vec<u32> = vec![0, 4, 4, 11, 20];
    let n = 20;
    let logp: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.3 - 1.0) as f32).collect();
    let adv: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let cfg = PolicyLossConfig {
        beta: 0.0,
        aggregation: Aggregation::TokenMean {
            normalizer: Some(64.0),
        },
        ..Default::default()
    };
    let inputs = PolicyLossInputs::new(
        &logp,
        Advantage::per_token(&adv),
        SeqLayout::Packed { cu_seqlens: &cu },
    );
    // d(3 loss + sum 2 l_t)/dlogp, through candle and raw.
    let want = grpo_kernels::policy_loss_backward(&inputs, &cfg, 3.0, Some(&vec![2.0; n])).unwrap();
    let logp_t = Var::from_tensor(&Tensor::from_vec(logp, n, &dev).unwrap()).unwrap();
    let adv_t = Tensor::from_vec(adv, n, &dev).unwrap();
    let cu_t = Tensor::from_vec(cu, 5, &dev).unwrap();
    let out = policy_loss(
        &logp_t,
        &PolicyLossTensors {
            old_logp: None,
            ref_logp: None,
            advantages: &adv_t,
            mask: None,
            cu_seqlens: Some(&cu_t),
        },
        &cfg,
    )
    .unwrap();
    let total = ((out.loss * 3.0).unwrap() + (out.per_token.sum_all().unwrap() * 2.0).unwrap()).unwrap();
    let got = total.backward().unwrap();
    assert_eq!(to32(got.get(&logp_t).unwrap()), want);
}

#[test]
fn policy_loss_rejects_bad_shapes_and_dtypes() {
    let dev = Device::Cpu;
    let logp = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let adv = Tensor::zeros(2, DType::F32, &dev).unwrap();
    let base = PolicyLossTensors {
        old_logp: None,
        ref_logp: None,
        advantages: &adv,
        mask: None,
        cu_seqlens: None,
    };
    let cfg = PolicyLossConfig {
        beta: 0.0,
        ..Default::default()
    };
    let err = |r: candle_core::Result<_>| {
        r.map(|_: grpo_kernels::candle::PolicyLossOutput| ())
            .unwrap_err()
            .to_string()
    };
    assert!(err(policy_loss(&logp.flatten_all().unwrap(), &base, &cfg)).contains("padded"));
    let bad_adv = Tensor::zeros(3, DType::F32, &dev).unwrap();
    assert!(err(policy_loss(
        &logp,
        &PolicyLossTensors {
            advantages: &bad_adv,
            ..base
        },
        &cfg
    ))
    .contains("advantages"));
    let f64_mask = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
    assert!(err(policy_loss(
        &logp,
        &PolicyLossTensors {
            mask: Some(&f64_mask),
            ..base
        },
        &cfg
    ))
    .contains("mask"));
    let nan = Tensor::new(&[[0.0f32, f32::NAN, 0.0], [0.0, 0.0, 0.0]], &dev).unwrap();
    let nan_err = err(policy_loss(&nan, &base, &cfg));
    assert!(nan_err.contains("`logp` is not finite (NaN, infinity or beyond its type's range) at index 1"));
}

#[test]
fn fused_linear_equals_matmul_then_logprobs_with_gradients() {
    let mut rng = Rng::new(13);
    let dev = Device::Cpu;
    let (b, t, h, v) = (2, 7, 12, 53);
    let hidden =
        Var::from_tensor(&Tensor::from_vec(rng.normals::<f32>(b * t * h, 1.0), (b, t, h), &dev).unwrap())
            .unwrap();
    let weight =
        Var::from_tensor(&Tensor::from_vec(rng.normals::<f32>(v * h, 0.4), (v, h), &dev).unwrap()).unwrap();
    let targets = Tensor::from_vec(
        (0..b * t).map(|_| rng.below(v) as u32).collect::<Vec<_>>(),
        (b, t),
        &dev,
    )
    .unwrap();
    let mask = Tensor::from_vec(
        (0..b * t).map(|i| (i % 5 != 0) as u8).collect::<Vec<_>>(),
        (b, t),
        &dev,
    )
    .unwrap();
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            temperature: 0.9,
            entropy: true,
            ignore_index: None,
        },
        chunk_rows: 4,
        chunk_vocab: 16,
    };
    let fused = fused_linear_logprobs(&hidden, &weight, &targets, Some(&mask), &cfg).unwrap();
    // The same through materialized logits: candle matmul, then our log-prob op.
    let logits = hidden.broadcast_matmul(&weight.t().unwrap()).unwrap();
    let plain = token_logprobs(&logits, &targets, Some(&mask), &cfg.logprob).unwrap();
    assert_close("logp", &to32(&fused.logp), &to64(&plain.logp), 1e-5, 1e-5);
    assert_close("lse", &to32(&fused.lse), &to64(&plain.lse), 1e-5, 1e-5);
    let h_ent = |o: &grpo_kernels::candle::LogProbTensors| o.entropy.clone().unwrap();
    assert_close(
        "entropy",
        &to32(&h_ent(&fused)),
        &to64(&h_ent(&plain)),
        1e-5,
        1e-5,
    );

    // A loss on all three outputs, with different weights.
    let loss = |o: &grpo_kernels::candle::LogProbTensors| {
        let a = o.logp.sum_all().unwrap();
        let b = (h_ent(o).sum_all().unwrap() * 0.3).unwrap();
        let c = (o.lse.sqr().unwrap().sum_all().unwrap() * 0.01).unwrap();
        ((a + b).unwrap() + c).unwrap()
    };
    let (gf, gp) = (loss(&fused).backward().unwrap(), loss(&plain).backward().unwrap());
    for (name, var) in [("dhidden", &hidden), ("dweight", &weight)] {
        assert_close(
            name,
            &to32(gf.get(var).unwrap()),
            &to64(gp.get(var).unwrap()),
            1e-5,
            1e-4,
        );
    }
}

#[test]
fn fused_linear_rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let hidden = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
    let weight = Tensor::zeros((5, 7), DType::F32, &dev).unwrap();
    let targets = Tensor::zeros(3, DType::U32, &dev).unwrap();
    let cfg = FusedLinearConfig::default();
    assert!(fused_linear_logprobs(&hidden, &weight, &targets, None, &cfg).is_err());
    let weight16 = Tensor::zeros((5, 8), DType::F16, &dev).unwrap();
    assert!(fused_linear_logprobs(&hidden, &weight16, &targets, None, &cfg).is_err());
    let bad_targets = Tensor::new(&[0u32, 9, 1], &dev).unwrap();
    let weight = Tensor::zeros((5, 8), DType::F32, &dev).unwrap();
    assert!(fused_linear_logprobs(&hidden, &weight, &bad_targets, None, &cfg).is_err());
}

#[test]
fn sampling_equals_raw_op_for_every_dtype() {
    let mut rng = Rng::new(14);
    let (b, v) = (9, 101);
    let logits: Vec<f32> = rng.normals(b * v, 2.0);
    let cfg = SamplingConfig {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        seed: 5,
        step: 3,
        ..Default::default()
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let t = Tensor::from_vec(logits.clone(), (b, v), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let rounded = to32(&t);
        let want = grpo_kernels::sample(&grpo_kernels::SampleInputs::new(&rounded, v), &cfg).unwrap();
        let (tokens, logp) = sample(&t, &cfg).unwrap();
        assert_eq!(tokens.to_vec1::<u32>().unwrap(), want.tokens, "{dtype:?}");
        assert_eq!(logp.to_vec1::<f32>().unwrap(), want.logp, "{dtype:?}");
    }
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..Default::default()
    };
    let t = Tensor::from_vec(logits, (b, v), &Device::Cpu).unwrap();
    let (tokens, _) = sample(&t, &greedy).unwrap();
    assert_eq!(
        tokens.to_vec1::<u32>().unwrap(),
        t.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()
    );
}

#[test]
fn group_advantages_equal_raw_op_with_weighted_components() {
    use grpo_kernels::candle::group_advantages as candle_advantages;
    use grpo_kernels::{group_advantages, AdvantageMode, Rewards};
    let mut rng = Rng::new(31);
    let (k, p, g) = (3usize, 5usize, 4usize);
    let mut values: Vec<f32> = (0..k * p * g).map(|_| (rng.below(5) as f32) * 0.25).collect();
    // Prompt 2 flat in every component: exactly 0.
    for c in 0..k {
        values[c * p * g + 2 * g..c * p * g + 3 * g].fill(0.5);
    }
    let weights = [1.0f32, 2.0, 5.0];
    let t = Tensor::from_vec(values.clone(), (k, p, g), &Device::Cpu).unwrap();
    for mode in [
        AdvantageMode::default(),
        AdvantageMode::GroupMean,
        AdvantageMode::LeaveOneOut,
    ] {
        let got = candle_advantages(&t, Some(&weights), mode).unwrap();
        let want = group_advantages(&Rewards::new(&values, g).with_weights(&weights), mode).unwrap();
        assert_eq!(got.advantages.dims(), &[p, g]);
        assert_eq!(to32(&got.advantages), want.advantages);
        assert_eq!(to32(&got.rewards), want.rewards);
        assert_eq!(to32(&got.group_mean), want.group_mean);
        assert_eq!(to32(&got.group_std), want.group_std);
        assert!(to32(&got.advantages)[2 * g..3 * g].iter().all(|&a| a == 0.0));
    }
    // One component without weights; shapes that do not match the weights.
    let one = Tensor::from_vec(values[..p * g].to_vec(), (p, g), &Device::Cpu).unwrap();
    assert!(candle_advantages(&one, None, AdvantageMode::default()).is_ok());
    assert!(candle_advantages(&one, Some(&weights), AdvantageMode::default()).is_err());
    assert!(candle_advantages(&t, None, AdvantageMode::default()).is_err());
    assert!(candle_advantages(
        &t.to_dtype(DType::F64).unwrap(),
        Some(&weights),
        AdvantageMode::default()
    )
    .is_err());
}

#[test]
fn kl_equals_raw_op_and_rejects_bad_inputs() {
    use grpo_kernels::candle::kl_divergence as candle_kl;
    use grpo_kernels::{kl_divergence, KlEstimator, KlInputs};
    let mut rng = Rng::new(32);
    let logp: Vec<f32> = (0..37).map(|_| rng.range(-5.0, -0.1) as f32).collect();
    let reference: Vec<f32> = logp.iter().map(|&l| l + rng.range(-1.0, 1.0) as f32).collect();
    let (a, b) = (
        Tensor::new(logp.as_slice(), &Device::Cpu).unwrap(),
        Tensor::new(reference.as_slice(), &Device::Cpu).unwrap(),
    );
    for est in [
        KlEstimator::K1,
        KlEstimator::K2,
        KlEstimator::K3,
        KlEstimator::LowVarK3,
    ] {
        let want = kl_divergence(&KlInputs::new(&logp, &reference), est).unwrap();
        assert_eq!(to32(&candle_kl(&a, &b, est).unwrap()), want);
    }
    assert!(candle_kl(&a, &b.narrow(0, 0, 36).unwrap(), KlEstimator::K3).is_err());
    assert!(candle_kl(&a.to_dtype(DType::BF16).unwrap(), &b, KlEstimator::K3).is_err());
    let nan = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
    assert!(candle_kl(&nan, &nan, KlEstimator::K3).is_err());
}

#[test]
fn nn_norms_reject_bad_eps_weights_and_dtypes_with_typed_errors() {
    use candle_core::Module;
    use grpo_kernels::candle::nn::{layer_normalize, rms_normalize, LayerNorm, RmsNorm};
    use grpo_kernels::Error;
    let dev = Device::Cpu;
    let x = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
    let (w, b) = (
        Tensor::ones(4, DType::F32, &dev).unwrap(),
        Tensor::zeros(4, DType::F32, &dev).unwrap(),
    );
    let bad_eps = |op, value| Error::InvalidParameter {
        op,
        name: "eps",
        value,
        expected: "finite and >= 0",
    };
    // Both paths: fused (F32) and composed (F64).
    for x in [x.clone(), x.to_dtype(DType::F64).unwrap()] {
        for eps in [-1e-6, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_typed_error(rms_normalize(&x, eps), bad_eps("rms_normalize", eps));
            assert_typed_error(layer_normalize(&x, eps), bad_eps("layer_normalize", eps));
        }
        assert!(rms_normalize(&x, 0.0).is_ok() && layer_normalize(&x, 0.0).is_ok());
    }
    let norm = LayerNorm::new(w.clone(), Some(b.clone()), -1.0);
    assert_typed_error(norm.forward(&x), bad_eps("layer_normalize", -1.0));
    assert_typed_error(
        RmsNorm::new(w.clone(), f64::NAN).forward(&x),
        bad_eps("rms_normalize", f64::NAN),
    );

    // A weight or bias must hold one value per column: a [1] tensor would
    // broadcast silently, a [2, 4] one stack the rows.
    let shape = |op, what, got| Error::ShapeMismatch {
        op,
        what,
        expected: 4,
        got,
    };
    let one = Tensor::ones(1, DType::F32, &dev).unwrap();
    let two_rows = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
    let ln = |w: &Tensor, b: Option<&Tensor>| LayerNorm::new(w.clone(), b.cloned(), 1e-6).forward(&x);
    assert_typed_error(ln(&one, Some(&b)), shape("layer_norm", "weight", 1));
    assert_typed_error(ln(&w, Some(&two_rows)), shape("layer_norm", "bias", 8));
    assert_typed_error(
        RmsNorm::new(two_rows.clone(), 1e-6).forward(&x),
        shape("rms_norm", "weight", 8),
    );
    // [4, 1] is still one value per column.
    let column = w.reshape((4, 1)).unwrap();
    assert_eq!(
        to32(&ln(&column, Some(&b)).unwrap()),
        to32(&ln(&w, Some(&b)).unwrap())
    );

    // Integer input would round the normalized values back to integers.
    let ids = Tensor::ones((2, 4), DType::U32, &dev).unwrap();
    for (op, r) in [
        ("rms_normalize", rms_normalize(&ids, 1e-6)),
        ("layer_normalize", layer_normalize(&ids, 1e-6)),
    ] {
        let reason = "`x` must be F32, F64, BF16 or F16, got U32".to_string();
        assert_typed_error(r, Error::Unsupported { op, reason });
    }
}

#[test]
fn rope_rejects_odd_dims_and_tables_of_the_wrong_width() {
    use grpo_kernels::candle::nn::{rope, rope_tables};
    use grpo_kernels::Error;
    let dev = Device::Cpu;
    let (cos, sin) = rope_tables(3, 6, 10_000.0, &dev).unwrap();
    let x = Tensor::ones((1, 2, 3, 6), DType::F32, &dev).unwrap();
    assert!(rope(&x, &cos, &sin).is_ok());
    // An odd dimension: the last column has no partner.
    let odd = Tensor::ones((1, 2, 3, 7), DType::F32, &dev).unwrap();
    assert_typed_error(
        rope(&odd, &cos, &sin),
        Error::InvalidParameter {
            op: "rope",
            name: "dim",
            value: 7.0,
            expected: "even (x's last dimension)",
        },
    );
    // Tables as wide as x (transformers' `cat(freqs, freqs)` layout) or too narrow.
    let wide = Tensor::cat(&[&cos, &cos], 1).unwrap();
    let mismatch = |what, got| Error::ShapeMismatch {
        op: "rope",
        what,
        expected: 3,
        got,
    };
    assert_typed_error(rope(&x, &wide, &sin), mismatch("cos's last dimension", 6));
    assert_typed_error(
        rope(&x, &cos, &sin.narrow(1, 0, 2).unwrap()),
        mismatch("sin's last dimension", 2),
    );
}

#[test]
fn rope_tables_reject_bad_theta_odd_dims_and_unrepresentable_lengths() {
    use grpo_kernels::candle::nn::rope_tables;
    use grpo_kernels::Error;
    let dev = Device::Cpu;
    let bad = |name, value, expected| Error::InvalidParameter {
        op: "rope_tables",
        name,
        value,
        expected,
    };
    for theta in [0.0, -10.0, f64::NAN, f64::INFINITY] {
        assert_typed_error(
            rope_tables(4, 8, theta, &dev),
            bad("theta", theta, "finite and > 0"),
        );
    }
    assert_typed_error(rope_tables(4, 7, 1e4, &dev), bad("dim", 7.0, "even"));
    // Positions are u32 ids: one more would have wrapped to a shorter table.
    let seq = u32::MAX as usize + 1;
    assert_typed_error(
        rope_tables(seq, 8, 1e4, &dev),
        bad("seq", seq as f64, "at most u32::MAX"),
    );
}
