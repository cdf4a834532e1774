//! Fused linear log-probs on the CPU at Qwen2.5-0.5B's LM head (N = 512
//! tokens, H = 896, V = 151936), f32 and bf16, against
//! - `matmul`: the f32 GEMMs the op cannot avoid, alone (`h W^T` into a
//!   preallocated `[N, V]` buffer; for forward + backward also `dz W` and
//!   `dz^T h`), on f32 copies of the inputs made outside the timing;
//! - `naive`: the obvious code: widen the inputs to f32, materialize the
//!   logits with the same GEMM, then a plain scalar log-softmax on one thread
//!   (and for the backward, scalar `dz = onehot - p` in place and the same
//!   two GEMMs).
//!
//! Throughput is in FLOPs of the GEMMs (`2NHV` per GEMM), so each line reads
//! as the rate the matmul alone reaches. Also prints the op's peak extra
//! heap memory beyond its outputs (measured by a counting allocator)
//! against the `N x V x 4` bytes of f32 logits the naive code holds.

#[path = "util/peak_heap.rs"]
mod peak_heap;
mod util;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grpo_kernels::{
    fused_linear_logprobs, fused_linear_logprobs_backward, Float, FusedLinearConfig, LinearRows, LogProbGrads,
};
use half::bf16;
use peak_heap::{peak_extra, Counting};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const N: usize = 512;
const H: usize = 896;
const V: usize = 151_936;

/// Buffers of the naive code and of the matmul baseline.
struct Naive {
    hidden: Vec<f32>,
    weight: Vec<f32>,
    logits: Vec<f32>,
    d_hidden: Vec<f32>,
    d_weight: Vec<f32>,
}

impl Naive {
    fn new() -> Self {
        Self {
            hidden: vec![0.0; N * H],
            weight: vec![0.0; V * H],
            logits: vec![0.0; N * V],
            d_hidden: vec![0.0; N * H],
            d_weight: vec![0.0; V * H],
        }
    }

    fn widen<T: Float>(&mut self, hidden: &[T], weight: &[T]) {
        for (d, s) in self.hidden.iter_mut().zip(hidden) {
            *d = s.to_f32();
        }
        for (d, s) in self.weight.iter_mut().zip(weight) {
            *d = s.to_f32();
        }
    }

    /// Materialized logits, then per row max, sum of exps, log; returns `(logp, lse)`.
    fn forward<T: Float>(&mut self, hidden: &[T], weight: &[T], targets: &[u32]) -> (Vec<f32>, Vec<f32>) {
        self.widen(hidden, weight);
        util::gemm_f32(
            &mut self.logits,
            (N, V, H),
            &self.hidden,
            false,
            &self.weight,
            true,
        );
        self.logits
            .chunks(V)
            .zip(targets)
            .map(|(row, &y)| {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
                (row[y as usize] - lse, lse)
            })
            .unzip()
    }

    /// The forward, then `dz = onehot - p` (upstream gradient 1) in place
    /// of the logits, `dh = dz W`, `dW = dz^T h`, narrowed to `T`.
    fn forward_backward<T: Float>(
        &mut self,
        hidden: &[T],
        weight: &[T],
        targets: &[u32],
    ) -> (Vec<T>, Vec<T>) {
        let (_, lse) = self.forward(hidden, weight, targets);
        for ((row, &y), lse) in self.logits.chunks_mut(V).zip(targets).zip(lse) {
            for x in row.iter_mut() {
                *x = -(*x - lse).exp();
            }
            row[y as usize] += 1.0;
        }
        util::gemm_f32(
            &mut self.d_hidden,
            (N, H, V),
            &self.logits,
            false,
            &self.weight,
            false,
        );
        util::gemm_f32(
            &mut self.d_weight,
            (V, H, N),
            &self.logits,
            true,
            &self.hidden,
            false,
        );
        let narrow = |xs: &[f32]| xs.iter().map(|&x| T::from_f32(x)).collect();
        (narrow(&self.d_hidden), narrow(&self.d_weight))
    }

    /// The GEMMs alone, on inputs already widened.
    fn matmuls(&mut self, backward: bool) {
        util::gemm_f32(
            &mut self.logits,
            (N, V, H),
            &self.hidden,
            false,
            &self.weight,
            true,
        );
        if backward {
            util::gemm_f32(
                &mut self.d_hidden,
                (N, H, V),
                &self.logits,
                false,
                &self.weight,
                false,
            );
            util::gemm_f32(
                &mut self.d_weight,
                (V, H, N),
                &self.logits,
                true,
                &self.hidden,
                false,
            );
        }
    }
}

/// The heap bytes `f` holds at its peak beyond what was live before,
/// measured (the counting allocator) on a fresh rayon pool from a fresh
/// thread, so that no working buffer kept per thread by an earlier call
/// hides its own.
fn fresh_peak(f: impl FnOnce() + Send) -> usize {
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    std::thread::scope(|s| s.spawn(|| peak_extra(|| pool.install(f))).join().unwrap())
}

fn case<T: Float>(c: &mut Criterion) {
    let hidden: Vec<T> = util::normals(N * H, 1.0, 1);
    // Logits of spread about 2.
    let weight: Vec<T> = util::normals(V * H, 2.0 / (H as f32).sqrt(), 2);
    let targets = util::targets(N, V, 3);
    let cfg = FusedLinearConfig::default();
    let rows = LinearRows::new(&hidden, &weight, &targets, H);
    let ones = vec![1.0f32; N];
    let grads: LogProbGrads = LogProbGrads {
        logp: &ones,
        entropy: None,
        lse: None,
    };
    let logits_bytes = N * V * 4;
    // Beyond the outputs: the per-row values, and the gradients (in T).
    let outputs = N * 4 * 2 + (N * H + V * H) * std::mem::size_of::<T>();
    let forward = fresh_peak(|| {
        fused_linear_logprobs(&rows, &cfg).unwrap();
    });
    let both = fresh_peak(|| {
        let lp = fused_linear_logprobs(&rows, &cfg).unwrap();
        fused_linear_logprobs_backward(&rows, &cfg, &lp.saved(), &grads).unwrap();
    });
    for (what, peak) in [
        ("forward", forward),
        ("forward+backward", both.saturating_sub(outputs)),
    ] {
        eprintln!(
            "{:?} {what}: peak extra memory {:.1} MiB, measured (chunks {}x{}, {} threads) vs f32 logits {:.1} MiB ({:.1}%)",
            T::DTYPE,
            peak as f64 / (1 << 20) as f64,
            cfg.chunk_rows,
            cfg.chunk_vocab,
            rayon::current_num_threads(),
            logits_bytes as f64 / (1 << 20) as f64,
            100.0 * peak as f64 / logits_bytes as f64,
        );
    }

    let mut naive = Naive::new();
    let id = format!("{:?}/{N}x{H}x{V}", T::DTYPE);
    let flops = (2 * N * H * V) as u64;
    let mut g = c.benchmark_group("cpu_fused_linear");
    g.sample_size(10);

    g.throughput(Throughput::Elements(flops));
    g.bench_function(BenchmarkId::new("forward/ours", &id), |b| {
        b.iter(|| fused_linear_logprobs(&rows, &cfg).unwrap())
    });
    naive.widen(&hidden, &weight);
    g.bench_function(BenchmarkId::new("forward/matmul", &id), |b| {
        b.iter(|| naive.matmuls(false))
    });
    g.bench_function(BenchmarkId::new("forward/naive", &id), |b| {
        b.iter(|| naive.forward(&hidden, &weight, &targets))
    });

    g.throughput(Throughput::Elements(3 * flops));
    g.bench_function(BenchmarkId::new("forward_backward/ours", &id), |b| {
        b.iter(|| {
            let fwd = fused_linear_logprobs(&rows, &cfg).unwrap();
            fused_linear_logprobs_backward(&rows, &cfg, &fwd.saved(), &grads).unwrap()
        })
    });
    naive.widen(&hidden, &weight);
    g.bench_function(BenchmarkId::new("forward_backward/matmul", &id), |b| {
        b.iter(|| naive.matmuls(true))
    });
    g.bench_function(BenchmarkId::new("forward_backward/naive", &id), |b| {
        b.iter(|| naive.forward_backward(&hidden, &weight, &targets))
    });
    g.finish();
}

fn cpu(c: &mut Criterion) {
    if !util::selected("cpu_fused_linear") {
        return;
    }
    case::<f32>(c);
    case::<bf16>(c);
}

/// On a GPU: the op at Qwen2.5-7B's head (H = 3584, V = 151936, bf16) for
/// N = 2048 and 8192 tokens with [`FusedLinearConfig::gpu`], forward and
/// forward + backward. `compare_torch.py` times PyTorch's GEMMs alone (the
/// floor) and GEMM + selective log-softmax at the same sizes.
#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use grpo_kernels::cuda::{self, Device, Gpu};
    let Some(gpu) = Gpu::try_default(0).unwrap() else {
        eprintln!("cuda benches SKIPPED: no CUDA device");
        return;
    };
    const H_GPU: usize = 3584;
    let stream = gpu.stream();
    let weight: Vec<bf16> = util::normals(V * H_GPU, 0.02, 2);
    let d_weight = stream.clone_htod(&weight).unwrap();
    drop(weight);
    let cfg = FusedLinearConfig::gpu();
    let mut g = c.benchmark_group("cuda_fused_linear");
    g.sample_size(10);
    for n in [2048usize, 8192] {
        let hidden: Vec<bf16> = util::normals(n * H_GPU, 0.05, 1);
        let (d_hidden, d_targets) = (
            stream.clone_htod(&hidden).unwrap(),
            stream.clone_htod(&util::targets(n, V, 3)).unwrap(),
        );
        let d_ones = stream.clone_htod(&vec![1.0f32; n]).unwrap();
        let rows = LinearRows::<bf16, u32, Device> {
            hidden: d_hidden.as_view(),
            weight: d_weight.as_view(),
            bias: None,
            targets: d_targets.as_view(),
            mask: None,
            hidden_size: H_GPU,
        };
        let (rc, vc) = (cfg.chunk_rows.min(n), cfg.chunk_vocab);
        eprintln!(
            "cuda bf16 N={n}: workspace forward {:.0} MiB, backward {:.0} MiB (logits would be {:.0} MiB in bf16)",
            (4 * rc * vc + 16 * n * V.div_ceil(vc)) as f64 / (1 << 20) as f64,
            (6 * rc * vc + 6 * rc * H_GPU) as f64 / (1 << 20) as f64,
            (2 * n * V) as f64 / (1 << 20) as f64,
        );
        let param = format!("bf16_{n}x{H_GPU}x{V}");
        g.throughput(Throughput::Elements((2 * n * H_GPU * V) as u64));
        g.bench_function(BenchmarkId::new("forward", &param), |b| {
            b.iter_custom(|iters| {
                util::gpu::time(&gpu, iters, || {
                    cuda::fused_linear_logprobs(&gpu, &rows, &cfg).unwrap();
                })
            })
        });
        g.throughput(Throughput::Elements((6 * n * H_GPU * V) as u64));
        g.bench_function(BenchmarkId::new("forward_backward", &param), |b| {
            b.iter_custom(|iters| {
                util::gpu::time(&gpu, iters, || {
                    let out = cuda::fused_linear_logprobs(&gpu, &rows, &cfg).unwrap();
                    let grads = LogProbGrads::<Device> {
                        logp: d_ones.as_view(),
                        entropy: None,
                        lse: None,
                    };
                    cuda::fused_linear_logprobs_backward(&gpu, &rows, &cfg, &out.saved(), &grads).unwrap();
                })
            })
        });
    }
    g.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {}

criterion_group!(benches, cpu, bench_cuda);
criterion_main!(benches);
