//! The candle ops on CUDA tensors against the same ops on CPU tensors:
//! values and gradients through candle's autograd (feature `candle-cuda`).
#![cfg(feature = "candle-cuda")]

use crate::common::tensors::{to32, to64};
use crate::common::{assert_close, Rng};
use candle_core::{DType, Device, Tensor, Var};
use grpo_kernels::candle::token_logprobs;
use grpo_kernels::LogProbConfig;

#[test]
#[ignore = "needs a CUDA device"]
fn token_logprobs_on_cuda_equal_cpu_with_gradients() {
    let cuda = Device::new_cuda(0).expect("a CUDA device");
    let mut rng = Rng::new(21);
    let (b, t, v) = (3, 37, 4099);
    for dtype in [DType::F32, DType::BF16] {
        let logits: Vec<f32> = rng.normals(b * t * v, 3.0);
        let targets: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
        let mask: Vec<u8> = (0..b * t).map(|i| (i % 7 != 0) as u8).collect();
        let w: Vec<f32> = (0..3 * b * t).map(|_| rng.normal() as f32).collect();
        let cfg = LogProbConfig {
            temperature: 0.8,
            entropy: true,
            ignore_index: None,
        };
        let run = |dev: &Device| {
            let x = Var::from_tensor(
                &Tensor::from_vec(logits.clone(), (b, t, v), dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let tt = Tensor::from_vec(targets.clone(), (b, t), dev).unwrap();
            let mt = Tensor::from_vec(mask.clone(), (b, t), dev).unwrap();
            let wt = Tensor::from_vec(w.clone(), (3, b, t), dev).unwrap();
            let out = token_logprobs(&x, &tt, Some(&mt), &cfg).unwrap();
            let h = out.entropy.clone().unwrap();
            let loss = ((out.logp.mul(&wt.get(0).unwrap()).unwrap().sum_all().unwrap()
                + h.mul(&wt.get(1).unwrap()).unwrap().sum_all().unwrap())
            .unwrap()
                + out.lse.mul(&wt.get(2).unwrap()).unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let dx = grads.get(&x).unwrap().clone();
            (out.logp, h, out.lse, dx)
        };
        let (cpu, gpu) = (run(&Device::Cpu), run(&cuda));
        let what = format!("{dtype:?}");
        assert_close(&format!("logp {what}"), &to32(&gpu.0), &to64(&cpu.0), 1e-4, 1e-4);
        assert_close(
            &format!("entropy {what}"),
            &to32(&gpu.1),
            &to64(&cpu.1),
            1e-4,
            1e-4,
        );
        assert_close(&format!("lse {what}"), &to32(&gpu.2), &to64(&cpu.2), 1e-4, 1e-4);
        let tol = if dtype == DType::BF16 { 2e-2 } else { 1e-4 };
        assert_close(
            &format!("dlogits {what}"),
            &to32(&gpu.3),
            &to64(&cpu.3),
            1e-4,
            tol,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn policy_loss_and_sampling_on_cuda_equal_cpu() {
    use grpo_kernels::candle::{policy_loss, sample, PolicyLossTensors};
    use grpo_kernels::{Aggregation, KlEstimator, PolicyLossConfig, SamplingConfig};
    let cuda = Device::new_cuda(0).expect("a CUDA device");
    let mut rng = Rng::new(22);
    let (s, t) = (6, 333);
    let logp: Vec<f32> = (0..s * t).map(|_| (rng.normal() * 0.5 - 2.0) as f32).collect();
    let old: Vec<f32> = logp.iter().map(|&l| l + (rng.normal() * 0.3) as f32).collect();
    let reference: Vec<f32> = logp.iter().map(|&l| l + (rng.normal() * 0.2) as f32).collect();
    let adv: Vec<f32> = (0..s).map(|_| rng.normal() as f32).collect();
    let mask: Vec<u8> = (0..s * t).map(|i| (i % 11 != 0) as u8).collect();
    for aggregation in [
        Aggregation::TokenMean { normalizer: None },
        Aggregation::SeqMeanTokenMean,
    ] {
        let cfg = PolicyLossConfig {
            beta: 0.04,
            kl: KlEstimator::K3,
            aggregation,
            ..PolicyLossConfig::default()
        };
        let run = |dev: &Device| {
            let x = Var::from_tensor(&Tensor::from_vec(logp.clone(), (s, t), dev).unwrap()).unwrap();
            let o = Tensor::from_vec(old.clone(), (s, t), dev).unwrap();
            let r = Tensor::from_vec(reference.clone(), (s, t), dev).unwrap();
            let a = Tensor::from_vec(adv.clone(), s, dev).unwrap();
            let m = Tensor::from_vec(mask.clone(), (s, t), dev).unwrap();
            let inputs = PolicyLossTensors {
                old_logp: Some(&o),
                ref_logp: Some(&r),
                advantages: &a,
                mask: Some(&m),
                cu_seqlens: None,
                pg_weights: None,
            };
            let out = policy_loss(&x, &inputs, &cfg).unwrap();
            // Gradient through both the loss and the per-token terms.
            let total = (&out.loss + (out.per_token.sum_all().unwrap() * 0.5).unwrap()).unwrap();
            let grads = total.backward().unwrap();
            (out.loss, out.per_token, out.stats, grads.get(&x).unwrap().clone())
        };
        let (cpu, gpu) = (run(&Device::Cpu), run(&cuda));
        let what = format!("{aggregation:?}");
        assert_close(&format!("loss {what}"), &to32(&gpu.0), &to64(&cpu.0), 1e-6, 1e-5);
        assert_close(
            &format!("per-token {what}"),
            &to32(&gpu.1),
            &to64(&cpu.1),
            1e-6,
            2e-5,
        );
        assert_eq!(gpu.2.tokens, cpu.2.tokens);
        assert_close(&format!("dlogp {what}"), &to32(&gpu.3), &to64(&cpu.3), 1e-7, 2e-5);
    }

    let (b, v) = (16, 5003);
    let logits: Vec<f32> = rng.normals(b * v, 3.0);
    let cfg = SamplingConfig {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        seed: 9,
        step: 4,
        ..SamplingConfig::default()
    };
    let draw = |dev: &Device| {
        let x = Tensor::from_vec(logits.clone(), (b, v), dev).unwrap();
        let (tokens, logp) = sample(&x, &cfg).unwrap();
        assert!(tokens.device().same_device(dev));
        (tokens.to_vec1::<u32>().unwrap(), to32(&logp))
    };
    let (cpu, gpu) = (draw(&Device::Cpu), draw(&cuda));
    assert_eq!(gpu.0, cpu.0);
    assert_close(
        "sampled logp",
        &gpu.1,
        &cpu.1.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        2e-5,
        2e-5,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_linear_kl_and_advantages_on_cuda_equal_cpu() {
    use grpo_kernels::candle::{fused_linear_logprobs, group_advantages, kl_divergence};
    use grpo_kernels::{AdvantageMode, FusedLinearConfig, KlEstimator};
    let cuda = Device::new_cuda(0).expect("a CUDA device");
    let mut rng = Rng::new(22);

    // Fused linear log-probs with gradients for hidden and weight.
    let (n, h, v) = (300, 64, 5003);
    let hidden: Vec<f32> = rng.normals(n * h, 1.0);
    let weight: Vec<f32> = rng.normals(v * h, 0.3);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let w: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let cfg = FusedLinearConfig {
        chunk_rows: 128,
        chunk_vocab: 2048,
        ..FusedLinearConfig::default()
    };
    let run = |dev: &Device| {
        let hv = Var::from_tensor(&Tensor::from_vec(hidden.clone(), (n, h), dev).unwrap()).unwrap();
        let wv = Var::from_tensor(&Tensor::from_vec(weight.clone(), (v, h), dev).unwrap()).unwrap();
        let tt = Tensor::from_vec(targets.clone(), n, dev).unwrap();
        let out = fused_linear_logprobs(&hv, &wv, &tt, None, &cfg).unwrap();
        let wt = Tensor::from_vec(w.clone(), n, dev).unwrap();
        let grads = out.logp.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
        (
            out.logp,
            grads.get(&hv).unwrap().clone(),
            grads.get(&wv).unwrap().clone(),
        )
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&cuda));
    assert_close("fused logp", &to32(&gpu.0), &to64(&cpu.0), 1e-4, 1e-4);
    assert_close("fused dhidden", &to32(&gpu.1), &to64(&cpu.1), 1e-4, 1e-3);
    assert_close("fused dweight", &to32(&gpu.2), &to64(&cpu.2), 1e-4, 1e-3);

    // KL with gradients for both inputs.
    let logp: Vec<f32> = (0..1000).map(|_| rng.range(-5.0, -0.1) as f32).collect();
    let reference: Vec<f32> = logp.iter().map(|&l| l + rng.range(-1.0, 1.0) as f32).collect();
    let run = |dev: &Device| {
        let a = Var::from_tensor(&Tensor::new(logp.as_slice(), dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(reference.as_slice(), dev).unwrap()).unwrap();
        let kl = kl_divergence(&a, &b, KlEstimator::K3).unwrap();
        let grads = kl.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        (kl, grads.get(&a).unwrap().clone(), grads.get(&b).unwrap().clone())
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&cuda));
    assert_close("kl", &to32(&gpu.0), &to64(&cpu.0), 1e-6, 1e-5);
    assert_close("dkl/dlogp", &to32(&gpu.1), &to64(&cpu.1), 1e-6, 1e-5);
    assert_close("dkl/dref", &to32(&gpu.2), &to64(&cpu.2), 1e-6, 1e-5);

    // Advantages of weighted components.
    let (k, p, g) = (3, 64, 8);
    let values: Vec<f32> = (0..k * p * g).map(|_| (rng.below(5) as f32) * 0.25).collect();
    let weights = [1.0f32, 2.0, 5.0];
    let run = |dev: &Device| {
        let t = Tensor::from_vec(values.clone(), (k, p, g), dev).unwrap();
        group_advantages(&t, Some(&weights), AdvantageMode::default()).unwrap()
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&cuda));
    assert_close(
        "advantages",
        &to32(&gpu.advantages),
        &to64(&cpu.advantages),
        1e-6,
        1e-5,
    );
    assert_close(
        "group_std",
        &to32(&gpu.group_std),
        &to64(&cpu.group_std),
        1e-6,
        1e-6,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn corrections_on_cuda_equal_cpu() {
    use crate::common::corrections::{batch_sized, Layout};
    use grpo_kernels::candle::{high_entropy_mask, off_policy_mask, sampler_is_weights, SamplerLogpTensors};
    use grpo_kernels::SamplerIsConfig;
    let cuda = Device::new_cuda(0).expect("a CUDA device");
    let mut rng = Rng::new(41);
    for packed in [false, true] {
        let b = batch_sized(&mut rng, 9, 700, packed);
        let run = |dev: &Device| {
            let t = |x: &[f32]| match &b.layout {
                Layout::Padded(s, l) => Tensor::from_vec(x.to_vec(), (*s, *l), dev).unwrap(),
                Layout::Packed(_) => Tensor::from_vec(x.to_vec(), x.len(), dev).unwrap(),
            };
            let mask = match &b.layout {
                Layout::Padded(s, l) => Tensor::from_vec(b.mask.clone(), (*s, *l), dev).unwrap(),
                Layout::Packed(_) => Tensor::from_vec(b.mask.clone(), b.mask.len(), dev).unwrap(),
            };
            let cu = match &b.layout {
                Layout::Packed(cu) => Some(Tensor::new(&cu[..], dev).unwrap()),
                Layout::Padded(..) => None,
            };
            let (logp, sampler, ent) = (t(&b.logp), t(&b.sampler), t(&b.entropy));
            let adv = Tensor::new(&b.adv[..], dev).unwrap();
            let inputs = SamplerLogpTensors {
                logp: &logp,
                sampler_logp: &sampler,
                mask: Some(&mask),
                cu_seqlens: cu.as_ref(),
            };
            let (w, stats) = sampler_is_weights(&inputs, &SamplerIsConfig::default()).unwrap();
            let opsm = off_policy_mask(&inputs, &adv, 0.0).unwrap();
            let h = high_entropy_mask(&ent, Some(&mask), 0.2).unwrap();
            (w, stats, opsm, h)
        };
        let (cpu, gpu) = (run(&Device::Cpu), run(&cuda));
        assert_close("IS weights", &to32(&gpu.0), &to64(&cpu.0), 1e-30, 2e-6);
        assert_close(
            "IS ratio mean",
            &[gpu.1.ratio_mean],
            &[cpu.1.ratio_mean as f64],
            1e-7,
            2e-6,
        );
        assert_eq!(to32(&gpu.2), to32(&cpu.2), "OPSM");
        assert_eq!(to32(&gpu.3), to32(&cpu.3), "entropy mask");
    }
}
