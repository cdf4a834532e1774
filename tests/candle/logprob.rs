//! Token log-probs through candle: same values as the raw op, and gradients
//! through candle's autograd against finite differences of the f64
//! reference, for every output and dtype.
#![cfg(feature = "candle")]

use crate::common::reference::logprob_rows;
use crate::common::{assert_close, finite_diff, widen, Rng};
use candle_core::{DType, Device, Tensor, Var};
use grpo_kernels::candle::token_logprobs;
use grpo_kernels::{token_logprobs as raw, LogProbConfig, LogitRows};

fn cfg(t: f32) -> LogProbConfig {
    LogProbConfig {
        temperature: t,
        entropy: true,
        ignore_index: None,
    }
}

#[test]
fn forward_equals_the_raw_op() {
    let mut rng = Rng::new(3);
    let (b, t, v) = (2, 3, 37);
    let logits: Vec<f32> = rng.normals(b * t * v, 2.0);
    let targets: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
    let want = raw(&LogitRows::new(&logits, &targets, v), &cfg(0.8)).unwrap();
    let lt = Tensor::from_vec(logits, (b, t, v), &Device::Cpu).unwrap();
    let tt = Tensor::from_vec(targets, (b, t), &Device::Cpu).unwrap();
    let got = token_logprobs(&lt, &tt, None, &cfg(0.8)).unwrap();
    assert_eq!(got.logp.dims(), &[b, t]);
    assert_eq!(
        got.logp.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.logp
    );
    let h = got
        .entropy
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(h, want.entropy.unwrap());
    assert_eq!(got.lse.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.lse);
}

#[test]
fn autograd_matches_finite_differences() {
    let mut rng = Rng::new(4);
    let (rows, v, temp) = (5, 13, 0.7f32);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let logits32: Vec<f32> = rng.normals(rows * v, 2.0);
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(v) as u32).collect();
        let weights: Vec<[f64; 3]> = (0..rows)
            .map(|_| [rng.normal(), rng.normal(), rng.normal()])
            .collect();
        let logits = Var::from_tensor(
            &Tensor::from_vec(logits32, (rows, v), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let tt = Tensor::from_vec(targets.clone(), rows, &Device::Cpu).unwrap();
        let out = token_logprobs(&logits, &tt, None, &cfg(temp)).unwrap();
        let w =
            |k: usize| Tensor::from_vec(weights.iter().map(|x| x[k] as f32).collect(), rows, &Device::Cpu);
        let loss = ((out.logp.mul(&w(0).unwrap()).unwrap()
            + out.entropy.unwrap().mul(&w(1).unwrap()).unwrap())
        .unwrap()
            + out.lse.mul(&w(2).unwrap()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
        let grads = loss.backward().unwrap();
        let got: Vec<f32> = grads
            .get(&logits)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        let stored: Vec<f32> = logits
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let tgt: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
        let w64: Vec<[f64; 3]> = weights
            .iter()
            .map(|x| [x[0] as f32 as f64, x[1] as f32 as f64, x[2] as f32 as f64])
            .collect();
        let want = finite_diff(&widen(&stored), 1e-5, |z| {
            logprob_rows(z, &tgt, v, temp as f64)
                .iter()
                .zip(&w64)
                .map(|(o, w)| w[0] * o.0 + w[1] * o.1 + w[2] * o.2)
                .sum()
        });
        let rtol = match dtype {
            DType::F32 => 1e-4,
            DType::BF16 => 8e-3,
            _ => 1e-3,
        };
        assert_close(&format!("candle dlogits {dtype:?}"), &got, &want, 1e-6, rtol);
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let wrong_len = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
    assert!(token_logprobs(&logits, &wrong_len, None, &cfg(1.0)).is_err());
    let out_of_range = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
    let err = token_logprobs(&logits, &out_of_range, None, &cfg(1.0)).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let float_ids = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    assert!(token_logprobs(&logits, &float_ids, None, &cfg(1.0)).is_err());
    let int_logits = Tensor::zeros((2, 4), DType::U32, &Device::Cpu).unwrap();
    let ok_ids = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(token_logprobs(&int_logits, &ok_ids, None, &cfg(1.0)).is_err());
    assert!(token_logprobs(&logits, &ok_ids, None, &cfg(0.0)).is_err());
}
