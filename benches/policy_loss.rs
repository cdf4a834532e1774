//! The clipped policy loss (with a k3 KL penalty) on the CPU beside a naive
//! single-threaded version of the same op written plainly here, so the
//! speedup reads as a ratio, and on CUDA (the loss, and the whole GRPO loss
//! step from logits). Size: 128 sequences x 2048 tokens (N = 262144). The KL
//! estimators and group advantages have their own benches (`kl.rs`,
//! `advantages.rs`).

// The naive versions are plain index loops on purpose.
#![allow(clippy::needless_range_loop)]

mod util;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grpo_kernels::{
    policy_loss, policy_loss_backward, Advantage, ImportanceLevel, KlEstimator, PolicyLossConfig,
    PolicyLossInputs, PolicyObjective, SeqLayout,
};

const SEQS: usize = 128;
const SEQ_LEN: usize = 2048;

/// The obvious policy loss: one thread, std's exp, per sequence then per
/// token, clip fractions and means alongside (token ratios, k3, seq-mean-token-mean).
fn naive_policy_loss(
    logp: &[f32],
    old: &[f32],
    ref_logp: &[f32],
    adv: &[f32],
    mask: &[u8],
    beta: f32,
) -> (f32, Vec<f32>, [f32; 4]) {
    let mut per_token = vec![0.0f32; logp.len()];
    let (mut loss, mut clipped, mut ratio_sum, mut kl_sum, mut tokens) = (0.0f64, 0.0, 0.0, 0.0, 0usize);
    for s in 0..SEQS {
        let (mut seq_sum, mut seq_tokens) = (0.0f64, 0usize);
        for t in s * SEQ_LEN..(s + 1) * SEQ_LEN {
            if mask[t] == 0 {
                continue;
            }
            let r = (logp[t] - old[t]).clamp(-20.0, 20.0).exp();
            let a = adv[s];
            let pg = -(r * a).min(r.clamp(0.8, 1.2) * a);
            let d = ref_logp[t] - logp[t];
            let kl = d.exp() - d - 1.0;
            per_token[t] = pg + beta * kl;
            seq_sum += per_token[t] as f64;
            seq_tokens += 1;
            clipped += ((r < 0.8 && a < 0.0) || (r > 1.2 && a > 0.0)) as u32 as f64;
            ratio_sum += r as f64;
            kl_sum += kl as f64;
        }
        loss += seq_sum / seq_tokens.max(1) as f64 / SEQS as f64;
        tokens += seq_tokens;
    }
    let m = tokens.max(1) as f64;
    let stats = [
        (clipped / m) as f32,
        (ratio_sum / m) as f32,
        (kl_sum / m) as f32,
        tokens as f32,
    ];
    (loss as f32, per_token, stats)
}

/// Its gradient, as plainly.
fn naive_policy_loss_backward(
    logp: &[f32],
    old: &[f32],
    ref_logp: &[f32],
    adv: &[f32],
    mask: &[u8],
    beta: f32,
) -> Vec<f32> {
    let mut grad = vec![0.0f32; logp.len()];
    for s in 0..SEQS {
        let range = s * SEQ_LEN..(s + 1) * SEQ_LEN;
        let seq_tokens = range.clone().filter(|&t| mask[t] != 0).count();
        let w = 1.0 / (SEQS * seq_tokens.max(1)) as f32;
        for t in range {
            if mask[t] == 0 {
                continue;
            }
            let lr = logp[t] - old[t];
            let r = lr.clamp(-20.0, 20.0).exp();
            let a = adv[s];
            let clipped = (r < 0.8 && a < 0.0) || (r > 1.2 && a > 0.0) || lr.abs() > 20.0;
            let dpg = if clipped { 0.0 } else { -a * r };
            let dkl = 1.0 - (ref_logp[t] - logp[t]).exp();
            grad[t] = w * (dpg + beta * dkl);
        }
    }
    grad
}

fn bench_policy_loss(c: &mut Criterion) {
    if !util::selected("policy_loss") {
        return;
    }
    let n = SEQS * SEQ_LEN;
    let logp = util::uniforms(n, -4.0, -0.01, 1);
    let old: Vec<f32> = logp
        .iter()
        .zip(util::uniforms(n, -0.4, 0.4, 2))
        .map(|(l, d)| l - d)
        .collect();
    let ref_logp: Vec<f32> = logp
        .iter()
        .zip(util::uniforms(n, -0.5, 0.5, 3))
        .map(|(l, d)| l + d)
        .collect();
    let adv = util::uniforms(SEQS, -1.5, 1.5, 4);
    // Completions of 256..2048 tokens, padded to 2048.
    let lens = util::uniforms(SEQS, 256.0, 2048.0, 5);
    let mask: Vec<u8> = (0..n)
        .map(|t| ((t % SEQ_LEN) < lens[t / SEQ_LEN] as usize) as u8)
        .collect();
    let batch = || {
        PolicyLossInputs::new(
            &logp,
            Advantage::per_sequence(&adv),
            SeqLayout::Padded {
                batch: SEQS,
                seq_len: SEQ_LEN,
            },
        )
        .with_old(&old)
        .with_ref(&ref_logp)
        .with_mask(&mask)
    };
    let inputs = batch();
    let cfg = PolicyLossConfig {
        beta: 0.04,
        kl: KlEstimator::K3,
        ..PolicyLossConfig::default()
    };
    // The naive versions compute the same numbers.
    let ours = policy_loss(&inputs, &cfg).unwrap();
    let (naive_loss, ..) = naive_policy_loss(&logp, &old, &ref_logp, &adv, &mask, cfg.beta);
    assert!((ours.loss() - naive_loss).abs() < 1e-5 * naive_loss.abs().max(1.0));
    let ours_grad = policy_loss_backward(&inputs, &cfg, 1.0, None).unwrap();
    let naive_grad = naive_policy_loss_backward(&logp, &old, &ref_logp, &adv, &mask, cfg.beta);
    assert!(ours_grad
        .iter()
        .zip(&naive_grad)
        .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs() + 1e-9));

    let id = format!("{SEQS}x{SEQ_LEN}");
    let mut g = c.benchmark_group("policy_loss");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("forward", &id), |b| {
        b.iter(|| policy_loss(&inputs, &cfg).unwrap())
    });
    g.bench_function(BenchmarkId::new("naive_forward_1thread", &id), |b| {
        b.iter(|| naive_policy_loss(&logp, &old, &ref_logp, &adv, &mask, cfg.beta))
    });
    g.bench_function(BenchmarkId::new("backward", &id), |b| {
        b.iter(|| policy_loss_backward(&inputs, &cfg, 1.0, None).unwrap())
    });
    g.bench_function(BenchmarkId::new("naive_backward_1thread", &id), |b| {
        b.iter(|| naive_policy_loss_backward(&logp, &old, &ref_logp, &adv, &mask, cfg.beta))
    });
    g.finish();

    // Each objective and option against plain GRPO (the group above's
    // forward and backward), on the same batch: they ride in the same
    // passes, so each should cost about what plain GRPO does.
    let weights = util::uniforms(n, 0.0, 2.0, 6);
    let weighted = batch().with_pg_weights(&weights);
    let variants: [(&str, PolicyLossConfig, &PolicyLossInputs<'_>); 7] = [
        ("clip", cfg, &inputs),
        (
            "cispo",
            PolicyLossConfig {
                objective: PolicyObjective::Cispo {
                    min_ratio: 0.0,
                    max_ratio: 1.28,
                },
                ..cfg
            },
            &inputs,
        ),
        (
            "sapo",
            PolicyLossConfig {
                objective: PolicyObjective::Sapo {
                    tau_pos: 1.0,
                    tau_neg: 1.05,
                },
                ..cfg
            },
            &inputs,
        ),
        (
            "vespo",
            PolicyLossConfig {
                objective: PolicyObjective::Vespo {
                    k_pos: 2.0,
                    lambda_pos: 3.0,
                    k_neg: 3.0,
                    lambda_neg: 2.0,
                },
                ..cfg
            },
            &inputs,
        ),
        (
            "gspo",
            PolicyLossConfig {
                importance: ImportanceLevel::Sequence,
                ..cfg
            },
            &inputs,
        ),
        (
            "kl_bias_correction_no_clamp",
            PolicyLossConfig {
                kl_bias_correction: true,
                log_ratio_clamp: f32::INFINITY,
                ..cfg
            },
            &inputs,
        ),
        ("pg_weights", cfg, &weighted),
    ];
    let mut g = c.benchmark_group("policy_loss_objectives");
    g.throughput(Throughput::Elements(n as u64));
    for (name, cfg, inputs) in variants {
        g.bench_function(BenchmarkId::new(format!("{name}_fwd_bwd"), &id), |b| {
            b.iter(|| {
                let out = policy_loss(inputs, &cfg).unwrap();
                (out, policy_loss_backward(inputs, &cfg, 1.0, None).unwrap())
            })
        });
    }
    g.finish();
}

/// On an H100: the policy loss + KL forward and backward at N = 262144 (the
/// size `compare_torch.py` times TRL's eager chain at), and the whole GRPO
/// loss step from bf16 logits `[8 x 2048, 151936]`: token log-probs, loss
/// forward and backward, log-prob backward into a gradient buffer (the
/// size it times eager PyTorch and Liger-Kernel's fused GRPO loss at).
#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use grpo_kernels::cuda::{self, Device, Gpu};
    use grpo_kernels::{LogProbConfig, LogProbGrads, LogitRows};
    use half::bf16;
    let Some(gpu) = Gpu::try_default(0).unwrap() else {
        eprintln!("cuda benches SKIPPED: no CUDA device");
        return;
    };
    let up = |v: &[f32]| gpu.stream().clone_htod(v).unwrap();
    let loss_cfg = PolicyLossConfig {
        beta: 0.04,
        kl: KlEstimator::K3,
        ..PolicyLossConfig::default()
    };
    let one = up(&[1.0]);

    let n = SEQS * SEQ_LEN;
    let logp = util::uniforms(n, -3.0, -1.0, 1);
    let old: Vec<f32> = logp
        .iter()
        .zip(util::uniforms(n, -0.1, 0.1, 2))
        .map(|(a, b)| a + b)
        .collect();
    let reference: Vec<f32> = logp
        .iter()
        .zip(util::uniforms(n, -0.1, 0.1, 3))
        .map(|(a, b)| a + b)
        .collect();
    let adv = util::uniforms(SEQS, -1.0, 1.0, 4);
    let mask: Vec<u8> = util::uniforms(n, 0.0, 1.0, 5)
        .iter()
        .map(|&u| (u > 0.1) as u8)
        .collect();
    let (d_logp, d_old, d_ref, d_adv) = (up(&logp), up(&old), up(&reference), up(&adv));
    let d_mask = gpu.stream().clone_htod(&mask).unwrap();
    let inputs = PolicyLossInputs::<Device> {
        logp: d_logp.as_view(),
        old_logp: Some(d_old.as_view()),
        ref_logp: Some(d_ref.as_view()),
        advantages: Advantage::PerSequence(d_adv.as_view()),
        mask: Some(d_mask.as_view()),
        layout: SeqLayout::Padded {
            batch: SEQS,
            seq_len: SEQ_LEN,
        },
        pg_weights: None,
    };
    let mut g = c.benchmark_group("cuda_policy_loss");
    g.sample_size(30).throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("forward+backward", n), |b| {
        b.iter_custom(|iters| {
            util::gpu::time(&gpu, iters, || {
                let out = cuda::policy_loss(&gpu, &inputs, &loss_cfg).unwrap();
                cuda::policy_loss_backward(
                    &gpu,
                    &inputs,
                    &loss_cfg,
                    &out.summary.as_view(),
                    &one.as_view(),
                    None,
                )
                .unwrap();
            })
        })
    });
    g.finish();

    let (seqs, len, vocab) = (8usize, 2048usize, 151_936usize);
    let rows = seqs * len;
    let logits: Vec<bf16> = util::normals(rows * vocab, 3.0, 6);
    let targets = util::targets(rows, vocab, 7);
    // The gradient goes to its own buffer (as PyTorch's autograd does), so
    // every iteration runs on the same logits.
    let d_logits = gpu.stream().clone_htod(&logits).unwrap();
    drop(logits);
    let mut d_grad = gpu.stream().alloc_zeros::<bf16>(rows * vocab).unwrap();
    let d_targets = gpu.stream().clone_htod(&targets).unwrap();
    let old = util::uniforms(rows, -13.0, -11.0, 8);
    let reference: Vec<f32> = old
        .iter()
        .zip(util::uniforms(rows, -0.05, 0.05, 9))
        .map(|(a, b)| a + b)
        .collect();
    let (d_old, d_ref, d_adv) = (up(&old), up(&reference), up(&util::uniforms(seqs, -1.0, 1.0, 10)));
    let lp_cfg = LogProbConfig::default();
    let mut g = c.benchmark_group("cuda_grpo_step");
    g.sample_size(10)
        .throughput(Throughput::Bytes((rows * vocab * 2) as u64));
    g.bench_function(
        BenchmarkId::new("logits_to_loss_fwd_bwd", format!("bf16/{rows}x{vocab}")),
        |b| {
            b.iter_custom(|iters| {
                util::gpu::time(&gpu, iters, || {
                    let rows_in = LogitRows::<bf16, u32, Device> {
                        logits: d_logits.as_view(),
                        targets: d_targets.as_view(),
                        mask: None,
                        vocab,
                    };
                    let lp = cuda::token_logprobs(&gpu, &rows_in, &lp_cfg).unwrap();
                    let step = PolicyLossInputs::<Device> {
                        logp: lp.logp.as_view(),
                        old_logp: Some(d_old.as_view()),
                        ref_logp: Some(d_ref.as_view()),
                        advantages: Advantage::PerSequence(d_adv.as_view()),
                        mask: None,
                        layout: SeqLayout::Padded {
                            batch: seqs,
                            seq_len: len,
                        },
                        pg_weights: None,
                    };
                    let out = cuda::policy_loss(&gpu, &step, &loss_cfg).unwrap();
                    let dlogp = cuda::policy_loss_backward(
                        &gpu,
                        &step,
                        &loss_cfg,
                        &out.summary.as_view(),
                        &one.as_view(),
                        None,
                    )
                    .unwrap();
                    let grads = LogProbGrads::<Device> {
                        logp: dlogp.as_view(),
                        entropy: None,
                        lse: None,
                    };
                    cuda::token_logprobs_backward_into(
                        &gpu,
                        &rows_in,
                        &lp_cfg,
                        &lp.saved(),
                        &grads,
                        &mut d_grad.as_view_mut(),
                    )
                    .unwrap();
                })
            })
        },
    );
    g.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {}

criterion_group!(benches, bench_policy_loss, bench_cuda);
criterion_main!(benches);
