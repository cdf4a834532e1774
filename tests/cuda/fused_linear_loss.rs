//! CUDA fused LM-head + GRPO loss against the CPU op: awkward sizes and
//! chunkings, bias, masked rows holding NaN hidden states, per-sequence and
//! per-token advantages, packed and padded layouts, every aggregation,
//! f32 and bf16, a NaN-poisoned memory pool; and the status word for bad
//! data. NOT YET RUN on a GPU: written and compiled on a machine without
//! one.

use crate::common::gpu::{down, gpu, poison_pool, up};
use crate::common::{assert_close, Rng};
use grpo_kernels::cuda::{self, Device, Gpu, GpuFloat};
use grpo_kernels::{
    fused_linear_policy_loss, Advantage, Aggregation, DeviceFault, Error, FusedLossConfig, KlEstimator,
    LinearLossInputs, LinearRows, LogProbConfig, PolicyLossConfig, SeqLayout,
};
use half::bf16;

const IGNORE: i64 = -100;

#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    h: usize,
    v: usize,
    chunk_rows: usize,
    chunk_vocab: usize,
    bias: bool,
    packed: bool,
    per_token_adv: bool,
    aggregation: Aggregation,
}

fn cases() -> Vec<Case> {
    let aggs = [
        Aggregation::SeqMeanTokenMean,
        Aggregation::TokenMean { normalizer: None },
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenSumNorm { constant: 40.0 },
        Aggregation::TokenMean {
            normalizer: Some(100.0),
        },
    ];
    [
        (1, 1, 2, 1, 1),
        (20, 7, 1021, 6, 300),
        (64, 96, 4099, 16, 1024),
        (200, 64, 32_000, 128, 8192),
        (40, 128, 151_936, 32, 16_384),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(n, h, v, chunk_rows, chunk_vocab))| Case {
        n,
        h,
        v,
        chunk_rows,
        chunk_vocab,
        bias: i % 2 == 1,
        packed: i.is_multiple_of(2),
        per_token_adv: i % 3 == 1,
        aggregation: aggs[i % aggs.len()],
    })
    .collect()
}

fn check<T: GpuFloat + Into<f64>>(gpu: &Gpu, c: Case, seed: u64, tol: f64) {
    let mut rng = Rng::new(seed);
    let (n, h, v) = (c.n, c.h, c.v);
    let mut hidden: Vec<T> = rng.normals(n * h, 1.0);
    let weight: Vec<T> = rng.normals(v * h, 1.0 / (h as f64).sqrt());
    let bias: Vec<T> = rng.normals(v, 0.3);
    let mut targets: Vec<i64> = (0..n).map(|_| rng.below(v) as i64).collect();
    let mask: Vec<u8> = (0..n).map(|i| (i % 5 != 3) as u8).collect();
    if n > 2 {
        targets[1] = IGNORE;
    }
    for i in (0..n).filter(|&i| mask[i] == 0) {
        hidden[i * h..(i + 1) * h].fill(T::from_f32(f32::NAN));
    }
    let seq_len = 7;
    let seqs = n.div_ceil(seq_len);
    let cu: Vec<u32> = (0..=seqs).map(|s| (s * seq_len).min(n) as u32).collect();
    let old: Vec<f32> = (0..n)
        .map(|_| (-(v as f64).ln() + rng.normal() * 0.3) as f32)
        .collect();
    let reference: Vec<f32> = (0..n)
        .map(|_| (-(v as f64).ln() + rng.normal() * 0.3) as f32)
        .collect();
    let adv: Vec<f32> = rng.normals(if c.per_token_adv { n } else { seqs }, 1.0);
    let cfg = FusedLossConfig {
        logprob: LogProbConfig {
            temperature: 0.9,
            entropy: seed.is_multiple_of(2),
            ignore_index: Some(IGNORE),
        },
        loss: PolicyLossConfig {
            beta: 0.04,
            kl: KlEstimator::K3,
            dual_clip: Some(3.0),
            aggregation: c.aggregation,
            ..PolicyLossConfig::default()
        },
        chunk_rows: c.chunk_rows,
        chunk_vocab: c.chunk_vocab,
    };
    // Padded layouts need whole sequences.
    let padded = !c.packed && n.is_multiple_of(seq_len);
    let host_rows = LinearRows::new(&hidden, &weight, &targets, h).with_mask(&mask);
    let host_rows = if c.bias {
        host_rows.with_bias(&bias)
    } else {
        host_rows
    };
    let layout = if padded {
        SeqLayout::Padded { batch: seqs, seq_len }
    } else {
        SeqLayout::Packed { cu_seqlens: &cu[..] }
    };
    let advantage = if c.per_token_adv {
        Advantage::per_token(&adv)
    } else {
        Advantage::per_sequence(&adv)
    };
    let inputs = LinearLossInputs::new(host_rows, advantage, layout)
        .with_old(&old)
        .with_ref(&reference);
    let want = fused_linear_policy_loss(&inputs, &cfg).unwrap();

    let (d_h, d_w, d_b) = (up(gpu, &hidden), up(gpu, &weight), up(gpu, &bias));
    let (d_t, d_m, d_cu) = (up(gpu, &targets), up(gpu, &mask), up(gpu, &cu));
    let (d_old, d_ref, d_adv) = (up(gpu, &old), up(gpu, &reference), up(gpu, &adv));
    let dev_rows = LinearRows::<T, i64, Device> {
        hidden: d_h.as_view(),
        weight: d_w.as_view(),
        bias: c.bias.then(|| d_b.as_view()),
        targets: d_t.as_view(),
        mask: Some(d_m.as_view()),
        hidden_size: h,
    };
    let dev_inputs = LinearLossInputs::<T, i64, Device> {
        rows: dev_rows,
        old_logp: Some(d_old.as_view()),
        ref_logp: Some(d_ref.as_view()),
        advantages: if c.per_token_adv {
            Advantage::PerToken(d_adv.as_view())
        } else {
            Advantage::PerSequence(d_adv.as_view())
        },
        layout: if padded {
            SeqLayout::Padded { batch: seqs, seq_len }
        } else {
            SeqLayout::Packed {
                cu_seqlens: d_cu.as_view(),
            }
        },
    };
    poison_pool(gpu, 4 * c.chunk_rows.min(n) * v + 4 * (n * h + v * h));
    let got = cuda::fused_linear_policy_loss(gpu, &dev_inputs, &cfg).unwrap();
    gpu.check().unwrap();
    let ctx = format!("{c:?} {}", std::any::type_name::<T>());
    let wide = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<_>>();
    let wide_t = |x: &[T]| x.iter().map(|&y| y.into()).collect::<Vec<f64>>();
    assert_close(
        &format!("{ctx} logp"),
        &down(gpu, &got.logp),
        &wide(&want.logp),
        1e-4,
        1e-4,
    );
    assert_close(
        &format!("{ctx} per_token"),
        &down(gpu, &got.per_token),
        &wide(&want.per_token),
        1e-4,
        1e-3,
    );
    assert_close(
        &format!("{ctx} summary"),
        &down(gpu, &got.summary),
        &wide(&want.summary),
        1e-4,
        1e-3,
    );
    let scale = |x: &[f64]| x.iter().fold(1e-3f64, |m, y| m.max(y.abs()));
    let (dh, dw) = (wide_t(&want.grads.hidden), wide_t(&want.grads.weight));
    assert_close(
        &format!("{ctx} dh"),
        &down(gpu, &got.grads.hidden),
        &dh,
        tol * scale(&dh),
        tol,
    );
    assert_close(
        &format!("{ctx} dW"),
        &down(gpu, &got.grads.weight),
        &dw,
        tol * scale(&dw),
        tol,
    );
    if let (Some(g), Some(w)) = (&got.grads.bias, &want.grads.bias) {
        let db = wide_t(w);
        assert_close(&format!("{ctx} db"), &down(gpu, g), &db, tol * scale(&db), tol);
    }
    for i in (0..n).filter(|&i| mask[i] == 0 || targets[i] == IGNORE) {
        let row = &down(gpu, &got.grads.hidden)[i * h..(i + 1) * h];
        assert!(
            row.iter().all(|x| x.to_f32() == 0.0),
            "{ctx}: skipped row {i} has a gradient"
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_linear_loss_matches_cpu() {
    let gpu = gpu();
    for (i, c) in cases().into_iter().enumerate() {
        check::<f32>(&gpu, c, 100 + i as u64, 1e-3);
        check::<bf16>(&gpu, c, 200 + i as u64, 3e-2);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_rows_are_reported_by_index() {
    let gpu = gpu();
    let (n, h, v) = (6, 8, 50);
    let mut rng = Rng::new(7);
    let hidden: Vec<f32> = rng.normals(n * h, 1.0);
    let weight: Vec<f32> = rng.normals(v * h, 0.3);
    let targets: Vec<i64> = (0..n as i64).collect();
    let adv = vec![1.0f32; 2];
    let cu = vec![0u32, 3, 6];
    let mut old = vec![-3.9f32; n];
    old[4] = f32::NAN;
    let cfg = FusedLossConfig::default();
    let (d_h, d_w, d_t) = (up(&gpu, &hidden), up(&gpu, &weight), up(&gpu, &targets));
    let (d_adv, d_cu, d_old) = (up(&gpu, &adv), up(&gpu, &cu), up(&gpu, &old));
    let inputs = LinearLossInputs::<f32, i64, Device> {
        rows: LinearRows {
            hidden: d_h.as_view(),
            weight: d_w.as_view(),
            bias: None,
            targets: d_t.as_view(),
            mask: None,
            hidden_size: h,
        },
        old_logp: Some(d_old.as_view()),
        ref_logp: None,
        advantages: Advantage::PerSequence(d_adv.as_view()),
        layout: SeqLayout::Packed {
            cu_seqlens: d_cu.as_view(),
        },
    };
    cuda::fused_linear_policy_loss(&gpu, &inputs, &cfg).unwrap();
    assert_eq!(
        gpu.check(),
        Err(Error::Device {
            op: "fused_linear_policy_loss",
            fault: DeviceFault::NonFinite,
            index: 4
        })
    );
}
