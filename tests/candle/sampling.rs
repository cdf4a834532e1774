//! Sampling through candle: the same tokens and log-probs as the raw op, for
//! every dtype.

use crate::common::tensors::to32;
use crate::common::Rng;
use candle_core::{DType, Device, Tensor, D};
use grpo_kernels::candle::sample;
use grpo_kernels::SamplingConfig;

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
