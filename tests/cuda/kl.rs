//! CUDA KL estimators against the CPU op: fresh random inputs of awkward
//! sizes, every estimator, a NaN-poisoned memory pool, and the status word
//! for non-finite inputs.
#![cfg(feature = "cuda")]

use crate::common::gpu::{down, gpu, poison_pool, sanitizer, up};
use crate::common::{assert_close, Rng};
use grpo_kernels::cuda::{self, Device};
use grpo_kernels::{kl_divergence, kl_divergence_backward, DeviceFault, Error, KlEstimator, KlInputs};

const ESTIMATORS: [KlEstimator; 8] = crate::common::KL_ESTIMATORS;

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn kl_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(1);
    let sizes: &[usize] = if sanitizer() {
        &[1, 7, 1000]
    } else {
        &[1, 7, 1000, 262_147]
    };
    for &n in sizes {
        for est in ESTIMATORS {
            // Log-ratios from tiny (cancellation in k3) to past verl's clamps.
            let logp: Vec<f32> = (0..n).map(|_| (rng.normal() * 2.0 - 3.0) as f32).collect();
            let scale = [1e-4, 0.1, 3.0, 30.0][rng.below(4)];
            let ref_logp: Vec<f32> = logp.iter().map(|&l| l + (rng.normal() * scale) as f32).collect();
            let grad: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let host = KlInputs::new(&logp, &ref_logp);
            let want = kl_divergence(&host, est).unwrap();
            let want_d = kl_divergence_backward(&host, est, &grad).unwrap();

            let (d_logp, d_ref, d_grad) = (up(&gpu, &logp), up(&gpu, &ref_logp), up(&gpu, &grad));
            let dev = KlInputs::<Device> {
                logp: d_logp.as_view(),
                ref_logp: d_ref.as_view(),
            };
            poison_pool(&gpu, 2 * n);
            let got = cuda::kl_divergence(&gpu, &dev, est).unwrap();
            let got_d = cuda::kl_divergence_backward(&gpu, &dev, est, &d_grad.as_view()).unwrap();
            gpu.check().unwrap();
            let what = format!("{est:?} n={n} scale={scale}");
            assert_close(
                &format!("kl {what}"),
                &down(&gpu, &got),
                &widen(&want),
                1e-6,
                2e-6,
            );
            assert_close(
                &format!("dkl {what}"),
                &down(&gpu, &got_d),
                &widen(&want_d),
                1e-6,
                2e-6,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn kl_reports_non_finite_inputs_by_index() {
    let gpu = gpu();
    let mut logp = vec![-1.0f32; 5000];
    let ref_logp = vec![-1.5f32; 5000];
    logp[3210] = f32::NAN;
    logp[4000] = f32::INFINITY;
    let (d_logp, d_ref) = (up(&gpu, &logp), up(&gpu, &ref_logp));
    let dev = KlInputs::<Device> {
        logp: d_logp.as_view(),
        ref_logp: d_ref.as_view(),
    };
    cuda::kl_divergence(&gpu, &dev, KlEstimator::K3).unwrap();
    let err = gpu.check().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Device {
                fault: DeviceFault::NonFinite,
                index: 3210,
                op: "kl_divergence"
            }
        ),
        "{err}"
    );
    gpu.check().expect("check clears the status");
}
