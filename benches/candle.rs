//! The GRPO loss step on candle tensors, ours against the same math composed
//! from candle's own ops (`log_softmax`, `gather`, `exp`, `clamp`,
//! `minimum`, ...; `tests/common/composed.rs`), from f32 logits
//! `[S, T, V]` to the logits' gradient: time (criterion) and peak extra
//! host memory (a counting allocator, printed before the timings).
//!
//! CPU always; with `candle-cuda` and a GPU, the same step on CUDA (time
//! only: device memory is not counted here).
//!
//! Also `candle_nn_cpu`: `candle::nn`'s fused CPU ops, forward and
//! backward, against the same math composed from candle ops: `LayerNorm`
//! with a bias against candle-nn's `ops::layer_norm_slow`, `quick_gelu`
//! against `x * sigmoid(1.702 x)` (candle-nn's `ops::sigmoid`).

#[path = "../tests/common/composed.rs"]
mod composed;
mod util;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grpo_kernels::candle::{policy_loss, token_logprobs, PolicyLossTensors};
use grpo_kernels::{KlEstimator, LogProbConfig, PolicyLossConfig};

#[path = "util/peak_heap.rs"]
mod peak_heap;
use peak_heap::{peak_extra, Counting};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One batch: logits, targets, and the loss's other inputs.
struct Batch {
    logits: Var,
    targets: Tensor,
    old: Tensor,
    reference: Tensor,
    adv: Tensor,
    mask: Tensor,
}

impl Batch {
    fn new(s: usize, t: usize, v: usize, dev: &Device) -> Self {
        let logits = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (s, t, v), dev).unwrap())).unwrap();
        let targets = Tensor::rand(0f32, v as f32, (s, t), dev)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        // Old and reference log-probs near the policy's, as after a few steps.
        let logp = composed::composed_logprobs(logits.as_tensor(), &targets)
            .unwrap()
            .detach();
        let near = |scale: f64| (&logp + Tensor::randn(0f32, scale as f32, (s, t), dev).unwrap()).unwrap();
        Batch {
            old: near(0.1),
            reference: near(0.1),
            adv: Tensor::randn(0f32, 1.0, s, dev).unwrap(),
            mask: Tensor::ones((s, t), DType::U8, dev).unwrap(),
            logits,
            targets,
        }
    }

    fn ours(&self, cfg: &PolicyLossConfig) -> Tensor {
        let lp = token_logprobs(&self.logits, &self.targets, None, &LogProbConfig::default()).unwrap();
        let inputs = PolicyLossTensors {
            old_logp: Some(&self.old),
            ref_logp: Some(&self.reference),
            advantages: &self.adv,
            mask: Some(&self.mask),
            cu_seqlens: None,
            pg_weights: None,
        };
        let out = policy_loss(&lp.logp, &inputs, cfg).unwrap();
        out.loss.backward().unwrap().remove(&self.logits).unwrap()
    }

    fn composed(&self, cfg: &PolicyLossConfig) -> Tensor {
        let logp = composed::composed_logprobs(self.logits.as_tensor(), &self.targets).unwrap();
        let mask = self.mask.to_dtype(DType::F32).unwrap();
        let loss = composed::composed_grpo(&logp, &self.old, &self.reference, &self.adv, &mask, cfg).unwrap();
        loss.backward().unwrap().remove(&self.logits).unwrap()
    }
}

fn step(c: &mut Criterion, dev: &Device, name: &str, (s, t, v): (usize, usize, usize)) {
    let cfg = PolicyLossConfig {
        beta: 0.04,
        kl: KlEstimator::K3,
        ..PolicyLossConfig::default()
    };
    if !util::selected(name) {
        return;
    }
    let batch = Batch::new(s, t, v, dev);
    let logits_mib = (s * t * v * 4) as f64 / (1 << 20) as f64;
    if dev.is_cpu() {
        let ours = peak_extra(|| drop(batch.ours(&cfg))) as f64 / (1 << 20) as f64;
        let composed = peak_extra(|| drop(batch.composed(&cfg))) as f64 / (1 << 20) as f64;
        eprintln!(
            "{name} {s}x{t}x{v}: peak extra host memory ours {ours:.0} MiB, composed {composed:.0} MiB \
             ({:.1}x less; the logits are {logits_mib:.0} MiB, their gradient is one more)",
            composed / ours
        );
    }
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .throughput(Throughput::Elements((s * t * v) as u64));
    let id = format!("f32/{s}x{t}x{v}");
    let sync = || dev.synchronize().unwrap();
    g.bench_function(BenchmarkId::new("ours", &id), |b| {
        b.iter(|| {
            drop(batch.ours(&cfg));
            sync()
        })
    });
    g.bench_function(BenchmarkId::new("composed", &id), |b| {
        b.iter(|| {
            drop(batch.composed(&cfg));
            sync()
        })
    });
    g.finish();
}

fn cpu(c: &mut Criterion) {
    // 4 sequences of 256 tokens over a 32000-token vocabulary (Llama-2's).
    step(c, &Device::Cpu, "candle_grpo_step_cpu", (4, 256, 32_000));
}

/// `f(x)` and its gradient in `x` and `params` for a fixed random
/// upstream gradient.
fn forward_backward(x: &Var, params: &[&Var], upstream: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let grads = (f(x.as_tensor()) * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in std::iter::once(x).chain(params.iter().copied()) {
        assert!(grads.get(v).is_some());
    }
}

fn nn_cpu(c: &mut Criterion) {
    use candle_core::Module;
    use grpo_kernels::candle::nn::{quick_gelu, LayerNorm};
    let name = "candle_nn_cpu";
    if !util::selected(name) {
        return;
    }
    let dev = Device::Cpu;
    let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    // Qwen2-VL's vision tower: 1280 channels, 4 x 1280 in the MLP; 1024 patches.
    let (rows, d) = (1024, 1280);
    let (x, upstream) = (
        var(&[rows, d]),
        Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap(),
    );
    let (weight, bias) = (var(&[d]), var(&[d]));
    let (w, b) = (weight.as_tensor(), bias.as_tensor());
    let norm = LayerNorm::new(w.clone(), Some(b.clone()), 1e-6);
    let id = format!("f32/{rows}x{d}");
    g.throughput(Throughput::Elements((rows * d) as u64));
    g.bench_function(BenchmarkId::new("layer_norm fused", &id), |bench| {
        bench.iter(|| forward_backward(&x, &[&weight, &bias], &upstream, |x| norm.forward(x).unwrap()))
    });
    g.bench_function(BenchmarkId::new("layer_norm composed", &id), |bench| {
        bench.iter(|| {
            forward_backward(&x, &[&weight, &bias], &upstream, |x| {
                candle_nn::ops::layer_norm_slow(x, w, b, 1e-6).unwrap()
            })
        })
    });
    let (rows, d) = (1024, 5120);
    let (x, upstream) = (
        var(&[rows, d]),
        Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap(),
    );
    let id = format!("f32/{rows}x{d}");
    g.throughput(Throughput::Elements((rows * d) as u64));
    g.bench_function(BenchmarkId::new("quick_gelu fused", &id), |bench| {
        bench.iter(|| forward_backward(&x, &[], &upstream, |x| quick_gelu(x).unwrap()))
    });
    g.bench_function(BenchmarkId::new("quick_gelu composed", &id), |bench| {
        bench.iter(|| {
            forward_backward(&x, &[], &upstream, |x| {
                (x * candle_nn::ops::sigmoid(&(x * 1.702).unwrap()).unwrap()).unwrap()
            })
        })
    });
    g.finish();
}

#[cfg(feature = "candle-cuda")]
fn cuda(c: &mut Criterion) {
    // `Gpu::try_default` is `Ok(None)` without a usable driver or device
    // (where candle's own CUDA calls would panic).
    match grpo_kernels::cuda::Gpu::try_default(0).map(|gpu| gpu.map(|_| Device::new_cuda(0))) {
        Ok(Some(Ok(dev))) => step(c, &dev, "candle_grpo_step_cuda", (4, 1024, 151_936)),
        _ => eprintln!("candle cuda benches SKIPPED: no CUDA device"),
    }
}

#[cfg(not(feature = "candle-cuda"))]
fn cuda(_: &mut Criterion) {}

criterion_group!(benches, cpu, nn_cpu, cuda);
criterion_main!(benches);
