//! KL estimators (k3, forward and backward) on the CPU beside a naive
//! single-threaded version written plainly here, so the speedup reads as a
//! ratio. Size: 128 sequences x 2048 tokens (N = 262144).

mod util;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grpo_kernels::{kl_divergence, kl_divergence_backward, KlEstimator, KlInputs};

const SEQS: usize = 128;
const SEQ_LEN: usize = 2048;

fn bench_kl(c: &mut Criterion) {
    if !util::selected("kl_k3") {
        return;
    }
    let n = SEQS * SEQ_LEN;
    let logp = util::uniforms(n, -4.0, -0.01, 6);
    let ref_logp: Vec<f32> = logp
        .iter()
        .zip(util::uniforms(n, -0.5, 0.5, 7))
        .map(|(l, d)| l + d)
        .collect();
    let grad = util::uniforms(n, -1.0, 1.0, 8);
    let inputs = KlInputs::new(&logp, &ref_logp);
    let est = KlEstimator::K3;
    let naive_k3 = || -> Vec<f32> {
        logp.iter()
            .zip(&ref_logp)
            .map(|(l, r)| {
                let d = r - l;
                d.exp() - d - 1.0
            })
            .collect()
    };
    let naive_k3_backward = || -> Vec<f32> {
        logp.iter()
            .zip(&ref_logp)
            .zip(&grad)
            .map(|((l, r), g)| g * (1.0 - (r - l).exp()))
            .collect()
    };
    let mut g = c.benchmark_group("kl_k3");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("forward", n), |b| {
        b.iter(|| kl_divergence(&inputs, est).unwrap())
    });
    g.bench_function(BenchmarkId::new("naive_forward_1thread", n), |b| b.iter(naive_k3));
    g.bench_function(BenchmarkId::new("backward", n), |b| {
        b.iter(|| kl_divergence_backward(&inputs, est, &grad).unwrap())
    });
    g.bench_function(BenchmarkId::new("naive_backward_1thread", n), |b| {
        b.iter(naive_k3_backward)
    });
    g.finish();
}

criterion_group!(benches, bench_kl);
criterion_main!(benches);
