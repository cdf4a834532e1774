//! Group advantages on the CPU beside a naive single-threaded version
//! written plainly here, so the speedup reads as a ratio. Sizes: 256 rewards
//! (R1-SGG's 32 prompts x 8) and 1M rewards (G = 8).

// The naive version is a plain index loop on purpose.
#![allow(clippy::needless_range_loop)]

mod util;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use grpo_kernels::{group_advantages, AdvantageMode, Rewards};

/// The op's outputs (advantages, rewards, group means and stds), plainly:
/// per group, mean, unbiased std, normalize.
fn naive_advantages(r: &[f32], g: usize) -> [Vec<f32>; 4] {
    let (mut adv, mut means, mut stds) = (Vec::new(), Vec::new(), Vec::new());
    for group in r.chunks(g) {
        let mean = group.iter().map(|&x| x as f64).sum::<f64>() / g as f64;
        let var = group.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (g - 1) as f64;
        let std = if group.iter().all(|&x| x == group[0]) {
            0.0
        } else {
            var.sqrt()
        };
        adv.extend(group.iter().map(|&x| {
            if std == 0.0 {
                0.0
            } else {
                ((x as f64 - mean) / (std + 1e-4)) as f32
            }
        }));
        means.push(mean as f32);
        stds.push(std as f32);
    }
    [adv, r.to_vec(), means, stds]
}

fn bench_advantages(c: &mut Criterion) {
    if !util::selected("advantages_group_norm") {
        return;
    }
    let g_size = 8;
    let mut g = c.benchmark_group("advantages_group_norm");
    for n in [256usize, 1 << 20] {
        // Binary-ish rewards like R1-SGG's, with some flat groups.
        let values: Vec<f32> = util::uniforms(n, 0.0, 3.0, 9).iter().map(|x| x.floor()).collect();
        let rewards = Rewards::new(&values, g_size);
        let mode = AdvantageMode::default();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("ours", n), |b| {
            b.iter(|| group_advantages(&rewards, mode).unwrap())
        });
        g.bench_function(BenchmarkId::new("naive_1thread", n), |b| {
            b.iter(|| naive_advantages(&values, g_size))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_advantages);
criterion_main!(benches);
