//! Minor page faults and time per call of the CPU ops' allocating forms
//! against their `_into` forms writing into reused buffers: KL k3 forward
//! and backward (N = 262144 tokens), policy loss with k3 forward and
//! backward (the same tokens, 1024 sequences), token log-probs forward and
//! backward (256 x 32768 f32 logits). Faults come from `getrusage`
//! (`ru_minflt`); medians of interleaved rounds.
//!
//! ```text
//! cargo bench --bench page_faults -- [--rounds 20]
//! ```

mod util;

use std::time::Instant;

use util::median;

use grpo_kernels::{
    kl_divergence, kl_divergence_backward, kl_divergence_backward_into, kl_divergence_into, policy_loss,
    policy_loss_backward, policy_loss_backward_into, policy_loss_into, token_logprobs,
    token_logprobs_backward, token_logprobs_backward_into, token_logprobs_into, Advantage, KlEstimator,
    KlInputs, LogProbConfig, LogProbGrads, LogProbsOut, LogitRows, PolicyLossConfig, PolicyLossInputs,
    SeqLayout,
};

fn minor_faults() -> u64 {
    util::rusage().0
}

fn values(n: usize, seed: u32, offset: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) + offset
        })
        .collect()
}

/// One measured call.
type Case<'a> = Box<dyn FnMut() + 'a>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .map_or(20, |i| args[i + 1].parse().unwrap());
    let n = 1 << 18;
    let (logp, reference, grad) = (values(n, 1, -3.0), values(n, 2, -3.0), values(n, 3, 0.0));
    let old = values(n, 4, -3.0);
    let adv = values(1024, 5, 0.0);
    let kl = KlInputs::new(&logp, &reference);
    let layout = || SeqLayout::Padded {
        batch: 1024,
        seq_len: n / 1024,
    };
    let pin = PolicyLossInputs::new(&logp, Advantage::per_sequence(&adv), layout())
        .with_old(&old)
        .with_ref(&reference);
    let pcfg = PolicyLossConfig {
        beta: 0.04,
        ..PolicyLossConfig::default()
    };
    let (rows, v) = (256, 32_768);
    let logits = values(rows * v, 6, 0.0);
    let targets: Vec<u32> = (0..rows as u32).map(|i| i * 97 % v as u32).collect();
    let lrows = LogitRows::new(&logits, &targets, v);
    let lcfg = LogProbConfig::default();
    let g: Vec<f32> = values(rows, 7, 0.0);
    let grads = LogProbGrads {
        logp: &g[..],
        entropy: None,
        lse: None,
    };

    let (mut kl_out, mut kl_d) = (vec![0.0; n], vec![0.0; n]);
    let (mut per_token, mut summary, mut dlogp) = (vec![0.0; n], vec![0.0; 8], vec![0.0; n]);
    let (mut lp, mut lse, mut dz) = (vec![0.0; rows], vec![0.0; rows], vec![0.0f32; rows * v]);
    let saved = token_logprobs(&lrows, &lcfg).unwrap();
    let mut cases: Vec<(&str, Case)> = vec![
        (
            "KL k3 fwd+bwd, allocating",
            Box::new(|| {
                std::hint::black_box(kl_divergence(&kl, KlEstimator::K3).unwrap());
                std::hint::black_box(kl_divergence_backward(&kl, KlEstimator::K3, &grad).unwrap());
            }),
        ),
        (
            "KL k3 fwd+bwd, _into",
            Box::new(|| {
                kl_divergence_into(&kl, KlEstimator::K3, &mut kl_out).unwrap();
                kl_divergence_backward_into(&kl, KlEstimator::K3, &grad, &mut kl_d).unwrap();
            }),
        ),
        (
            "policy loss + k3 fwd+bwd, allocating",
            Box::new(|| {
                std::hint::black_box(policy_loss(&pin, &pcfg).unwrap());
                std::hint::black_box(policy_loss_backward(&pin, &pcfg, 1.0, None).unwrap());
            }),
        ),
        (
            "policy loss + k3 fwd+bwd, _into",
            Box::new(|| {
                policy_loss_into(&pin, &pcfg, &mut per_token, &mut summary).unwrap();
                policy_loss_backward_into(&pin, &pcfg, 1.0, None, &mut dlogp).unwrap();
            }),
        ),
        (
            "token log-probs fwd+bwd, allocating",
            Box::new(|| {
                let out = token_logprobs(&lrows, &lcfg).unwrap();
                std::hint::black_box(token_logprobs_backward(&lrows, &lcfg, &out.saved(), &grads).unwrap());
            }),
        ),
        (
            "token log-probs fwd+bwd, _into",
            Box::new(|| {
                let mut out = LogProbsOut {
                    logp: &mut lp,
                    entropy: None,
                    lse: &mut lse,
                };
                token_logprobs_into(&lrows, &lcfg, &mut out).unwrap();
                token_logprobs_backward_into(&lrows, &lcfg, &saved.saved(), &grads, &mut dz).unwrap();
            }),
        ),
    ];
    let mut times = vec![Vec::new(); cases.len()];
    let mut faults = vec![Vec::new(); cases.len()];
    for (_, f) in cases.iter_mut() {
        f(); // warm-up
    }
    for _ in 0..rounds {
        for (k, (_, f)) in cases.iter_mut().enumerate() {
            let (f0, t0) = (minor_faults(), Instant::now());
            f();
            times[k].push(t0.elapsed().as_secs_f64());
            faults[k].push((minor_faults() - f0) as f64);
        }
    }
    println!(
        "{} thread(s), {rounds} interleaved rounds, medians",
        rayon::current_num_threads()
    );
    for (k, (name, _)) in cases.iter().enumerate() {
        println!(
            "{name:>40}: {:9.1} us/call, {:6.0} minor faults/call",
            median(times[k].clone()) * 1e6,
            median(faults[k].clone())
        );
    }
}
