//! The candle corrections on CPU tensors against TRL's fixture (padded
//! `[S, T]` and packed `[N]` + `cu_seqlens`), their products as one
//! `pg_weights` tensor, detachment, and typed errors.

use candle_core::{Device, Tensor, Var};
use grpo_kernels::candle::{
    high_entropy_mask, mask_truncated_completions, off_policy_mask, sampler_is_weights, SamplerLogpTensors,
};
use grpo_kernels::Error;

use crate::common::assert_close;
use crate::common::corrections::{f32s, fixture, is_config, u8s, Layout};
use crate::common::tensors::to32;

const CPU: Device = Device::Cpu;

/// A token array as the layout's tensor: `[S, T]` padded, `[N]` packed; and
/// the offsets tensor when packed.
fn shaped<T: candle_core::WithDType>(xs: Vec<T>, layout: &Layout) -> Tensor {
    match layout {
        Layout::Padded(b, t) => Tensor::from_vec(xs, (*b, *t), &CPU).unwrap(),
        Layout::Packed(_) => {
            let n = xs.len();
            Tensor::from_vec(xs, n, &CPU).unwrap()
        }
    }
}

fn offsets(layout: &Layout) -> Option<Tensor> {
    match layout {
        Layout::Packed(cu) => Some(Tensor::new(&cu[..], &CPU).unwrap()),
        Layout::Padded(..) => None,
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    to32(&t.flatten_all().unwrap())
}

#[test]
fn match_trl() {
    let fx = fixture();
    for c in fx["sampler_is"].as_array().unwrap() {
        let layout = Layout::from_json(&c["layout"]);
        let (old, sampler) = (
            shaped(f32s(&c["old_logp"]), &layout),
            shaped(f32s(&c["sampler_logp"]), &layout),
        );
        let (mask, cu) = (shaped(u8s(&c["mask"]), &layout), offsets(&layout));
        let inputs = SamplerLogpTensors {
            logp: &old,
            sampler_logp: &sampler,
            mask: Some(&mask),
            cu_seqlens: cu.as_ref(),
        };
        let (w, stats) = sampler_is_weights(&inputs, &is_config(c)).unwrap();
        assert_eq!(w.dims(), old.dims());
        let want: Vec<f64> = f32s(&c["weights"]).iter().map(|&x| x as f64).collect();
        assert_close(c["name"].as_str().unwrap(), &flat(&w), &want, 0.0, 1e-5);
        let want_min = c["stats"][0].as_f64().unwrap();
        assert_close("ratio min", &[stats.ratio_min], &[want_min], 1e-7, 1e-5);
    }
    for c in fx["off_policy"].as_array().unwrap() {
        let layout = Layout::from_json(&c["layout"]);
        let (logp, sampler) = (
            shaped(f32s(&c["logp"]), &layout),
            shaped(f32s(&c["sampler_logp"]), &layout),
        );
        let (mask, cu) = (shaped(u8s(&c["mask"]), &layout), offsets(&layout));
        let adv = Tensor::new(&f32s(&c["advantages"])[..], &CPU).unwrap();
        let inputs = SamplerLogpTensors {
            logp: &logp,
            sampler_logp: &sampler,
            mask: Some(&mask),
            cu_seqlens: cu.as_ref(),
        };
        let w = off_policy_mask(&inputs, &adv, c["threshold"].as_f64().unwrap() as f32).unwrap();
        assert_eq!(flat(&w), f32s(&c["weights"]), "{}", c["name"]);
    }
    for c in fx["high_entropy"].as_array().unwrap() {
        let layout = Layout::from_json(&c["layout"]);
        let (h, mask) = (
            shaped(f32s(&c["entropy"]), &layout),
            shaped(u8s(&c["mask"]), &layout),
        );
        let w = high_entropy_mask(&h, Some(&mask), c["top_quantile"].as_f64().unwrap()).unwrap();
        assert_eq!(flat(&w), f32s(&c["weights"]), "{}", c["name"]);
    }
    for c in fx["truncated"].as_array().unwrap() {
        let layout = Layout::from_json(&c["layout"]);
        let ids: Vec<i64> = c["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let stop: Vec<i64> = c["stop_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let (ids, mask, cu) = (
            shaped(ids, &layout),
            shaped(u8s(&c["mask"]), &layout),
            offsets(&layout),
        );
        let got = mask_truncated_completions(&ids, &mask, cu.as_ref(), &stop).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(got, u8s(&c["want_mask"]), "{}", c["name"]);
    }
}

#[test]
fn weights_are_detached_and_compose() {
    let logp = Var::from_tensor(&Tensor::new(&[[-1.0f32, -0.5], [-2.0, -0.3]], &CPU).unwrap()).unwrap();
    let sampler = Tensor::new(&[[-1.1f32, f32::NAN], [-1.8, -0.3]], &CPU).unwrap();
    let inputs = SamplerLogpTensors {
        logp: logp.as_tensor(),
        sampler_logp: &sampler,
        mask: None,
        cu_seqlens: None,
    };
    let (w, _) = sampler_is_weights(&inputs, &Default::default()).unwrap();
    let adv = Tensor::new(&[1.0f32, -1.0], &CPU).unwrap();
    let w = (w * off_policy_mask(&inputs, &adv, 0.0).unwrap()).unwrap();
    // The loss through the weights has no gradient path back to `logp` but `logp` itself.
    let loss = (logp.as_tensor() * &w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(
        flat(grads.get(&logp).unwrap()),
        flat(&w),
        "d/dlogp of sum(logp * w) is w: w is a constant"
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let x = Tensor::new(&[[0.1f32, 0.2]], &CPU).unwrap();
    let e = high_entropy_mask(&x, None, 1.5).unwrap_err();
    let want = Error::InvalidParameter {
        op: "high_entropy_mask",
        name: "top_quantile",
        value: 1.5,
        expected: "in [0, 1]",
    };
    crate::common::assert_typed_error::<()>(Err(e), want);
    let ids = Tensor::new(&[1.0f32, 2.0], &CPU).unwrap();
    let mask = Tensor::new(&[1u8, 1], &CPU).unwrap();
    assert!(
        mask_truncated_completions(&ids, &mask, None, &[2]).is_err(),
        "rank 1 without offsets"
    );
}
