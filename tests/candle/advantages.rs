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

/// TRL's and verl's advantages (`tests/fixtures/advantages_reference.json`)
/// through candle: `[K, P, G]` tensors with TRL's weights, NaN rewards,
/// `normalize_then_sum`, verl's groups of one.
#[test]
fn trl_and_verl_advantages_through_candle() {
    use crate::common::{assert_close, fixture, fixture_f64s, trl_case, trl_settings, verl_settings};
    use grpo_kernels::candle::group_advantages;
    let fx = fixture("advantages_reference.json");
    for case in fx["trl"].as_array().unwrap() {
        let (values, weights, g) = trl_case(case);
        let k = weights.len();
        let t = Tensor::from_vec(values.clone(), (k, values.len() / k / g, g), &Device::Cpu).unwrap();
        for (key, cfg) in trl_settings() {
            let got = group_advantages(&t, Some(&weights), cfg).unwrap();
            let want = fixture_f64s(&case["advantages"][key]);
            assert_close(
                &format!("TRL {key} {}", case["name"]),
                &to32(&got.advantages.flatten_all().unwrap()),
                &want,
                1e-6,
                1e-5,
            );
        }
    }
    for case in fx["verl"].as_array().unwrap() {
        let values: Vec<f32> = fixture_f64s(&case["rewards"]).iter().map(|&x| x as f32).collect();
        let g = case["group_size"].as_u64().unwrap() as usize;
        let t = Tensor::from_vec(values.clone(), (values.len() / g, g), &Device::Cpu).unwrap();
        for (key, cfg) in verl_settings() {
            let got = group_advantages(&t, None, cfg).unwrap();
            let want = fixture_f64s(&case["advantages"][key]);
            assert_close(
                &format!("verl {key} {}", case["name"]),
                &to32(&got.advantages.flatten_all().unwrap()),
                &want,
                1e-6,
                1e-5,
            );
        }
    }
}
