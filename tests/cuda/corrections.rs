//! CUDA corrections against the CPU ops: fresh random padded and packed
//! batches of awkward sizes (sequences longer than a block, more entropies
//! than the select kernel's threads, ties), every IS mode, weights that
//! start from random values (the `_into` product), and the status word for
//! non-finite inputs.
#![cfg(feature = "cuda")]

use crate::common::corrections::{batch_sized, Layout, MODES};
use crate::common::gpu::{down, gpu, sanitizer, up};
use crate::common::{assert_close, Rng};
use grpo_kernels::cuda::{self, Device};
use grpo_kernels::{
    high_entropy_mask_into, off_policy_mask_into, sampler_is_weights_into, DeviceFault, Error,
    SamplerIsConfig, SamplerLogps, SeqLayout,
};

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn corrections_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(31);
    let sizes: &[(usize, usize)] = if sanitizer() {
        &[(3, 5), (17, 300)]
    } else {
        &[(3, 5), (17, 300), (64, 1500), (1, 4099)]
    };
    for &(seqs, max_len) in sizes {
        for packed in [false, true] {
            let b = batch_sized(&mut rng, seqs, max_len, packed);
            let n = b.logp.len();
            let start: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 + 0.5).collect();
            let host = SamplerLogps {
                logp: &b.logp[..],
                sampler_logp: &b.sampler[..],
                mask: Some(&b.mask[..]),
                layout: b.layout.get(),
            };
            let (d_logp, d_sampler, d_mask, d_adv, d_ent) = (
                up(&gpu, &b.logp),
                up(&gpu, &b.sampler),
                up(&gpu, &b.mask),
                up(&gpu, &b.adv),
                up(&gpu, &b.entropy),
            );
            let d_cu = match &b.layout {
                Layout::Packed(cu) => Some(up(&gpu, cu)),
                Layout::Padded(..) => None,
            };
            let dev = SamplerLogps::<Device> {
                logp: d_logp.as_view(),
                sampler_logp: d_sampler.as_view(),
                mask: Some(d_mask.as_view()),
                layout: match (&b.layout, &d_cu) {
                    (Layout::Padded(batch, seq_len), _) => SeqLayout::Padded {
                        batch: *batch,
                        seq_len: *seq_len,
                    },
                    (Layout::Packed(_), Some(cu)) => SeqLayout::Packed {
                        cu_seqlens: cu.as_view(),
                    },
                    _ => unreachable!(),
                },
            };
            let what = format!("{seqs} x {max_len}, packed {packed}");
            for (j, mode) in MODES.into_iter().enumerate() {
                let bounds = [(None, Some(3.0)), (Some(0.6), Some(1.8)), (Some(0.9), None)][j % 3];
                let cfg = SamplerIsConfig {
                    mode,
                    clip_min: bounds.0,
                    clip_max: bounds.1,
                };
                let mut want = start.clone();
                let want_stats = sampler_is_weights_into(&host, &cfg, &mut want).unwrap();
                let mut got = up(&gpu, &start);
                let stats = cuda::sampler_is_weights_into(&gpu, &dev, &cfg, &mut got.as_view_mut()).unwrap();
                gpu.check().unwrap();
                assert_close(
                    &format!("IS {mode:?} {what}"),
                    &down(&gpu, &got),
                    &widen(&want),
                    1e-30,
                    2e-6,
                );
                let s = |s: grpo_kernels::SamplerIsStats| {
                    [
                        s.ratio_min,
                        s.ratio_mean,
                        s.ratio_max,
                        s.logp_diff_mean,
                        s.logp_diff_max,
                    ]
                };
                assert_close(
                    &format!("IS stats {mode:?} {what}"),
                    &s(stats),
                    &widen(&s(want_stats)),
                    1e-7,
                    2e-6,
                );
            }
            for delta in [-0.05f32, 0.0, 0.05] {
                let mut want = start.clone();
                off_policy_mask_into(&host, &b.adv, delta, &mut want).unwrap();
                let mut got = up(&gpu, &start);
                cuda::off_policy_mask_into(&gpu, &dev, &d_adv.as_view(), delta, &mut got.as_view_mut())
                    .unwrap();
                gpu.check().unwrap();
                assert_eq!(down(&gpu, &got), want, "OPSM delta {delta} {what}");
            }
            for rho in [0.0, 0.2, 0.5, 0.77, 1.0] {
                for mask in [Some(&d_mask), None] {
                    let mut want = start.clone();
                    let host_mask = mask.map(|_| &b.mask[..]);
                    high_entropy_mask_into(&b.entropy, host_mask, rho, &mut want).unwrap();
                    let mut got = up(&gpu, &start);
                    let m = mask.map(|m| m.as_view());
                    cuda::high_entropy_mask_into(
                        &gpu,
                        &d_ent.as_view(),
                        m.as_ref(),
                        rho,
                        &mut got.as_view_mut(),
                    )
                    .unwrap();
                    gpu.check().unwrap();
                    assert_eq!(
                        down(&gpu, &got),
                        want,
                        "entropy rho {rho} {what} mask {}",
                        mask.is_some()
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn non_finite_inputs_raise_the_status_word() {
    let gpu = gpu();
    let layout = Layout::Padded(2, 3);
    let logp = [-1.0f32, f32::NAN, -1.0, -1.0, -1.0, -1.0];
    let sampler = [-1.0f32, -1.0, -1.0, -1.0, -1.0, -1.0];
    let mask = [1u8, 1, 1, 1, 1, 1];
    let (d_logp, d_sampler, d_mask) = (up(&gpu, &logp), up(&gpu, &sampler), up(&gpu, &mask));
    let Layout::Padded(batch, seq_len) = layout else {
        unreachable!()
    };
    let dev = SamplerLogps::<Device> {
        logp: d_logp.as_view(),
        sampler_logp: d_sampler.as_view(),
        mask: Some(d_mask.as_view()),
        layout: SeqLayout::Padded { batch, seq_len },
    };
    let mut w = up(&gpu, &[1.0f32; 6]);
    cuda::sampler_is_weights_into(&gpu, &dev, &SamplerIsConfig::default(), &mut w.as_view_mut()).unwrap();
    let want = |index| Error::Device {
        op: "corrections",
        fault: DeviceFault::NonFinite,
        index,
    };
    assert_eq!(gpu.check().unwrap_err(), want(1));
    let ent = up(&gpu, &[0.5f32, 1.0, f32::INFINITY, 0.0, 0.1, 0.2]);
    cuda::high_entropy_mask_into(&gpu, &ent.as_view(), None, 0.2, &mut w.as_view_mut()).unwrap();
    assert_eq!(gpu.check().unwrap_err(), want(2));
}
