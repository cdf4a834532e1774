//! Fused linear log-probs through candle: equal to a matmul then token
//! log-probs, with gradients (and against finite differences of an f64
//! reference, hidden and weight), and its refusals.

use crate::common::reference::logprob_rows;
use crate::common::tensors::{f64s, to32, to64, var, CPU};
use crate::common::{assert_close, finite_diff, Rng};
use candle_core::{DType, Device, Tensor, Var};
use grpo_kernels::candle::{fused_linear_logprobs, token_logprobs};
use grpo_kernels::{FusedLinearConfig, LogProbConfig};

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
fn fused_linear_gradients_match_finite_differences() {
    let mut rng = Rng::new(23);
    let (b, t, h, v) = (2usize, 3usize, 4usize, 7usize);
    let n = b * t;
    let hidden: Vec<f32> = (0..n * h).map(|_| rng.normal() as f32).collect();
    let weight: Vec<f32> = (0..v * h).map(|_| (rng.normal() * 0.8) as f32).collect();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let mask: Vec<u8> = (0..n).map(|i| (i != 4) as u8).collect();
    let w: Vec<[f32; 3]> = (0..n)
        .map(|_| [rng.normal() as f32, rng.normal() as f32, rng.normal() as f32])
        .collect();
    let temp = 0.8f32;
    // Chunks smaller than the problem, so tiles and row chunks are exercised.
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            temperature: temp,
            entropy: true,
            ignore_index: None,
        },
        chunk_rows: 4,
        chunk_vocab: 3,
    };
    let (hv, wv) = (var(&hidden, &[b, t, h]), var(&weight, &[v, h]));
    let targets_t = Tensor::from_vec(targets.clone(), (b, t), &CPU).unwrap();
    let mask_t = Tensor::from_vec(mask.clone(), (b, t), &CPU).unwrap();
    let out = fused_linear_logprobs(&hv, &wv, &targets_t, Some(&mask_t), &cfg).unwrap();
    let wk = |k: usize| Tensor::from_vec(w.iter().map(|x| x[k]).collect::<Vec<_>>(), (b, t), &CPU).unwrap();
    let objective = (out.logp.mul(&wk(0)).unwrap() + out.entropy.unwrap().mul(&wk(1)).unwrap())
        .unwrap()
        .add(&out.lse.mul(&wk(2)).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = objective.backward().unwrap();

    let reference = |hd: &[f64], wt: &[f64]| -> f64 {
        let logits: Vec<f64> = (0..n)
            .flat_map(|i| (0..v).map(move |j| (0..h).map(|k| hd[i * h + k] * wt[j * h + k]).sum::<f64>()))
            .collect();
        let tgt: Vec<usize> = targets.iter().map(|&x| x as usize).collect();
        logprob_rows(&logits, &tgt, v, temp as f64)
            .iter()
            .enumerate()
            .filter(|(i, _)| mask[*i] != 0)
            .map(|(i, o)| w[i][0] as f64 * o.0 + w[i][1] as f64 * o.1 + w[i][2] as f64 * o.2)
            .sum()
    };
    let (h64, w64) = (f64s(&hidden), f64s(&weight));
    let want_h = finite_diff(&h64, 1e-6, |x| reference(x, &w64));
    let want_w = finite_diff(&w64, 1e-6, |x| reference(&h64, x));
    let got_h = to32(&grads.get(&hv).unwrap().to_dtype(DType::F32).unwrap());
    let got_w = to32(grads.get(&wv).unwrap());
    assert_close("fused linear dhidden", &got_h, &want_h, 2e-5, 2e-4);
    assert_close("fused linear dweight", &got_w, &want_w, 2e-5, 2e-4);
    // The masked row's hidden state gets exactly zero gradient.
    assert!(got_h[4 * h..5 * h].iter().all(|&x| x == 0.0));
}
