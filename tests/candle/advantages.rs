//! Group advantages through candle: the raw op's values, weighted components
//! included.

use crate::common::tensors::to32;
use crate::common::Rng;
use candle_core::{DType, Device, Tensor};

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
