//! Token sampling on the CPU at B = 64, V = 151936: ours against a naive
//! single-threaded sampler (full softmax, full sort, cumulative sum, inverse
//! CDF), and one parallel pass over the logits (a sum), so that each line
//! also reads as a number of passes over the logits.

mod util;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grpo_kernels::{sample, Float, SampleInputs, SamplingConfig};
use half::bf16;
use rayon::prelude::*;

const ROWS: usize = 64;
const VOCAB: usize = 151_936;

/// The obvious code, one thread: per row, softmax over V, sort all V
/// probabilities, cut at top-k, cut where the cumulative sum reaches top-p,
/// then invert the CDF at a uniform.
fn naive_sample<T: Float>(logits: &[T], vocab: usize, cfg: &SamplingConfig, seed: u64) -> Vec<u32> {
    logits
        .chunks(vocab)
        .zip(0..)
        .map(|(row, i)| {
            let x: Vec<f32> = row.iter().map(|z| z.to_f32() / cfg.temperature).collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut p: Vec<(f32, u32)> = x.iter().zip(0..).map(|(v, j)| ((v - m).exp(), j)).collect();
            let s: f32 = p.iter().map(|e| e.0).sum();
            p.iter_mut().for_each(|e| e.0 /= s);
            p.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            if cfg.top_k > 0 {
                p.truncate(cfg.top_k);
            }
            let total: f32 = p.iter().map(|e| e.0).sum();
            let mut cum = 0.0;
            let kept = p
                .iter()
                .take_while(|e| {
                    let keep = cum < cfg.top_p * total;
                    cum += e.0;
                    keep
                })
                .count();
            p.truncate(kept);
            let u = util::unit(seed, i) as f32 * p.iter().map(|e| e.0).sum::<f32>();
            let mut acc = 0.0;
            p.iter()
                .find(|e| {
                    acc += e.0;
                    acc > u
                })
                .unwrap_or(&p[p.len() - 1])
                .1
        })
        .collect()
}

/// One parallel pass over the logits: a sum per row, widened to f32.
fn one_pass<T: Float>(logits: &[T], vocab: usize) -> Vec<f32> {
    logits
        .par_chunks(vocab)
        .map(|row| row.iter().map(|z| z.to_f32()).sum())
        .collect()
}

fn case<T: Float>(c: &mut Criterion) {
    let logits: Vec<T> = util::normals(ROWS * VOCAB, 3.0, 1);
    let inputs = SampleInputs::new(&logits, VOCAB);
    let mut g = c.benchmark_group("cpu_sampling");
    g.sample_size(10)
        .throughput(Throughput::Bytes((logits.len() * T::DTYPE.size()) as u64));
    let dims = format!("{:?}/{ROWS}x{VOCAB}", T::DTYPE);
    let settings = [
        ("temperature", SamplingConfig::default()),
        (
            "top_k50_top_p0.9",
            SamplingConfig {
                top_k: 50,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "top_p0.9",
            SamplingConfig {
                top_p: 0.9,
                ..Default::default()
            },
        ),
    ];
    for (name, cfg) in settings {
        let id = format!("{name}/{dims}");
        let mut step = 0;
        g.bench_function(BenchmarkId::new("ours", &id), |b| {
            b.iter(|| {
                step += 1;
                sample(&inputs, &SamplingConfig { step, ..cfg }).unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("naive_1thread", &id), |b| {
            b.iter(|| naive_sample(&logits, VOCAB, &cfg, 7))
        });
    }
    g.bench_function(BenchmarkId::new("one_pass_sum", &dims), |b| {
        b.iter(|| one_pass(&logits, VOCAB))
    });
    g.finish();
}

fn cpu(c: &mut Criterion) {
    if !util::selected("cpu_sampling") {
        return;
    }
    case::<f32>(c);
    case::<bf16>(c);
}

/// On a GPU, at the batch `compare_torch.py` times Hugging Face's warpers
/// and `torch.multinomial` at: 256 rows of f32 logits over V = 151936.
#[cfg(feature = "cuda")]
fn gpu(c: &mut Criterion) {
    use grpo_kernels::cuda::{self, Device, Gpu};
    let Some(gpu) = Gpu::try_default(0).unwrap() else {
        eprintln!("cuda benches SKIPPED: no CUDA device");
        return;
    };
    let rows = 256;
    // Normal logits of standard deviation 3, as compare_torch.py draws them.
    let logits: Vec<f32> = util::normals(rows * VOCAB, 3.0, 11);
    let d_logits = gpu.stream().clone_htod(&logits).unwrap();
    let inputs = SampleInputs::<f32, Device> {
        logits: d_logits.as_view(),
        vocab: VOCAB,
    };
    let mut g = c.benchmark_group("cuda_sampling");
    g.sample_size(30)
        .throughput(Throughput::Bytes((rows * VOCAB * 4) as u64));
    let settings = [
        (
            "topk50_topp0.9",
            SamplingConfig {
                temperature: 0.7,
                top_k: 50,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "temperature",
            SamplingConfig {
                temperature: 0.7,
                ..Default::default()
            },
        ),
    ];
    for (name, cfg) in settings {
        let mut step = 0;
        g.bench_function(BenchmarkId::new(name, format!("f32/{rows}x{VOCAB}")), |b| {
            b.iter_custom(|iters| {
                util::gpu::time(&gpu, iters, || {
                    step += 1;
                    cuda::sample(&gpu, &inputs, &SamplingConfig { step, ..cfg }).unwrap();
                })
            })
        });
    }
    g.finish();
}

#[cfg(not(feature = "cuda"))]
fn gpu(_: &mut Criterion) {}

criterion_group!(benches, cpu, gpu);
criterion_main!(benches);
