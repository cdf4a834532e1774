//! Token log-probs: CPU (ours, a naive single-threaded version, and a plain
//! copy of the logits as the memory floor) and, with `--features cuda` on a
//! GPU, the CUDA kernels against a device-to-device copy of the same bytes.
//! Throughput is reported in bytes of logits, so each line reads as a
//! fraction of the copy's rate.

mod util;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grpo_kernels::{token_logprobs, token_logprobs_backward, Float, LogProbConfig, LogProbGrads, LogitRows};
use half::bf16;

/// The obvious code: per row, max, sum of exps, log; one thread, std's exp.
fn naive_logprobs<T: Float>(logits: &[T], targets: &[u32], vocab: usize) -> Vec<f32> {
    logits
        .chunks(vocab)
        .zip(targets)
        .map(|(row, &y)| {
            let m = row.iter().map(|x| x.to_f32()).fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|x| (x.to_f32() - m).exp()).sum();
            row[y as usize].to_f32() - m - s.ln()
        })
        .collect()
}

fn cpu_case<T: Float>(c: &mut Criterion, rows: usize, vocab: usize) {
    let logits: Vec<T> = util::normals(rows * vocab, 3.0, 1);
    let targets = util::targets(rows, vocab, 2);
    let bytes = (rows * vocab * T::DTYPE.size()) as u64;
    let id = format!("{:?}/{rows}x{vocab}", T::DTYPE);
    let mut g = c.benchmark_group("cpu_logprob");
    g.sample_size(10).throughput(Throughput::Bytes(bytes));
    let rows_in = LogitRows::new(&logits, &targets, vocab);
    let cfg = LogProbConfig::default();
    g.bench_function(BenchmarkId::new("forward", &id), |b| {
        b.iter(|| token_logprobs(&rows_in, &cfg).unwrap())
    });
    let fwd = token_logprobs(&rows_in, &cfg).unwrap();
    let grad = vec![1.0f32; rows];
    let grads: LogProbGrads = LogProbGrads {
        logp: &grad,
        entropy: None,
        lse: None,
    };
    g.bench_function(BenchmarkId::new("backward", &id), |b| {
        b.iter(|| token_logprobs_backward(&rows_in, &cfg, &fwd.saved(), &grads).unwrap())
    });
    g.bench_function(BenchmarkId::new("naive_forward_1thread", &id), |b| {
        b.iter(|| naive_logprobs(&logits, &targets, vocab))
    });
    // The floor: reading the logits once can't beat copying them (which also writes).
    let mut dst = logits.clone();
    g.bench_function(BenchmarkId::new("memcpy_floor", &id), |b| {
        b.iter(|| dst.copy_from_slice(&logits))
    });
    g.finish();
}

fn cpu(c: &mut Criterion) {
    if !util::selected("cpu_logprob") {
        return;
    }
    cpu_case::<f32>(c, 4096, 32_000);
    cpu_case::<bf16>(c, 4096, 32_000);
    cpu_case::<bf16>(c, 4096, 151_936);
}

#[cfg(feature = "cuda")]
fn gpu(c: &mut Criterion) {
    use grpo_kernels::cuda::{self, Device, Gpu};
    use grpo_kernels::{LogProbGrads, LogitRows};
    let Some(gpu) = Gpu::try_default(0).unwrap() else {
        eprintln!("cuda benches SKIPPED: no CUDA device");
        return;
    };
    let vocab = 151_936;
    for rows in [512usize, 8192] {
        let logits: Vec<bf16> = util::normals(rows * vocab, 3.0, 3);
        let targets = util::targets(rows, vocab, 4);
        let d_logits = gpu.stream().clone_htod(&logits).unwrap();
        let d_targets = gpu.stream().clone_htod(&targets).unwrap();
        let mut d_copy = gpu.stream().clone_htod(&logits).unwrap();
        let ones = gpu.stream().clone_htod(&vec![1.0f32; rows]).unwrap();
        let rows_in: LogitRows<'_, bf16, u32, Device> = LogitRows {
            logits: d_logits.as_view(),
            targets: d_targets.as_view(),
            mask: None,
            vocab,
        };
        let cfg = LogProbConfig::default();
        let fwd = cuda::token_logprobs(&gpu, &rows_in, &cfg).unwrap();
        let grads = LogProbGrads::<Device> {
            logp: ones.as_view(),
            entropy: None,
            lse: None,
        };
        let mut dlogits = gpu.stream().clone_htod(&logits).unwrap();
        let bytes = (rows * vocab * 2) as u64;
        let id = format!("bf16/{rows}x{vocab}");
        let mut g = c.benchmark_group("cuda_logprob");
        g.sample_size(20).throughput(Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter_custom(|n| {
                util::gpu::time(&gpu, n, || {
                    cuda::token_logprobs(&gpu, &rows_in, &cfg).unwrap();
                })
            })
        });
        g.bench_function(BenchmarkId::new("backward", &id), |b| {
            b.iter_custom(|n| {
                util::gpu::time(&gpu, n, || {
                    cuda::token_logprobs_backward_into(
                        &gpu,
                        &rows_in,
                        &cfg,
                        &fwd.saved(),
                        &grads,
                        &mut dlogits.as_view_mut(),
                    )
                    .unwrap();
                })
            })
        });
        g.bench_function(BenchmarkId::new("forward+backward_inplace", &id), |b| {
            b.iter_custom(|n| {
                util::gpu::time(&gpu, n, || {
                    let out = cuda::token_logprobs(&gpu, &rows_in, &cfg).unwrap();
                    cuda::token_logprobs_backward_inplace(
                        &gpu,
                        &mut dlogits.as_view_mut(),
                        &rows_in.targets,
                        &None,
                        vocab,
                        &cfg,
                        &out.saved(),
                        &grads,
                    )
                    .unwrap();
                })
            })
        });
        // Floor: a device-to-device copy of the logits (reads and writes them).
        g.bench_function(BenchmarkId::new("d2d_copy_floor", &id), |b| {
            b.iter_custom(|n| {
                util::gpu::time(&gpu, n, || {
                    gpu.stream().memcpy_dtod(&d_logits, &mut d_copy).unwrap()
                })
            })
        });
        g.finish();
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu(_: &mut Criterion) {}

criterion_group!(benches, cpu, gpu);
criterion_main!(benches);
