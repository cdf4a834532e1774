//! CUDA fused linear log-probs (cuBLAS tiles + hand-written kernels) against
//! the CPU op: awkward sizes and chunkings, bias, mask with NaN hidden
//! states in skipped rows, temperature, entropy, every dtype, a
//! NaN-poisoned memory pool, and the status word for bad data.
#![cfg(feature = "cuda")]

use crate::common::gpu::{down, gpu, poison_pool, sized, up};
use crate::common::{assert_close, assert_close_rows, assert_within, Rng};
use grpo_kernels::cuda::{self, Device, Gpu, GpuFloat};
use grpo_kernels::{
    fused_linear_logprobs, fused_linear_logprobs_backward, DType, DeviceFault, Error, FusedLinearConfig,
    LinearRows, LogProbConfig, LogProbGrads, LogProbSaved, LogProbs,
};
use half::{bf16, f16};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
struct Case {
    rows: usize,
    hidden: usize,
    vocab: usize,
    chunk_rows: usize,
    chunk_vocab: usize,
    bias: bool,
    temperature: f32,
    entropy: bool,
}

fn cases() -> Vec<Case> {
    let shapes = [
        // rows, hidden, vocab, chunk_rows, chunk_vocab
        (1, 1, 1, 1, 1),
        (5, 7, 1021, 2, 300),
        (64, 96, 4099, 16, 1024),
        (300, 64, 32_000, 128, 8192),
        (33, 128, 151_936, 32, 16_384),
        (513, 256, 151_936, 4096, 16_384), // FusedLinearConfig::gpu()'s chunks
    ];
    let cases = shapes
        .iter()
        .enumerate()
        .map(|(i, &(rows, hidden, vocab, chunk_rows, chunk_vocab))| Case {
            rows,
            hidden,
            vocab,
            chunk_rows,
            chunk_vocab,
            bias: i % 2 == 1,
            temperature: [1.0, 0.7, 1.3][i % 3],
            entropy: i % 2 == 0,
        })
        .collect();
    sized(cases, |c| c.rows * c.vocab, 1 << 22)
}

/// `x` in f64.
fn widen_t<T: GpuFloat>(x: &[T]) -> Vec<f64> {
    x.iter().map(|y| y.to_f32() as f64).collect()
}

/// Elementwise bounds on how far the GPU's dW and db may lie from the CPU's.
///
/// Element `(v, j)` of dW is `sum_r dz[r, v] h[r, j]` over the active rows;
/// with `S = sum_r |dz[r, v] h[r, j]|` its error terms are:
/// - the GPU rounds dz to the dtype before its GEMM: `u S` (`u`: the
///   dtype's unit roundoff), and where dz is subnormal in the dtype (f16
///   below 6e-5; most of a wide softmax row) half its smallest step:
///   `tiny / 2 sum_r |h[r, j]|`;
/// - both sides add each of the `k` row chunks' f32 partial sums into the
///   dtype's output, each rounding a running sum no larger than `S` and
///   off by up to half the dtype's smallest step: `2 k (u S + tiny / 2)`;
/// - the f32 sums run in different orders: `n eps S`;
/// - the dlogits themselves differ through `log p`'s f32 error:
///   `sum_r dlogit_err(r) (p[r, v] + onehot[r, v]) |h[r, j]|`.
///
/// db is the same with `h = 1`.
struct WeightGradBounds {
    weight: Vec<f64>,
    bias: Vec<f64>,
}

impl WeightGradBounds {
    /// For the op's inputs `host`, its forward `fwd` and the backward's
    /// incoming `grads`.
    fn new<T: GpuFloat>(
        host: &LinearRows<T, i64>,
        cfg: &FusedLinearConfig,
        fwd: &LogProbs,
        grads: &LogProbGrads,
        dlogit_err: &(dyn Fn(usize) -> f64 + Sync),
        tiny: f64,
    ) -> Self {
        let (lse, entropy, g, g_h) = (&fwd.lse, fwd.entropy.as_deref(), grads.logp, grads.entropy);
        let h = host.hidden_size;
        let t = cfg.logprob.temperature as f64;
        let active: Vec<usize> = (0..host.targets.len())
            .filter(|&r| host.targets[r] >= 0 && host.mask.is_none_or(|m| m[r] != 0))
            .collect();
        let hidden: Vec<Vec<f64>> = active
            .iter()
            .map(|&r| widen_t(&host.hidden[r * h..(r + 1) * h]))
            .collect();
        let u = match T::DTYPE {
            DType::F32 => 2f64.powi(-24),
            DType::BF16 => 2f64.powi(-8),
            DType::F16 => 2f64.powi(-11),
        };
        let k = active.len().div_ceil(cfg.chunk_rows) as f64;
        let coef = u + 2.0 * k * u + active.len() as f64 * f32::EPSILON as f64;
        // Per vocabulary row v: `[S_w (h values), C_w (h), S_b, C_b]`.
        let per_v: Vec<Vec<f64>> = (0..host.weight.len() / h)
            .into_par_iter()
            .map(|v| {
                let w = widen_t(&host.weight[v * h..(v + 1) * h]);
                let b = host.bias.map_or(0.0, |b| b[v].to_f32() as f64);
                let mut acc = vec![0.0; 2 * h + 2];
                for (hr, &r) in hidden.iter().zip(&active) {
                    let z = hr.iter().zip(&w).map(|(x, y)| x * y).sum::<f64>() + b;
                    let logp = z / t - lse[r] as f64;
                    let p = logp.exp();
                    let onehot = f64::from(host.targets[r] as usize == v);
                    let mut dz = g[r] as f64 * (onehot - p);
                    if let (Some(gh), Some(ent)) = (g_h, entropy) {
                        dz -= gh[r] as f64 * p * (logp + ent[r] as f64);
                    }
                    let (size, err) = ((dz / t).abs(), dlogit_err(r) * (p + onehot));
                    for (j, x) in hr.iter().enumerate() {
                        acc[j] += size * x.abs();
                        acc[h + j] += err * x.abs();
                    }
                    acc[2 * h] += size;
                    acc[2 * h + 1] += err;
                }
                acc
            })
            .collect();
        let h_abs: Vec<f64> = (0..h).map(|j| hidden.iter().map(|x| x[j].abs()).sum()).collect();
        let bound = |s: f64, c: f64, h_abs: f64| coef * s + c + tiny * (k + h_abs / 2.0);
        Self {
            weight: per_v
                .iter()
                .flat_map(|a| (0..h).map(|j| bound(a[j], a[h + j], h_abs[j])))
                .collect(),
            bias: per_v
                .iter()
                .map(|a| bound(a[2 * h], a[2 * h + 1], active.len() as f64))
                .collect(),
        }
    }
}

/// Forward and backward on both devices, compared.
fn check<T: GpuFloat>(gpu: &Gpu, c: Case, seed: u64) {
    let what = format!("{:?} {c:?}", T::DTYPE);
    let mut rng = Rng::new(seed);
    let (n, h, v) = (c.rows, c.hidden, c.vocab);
    // Logits of order 1-10: hidden ~ N(0, 1), weight ~ N(0, 3 / sqrt(H)).
    let mut hidden: Vec<T> = rng.normals(n * h, 1.0);
    let weight: Vec<T> = rng.normals(v * h, 3.0 / (h as f64).sqrt());
    let bias: Vec<T> = rng.normals(v, 1.0);
    let targets: Vec<i64> = (0..n)
        .map(|_| {
            if rng.below(7) == 0 {
                -100
            } else {
                rng.below(v) as i64
            }
        })
        .collect();
    let mask: Vec<u8> = (0..n).map(|_| (rng.below(5) != 0) as u8).collect();
    // Skipped rows' hidden states are never read: make them NaN.
    for i in 0..n {
        if mask[i] == 0 || targets[i] == -100 {
            hidden[i * h..(i + 1) * h].fill(T::from_f32(f32::NAN));
        }
    }
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            temperature: c.temperature,
            entropy: c.entropy,
            ignore_index: Some(-100),
        },
        chunk_rows: c.chunk_rows,
        chunk_vocab: c.chunk_vocab,
    };
    let host = LinearRows::new(&hidden, &weight, &targets, h).with_mask(&mask);
    let host = if c.bias { host.with_bias(&bias) } else { host };
    let want = fused_linear_logprobs(&host, &cfg).unwrap();

    let (d_hidden, d_weight, d_bias) = (up(gpu, &hidden), up(gpu, &weight), up(gpu, &bias));
    let (d_targets, d_mask) = (up(gpu, &targets), up(gpu, &mask));
    let dev = LinearRows::<T, i64, Device> {
        hidden: d_hidden.as_view(),
        weight: d_weight.as_view(),
        bias: c.bias.then(|| d_bias.as_view()),
        targets: d_targets.as_view(),
        mask: Some(d_mask.as_view()),
        hidden_size: h,
    };
    poison_pool(
        gpu,
        2 * c.chunk_rows.min(n) * c.chunk_vocab.min(v) + 4 * n * v.div_ceil(c.chunk_vocab),
    );
    let got = cuda::fused_linear_logprobs(gpu, &dev, &cfg).unwrap();
    gpu.check().unwrap();
    // Both sides accumulate the same products in f32, in different orders.
    let tol = 1e-4 * (h as f64).sqrt().max(1.0) * (v as f64).ln().max(1.0);
    let widen = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<_>>();
    assert_close(
        &format!("logp {what}"),
        &down(gpu, &got.logp),
        &widen(&want.logp),
        tol,
        tol,
    );
    assert_close(
        &format!("lse {what}"),
        &down(gpu, &got.lse),
        &widen(&want.lse),
        tol,
        tol,
    );
    if c.entropy {
        let (g, w) = (got.entropy.as_ref().unwrap(), want.entropy.as_ref().unwrap());
        assert_close(&format!("entropy {what}"), &down(gpu, g), &widen(w), tol, tol);
    }

    // Backward from the CPU's saved values.
    let g: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let g_h: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let grads = LogProbGrads {
        logp: &g[..],
        entropy: c.entropy.then_some(&g_h[..]),
        lse: None,
    };
    let want_d = fused_linear_logprobs_backward(&host, &cfg, &want.saved(), &grads).unwrap();
    let (d_g, d_gh, d_lse) = (up(gpu, &g), up(gpu, &g_h), up(gpu, &want.lse));
    let d_ent = want.entropy.as_ref().map(|e| up(gpu, e));
    let saved = LogProbSaved::<Device> {
        lse: d_lse.as_view(),
        entropy: d_ent.as_ref().map(|e| e.as_view()),
    };
    let d_grads = LogProbGrads::<Device> {
        logp: d_g.as_view(),
        entropy: c.entropy.then(|| d_gh.as_view()),
        lse: None,
    };
    poison_pool(gpu, n * h + v * h);
    let got_d = cuda::fused_linear_logprobs_backward(gpu, &dev, &cfg, &saved, &d_grads).unwrap();
    gpu.check().unwrap();
    // The GPU rounds dlogits to the dtype before its GEMMs (the CPU keeps
    // f32): dh's errors scale with its row's magnitude.
    let row_tol = match T::DTYPE {
        DType::F32 => 1e-4,
        DType::BF16 => 3e-2,
        DType::F16 => 5e-3,
    };
    // Two floors under that. Both sides write the dtype, so small values
    // can differ by its smallest step (f16's subnormal 2^-24 is 1% of a
    // 6e-6 gradient). And a row's dlogits `g (onehot - p) / t` cancel where
    // p is near one-hot (exactly at V = 1), whatever the row's own size:
    // `log p = z / t - lse` carries f32 error `eps (|z / t| + |lse|)`, about
    // `eps x` with `x = 2 |lse| + ln V + 1` where p has mass, and p sums to
    // one, so each dlogit errs by up to `4 eps x |g| (p + onehot) / t`, and
    // dh by that times max|W| summed over the row; the entropy term
    // `gh p (log p + H)` adds `|gh| (2 ln V + 1)` to `|g|`.
    let tiny = match T::DTYPE {
        DType::F32 => 0.0,
        DType::BF16 => 2f64.powi(-133),
        DType::F16 => 2f64.powi(-24),
    };
    let ln_v = (v as f64).ln();
    let dlogit_err = |r: usize| {
        let x = 2.0 * (want.lse[r] as f64).abs() + ln_v + 1.0;
        let gh = if c.entropy {
            g_h[r].abs() as f64 * (2.0 * ln_v + 1.0)
        } else {
            0.0
        };
        4.0 * f32::EPSILON as f64 * x * (g[r].abs() as f64 + gh) / c.temperature as f64
    };
    let w_max = weight.iter().fold(0.0f64, |m, w| m.max(w.to_f32().abs() as f64));
    let dh_floor = |r: usize| ((dlogit_err(r) * w_max).max(2.0 * tiny) / row_tol).max(1e-6);
    let to32 = |x: &[T]| x.iter().map(|y| y.to_f32()).collect::<Vec<_>>();
    let d_hidden_got = to32(&down(gpu, &got_d.hidden));
    for (i, row) in d_hidden_got.chunks(h).enumerate() {
        let skipped = mask[i] == 0 || targets[i] == -100;
        assert!(
            !skipped || row.iter().all(|&x| x == 0.0),
            "dh of skipped row {i} ({what})"
        );
    }
    assert_close_rows(
        &format!("dh {what}"),
        &d_hidden_got,
        &widen_t(&want_d.hidden),
        h,
        row_tol,
        dh_floor,
        0.0,
    );
    // dW and db sum a column of dlogits over the rows, so their errors do
    // not scale with their own values where rows cancel: bound each element.
    let bounds = WeightGradBounds::new(&host, &cfg, &want, &grads, &dlogit_err, tiny);
    assert_within(
        &format!("dW {what}"),
        &to32(&down(gpu, &got_d.weight)),
        &widen_t(&want_d.weight),
        &bounds.weight,
        h,
    );
    assert_eq!(got_d.bias.is_some(), c.bias, "db present exactly with a bias");
    if let (Some(got_b), Some(want_b)) = (&got_d.bias, &want_d.bias) {
        assert_within(
            &format!("db {what}"),
            &to32(&down(gpu, got_b)),
            &widen_t(want_b),
            &bounds.bias,
            v,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_linear_matches_cpu_f32() {
    let gpu = gpu();
    for (i, c) in cases().into_iter().enumerate() {
        check::<f32>(&gpu, c, 100 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_linear_matches_cpu_half() {
    let gpu = gpu();
    for (i, c) in cases().into_iter().enumerate() {
        check::<bf16>(&gpu, c, 200 + i as u64);
        check::<f16>(&gpu, c, 300 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_rows_are_reported_by_index() {
    let gpu = gpu();
    let (n, h, v) = (6, 8, 50);
    let mut rng = Rng::new(7);
    let mut hidden: Vec<f32> = rng.normals(n * h, 1.0);
    let weight: Vec<f32> = rng.normals(v * h, 0.5);
    let cfg = FusedLinearConfig {
        chunk_rows: 4,
        chunk_vocab: 16,
        ..FusedLinearConfig::default()
    };
    let run = |hidden: &[f32], targets: &[i64]| {
        let (d_h, d_w, d_t) = (up(&gpu, hidden), up(&gpu, &weight), up(&gpu, targets));
        let dev = LinearRows::<f32, i64, Device> {
            hidden: d_h.as_view(),
            weight: d_w.as_view(),
            bias: None,
            targets: d_t.as_view(),
            mask: None,
            hidden_size: h,
        };
        let out = cuda::fused_linear_logprobs(&gpu, &dev, &cfg).unwrap();
        (gpu.check(), down(&gpu, &out.logp))
    };
    // A target past the vocabulary, in the second row chunk.
    let (status, logp) = run(&hidden, &[1, 2, 3, 4, 50, 5]);
    assert!(
        matches!(
            status,
            Err(Error::Device {
                op: "fused_linear_logprobs",
                fault: DeviceFault::TokenOutOfRange,
                index: 4
            })
        ),
        "{status:?}"
    );
    assert!(logp[4].is_nan() && logp.iter().enumerate().all(|(i, x)| i == 4 || x.is_finite()));
    // A NaN hidden state in an active row.
    hidden[2 * h + 3] = f32::NAN;
    let (status, _) = run(&hidden, &[1, 2, 3, 4, 5, 6]);
    assert!(
        matches!(
            status,
            Err(Error::Device {
                op: "fused_linear_logprobs",
                fault: DeviceFault::NonFinite,
                index: 2
            })
        ),
        "{status:?}"
    );
}
