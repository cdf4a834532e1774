//! The policy-gradient corrections (TRL's sampler IS weights, OPSM, the
//! high-entropy mask) composed into one weight buffer, CPU and (feature
//! `cuda`) GPU, at 128 sequences x 2048 tokens (N = 262144), a tenth of the
//! tokens padding and a tenth of the sampler's log-probs NaN (not scored).

mod util;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grpo_kernels::{
    high_entropy_mask_into, off_policy_mask_into, sampler_is_weights_into, SamplerIsConfig, SamplerLogps,
    SeqLayout,
};

const SEQS: usize = 128;
const SEQ_LEN: usize = 2048;

struct Data {
    logp: Vec<f32>,
    old: Vec<f32>,
    sampler: Vec<f32>,
    entropy: Vec<f32>,
    mask: Vec<u8>,
    adv: Vec<f32>,
}

fn data() -> Data {
    let n = SEQS * SEQ_LEN;
    let logp = util::uniforms(n, -3.0, -0.01, 1);
    let shift = |seed| -> Vec<f32> {
        logp.iter()
            .zip(util::uniforms(n, -0.05, 0.05, seed))
            .map(|(a, b)| a + b)
            .collect()
    };
    let old = shift(2);
    let sampler = shift(3)
        .into_iter()
        .zip(util::uniforms(n, 0.0, 1.0, 4))
        .map(|(x, u)| if u < 0.1 { f32::NAN } else { x })
        .collect();
    let mask = util::uniforms(n, 0.0, 1.0, 5)
        .iter()
        .map(|&u| (u > 0.1) as u8)
        .collect();
    Data {
        logp,
        old,
        sampler,
        entropy: util::uniforms(n, 0.0, 6.0, 6),
        mask,
        adv: util::uniforms(SEQS, -1.0, 1.0, 7),
    }
}

/// TRL's vLLM IS (token_truncate, C_max 3) + OPSM (delta 0.5) + entropy
/// mask (rho 0.2) into one buffer, each op alone too.
fn bench_cpu(c: &mut Criterion) {
    if !util::selected("corrections") {
        return;
    }
    let d = data();
    let n = d.logp.len();
    let layout = || SeqLayout::Padded {
        batch: SEQS,
        seq_len: SEQ_LEN,
    };
    let is = SamplerLogps {
        logp: &d.old[..],
        sampler_logp: &d.sampler[..],
        mask: Some(&d.mask[..]),
        layout: layout(),
    };
    let opsm = SamplerLogps {
        logp: &d.logp[..],
        layout: layout(),
        ..is
    };
    let cfg = SamplerIsConfig::default();
    let mut w = vec![1.0f32; n];
    let mut g = c.benchmark_group("corrections");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("sampler_is", n), |b| {
        b.iter(|| sampler_is_weights_into(&is, &cfg, &mut w).unwrap())
    });
    g.bench_function(BenchmarkId::new("off_policy", n), |b| {
        b.iter(|| off_policy_mask_into(&opsm, &d.adv, 0.5, &mut w).unwrap())
    });
    g.bench_function(BenchmarkId::new("high_entropy", n), |b| {
        b.iter(|| high_entropy_mask_into(&d.entropy, Some(&d.mask), 0.2, &mut w).unwrap())
    });
    g.bench_function(BenchmarkId::new("all_three", n), |b| {
        b.iter(|| {
            w.fill(1.0);
            sampler_is_weights_into(&is, &cfg, &mut w).unwrap();
            off_policy_mask_into(&opsm, &d.adv, 0.5, &mut w).unwrap();
            high_entropy_mask_into(&d.entropy, Some(&d.mask), 0.2, &mut w).unwrap();
        })
    });
    g.finish();
}

#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use grpo_kernels::cuda::{self, Device, Gpu};
    if !util::selected("cuda_corrections") {
        return;
    }
    let Some(gpu) = Gpu::try_default(0).unwrap() else {
        eprintln!("cuda benches SKIPPED: no CUDA device");
        return;
    };
    let d = data();
    let n = d.logp.len();
    let up = |v: &[f32]| gpu.stream().clone_htod(v).unwrap();
    let (d_logp, d_old, d_sampler, d_ent, d_adv) = (
        up(&d.logp),
        up(&d.old),
        up(&d.sampler),
        up(&d.entropy),
        up(&d.adv),
    );
    let d_mask = gpu.stream().clone_htod(&d.mask).unwrap();
    let layout = || SeqLayout::Padded {
        batch: SEQS,
        seq_len: SEQ_LEN,
    };
    let is = SamplerLogps::<Device> {
        logp: d_old.as_view(),
        sampler_logp: d_sampler.as_view(),
        mask: Some(d_mask.as_view()),
        layout: layout(),
    };
    let opsm = SamplerLogps::<Device> {
        logp: d_logp.as_view(),
        sampler_logp: d_sampler.as_view(),
        mask: Some(d_mask.as_view()),
        layout: layout(),
    };
    let cfg = SamplerIsConfig::default();
    let mut w = up(&vec![1.0f32; n]);
    let mut g = c.benchmark_group("cuda_corrections");
    g.sample_size(30).throughput(Throughput::Elements(n as u64));
    // The IS op reads its per-sequence statistics back (a stream sync).
    g.bench_function(BenchmarkId::new("all_three", n), |b| {
        b.iter_custom(|iters| {
            util::gpu::time(&gpu, iters, || {
                let mut v = w.as_view_mut();
                cuda::sampler_is_weights_into(&gpu, &is, &cfg, &mut v).unwrap();
                cuda::off_policy_mask_into(&gpu, &opsm, &d_adv.as_view(), 0.5, &mut v).unwrap();
                let m = d_mask.as_view();
                cuda::high_entropy_mask_into(&gpu, &d_ent.as_view(), Some(&m), 0.2, &mut v).unwrap();
            })
        })
    });
    g.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {}

criterion_group!(benches, bench_cpu, bench_cuda);
criterion_main!(benches);
