//! The fused LM-head + GRPO loss on the CPU (forward + backward, f32) at
//! the issue's shape, h [256, 896], W [151936, 896] (Qwen2.5-0.5B's head),
//! against
//! - `3 GEMMs`: `h W^T`, `dz W`, `dz^T h` alone (the `gemm` crate, all
//!   threads, into preallocated buffers): the work the op cannot skip;
//! - `two-call`: `fused_linear_logprobs`, `policy_loss`,
//!   `policy_loss_backward`, `fused_linear_logprobs_backward` (4 GEMMs).
//!
//! PyTorch's eager chain on the same problem (`util::fused_loss`) is the
//! case `fused_linear_loss_fwd_bwd` of `benches/versus_torch.rs`.
//!
//! Not criterion: on a shared machine only ratios measured side by side
//! mean anything, so each round runs every implementation once, in turn,
//! and the report gives the min and median of each and of the ratios per
//! round, plus minor page faults per call (`getrusage`).
//!
//! ```text
//! cargo bench --bench fused_linear_loss -- [--rounds 5] [--n 256]
//! RAYON_NUM_THREADS=1 cargo bench --bench fused_linear_loss
//! ```

mod util;

use std::time::Instant;

use grpo_kernels::{
    fused_linear_logprobs, fused_linear_logprobs_backward, fused_linear_policy_loss,
    fused_linear_policy_loss_into, policy_loss, policy_loss_backward, Advantage, FusedLinearConfig,
    FusedLossConfig, LinearLossOut, LogProbGrads, PolicyLossInputs, PolicyLossStats,
};
use util::fused_loss::{fused_cfg, loss_cfg, Problem};
use util::median;

const H: usize = 896;
const V: usize = 151_936;
/// Completion length: `N / T` sequences.
const T: usize = 64;

fn minor_faults() -> u64 {
    util::rusage().0
}

/// Ours, fused: `(loss, sum dh, sum dW)`.
fn fused_alloc(x: &Problem, cfg: &FusedLossConfig) -> (f32, f64, f64) {
    let out = fused_linear_policy_loss(&x.loss_inputs(), cfg).unwrap();
    (out.loss(), sum(&out.grads.hidden), sum(&out.grads.weight))
}

/// Ours, fused, into reused outputs (`out`: logp, per_token, summary, dh, dW).
fn fused_into(x: &Problem, cfg: &FusedLossConfig, out: &mut Outputs) -> f32 {
    let mut o = LinearLossOut {
        logp: &mut out.logp,
        entropy: None,
        per_token: &mut out.per_token,
        summary: &mut out.summary,
        dhidden: &mut out.dh,
        dweight: &mut out.dw,
        dbias: None,
    };
    fused_linear_policy_loss_into(&x.loss_inputs(), cfg, &mut o).unwrap();
    out.summary[PolicyLossStats::LOSS]
}

/// Ours, the two-call form.
fn two_call(x: &Problem) -> (f32, f64, f64) {
    let lin = FusedLinearConfig::default();
    let lp = fused_linear_logprobs(&x.rows(), &lin).unwrap();
    let pin = PolicyLossInputs::new(&lp.logp, Advantage::per_sequence(&x.adv), x.layout())
        .with_old(&x.old)
        .with_ref(&x.reference);
    let cfg = loss_cfg();
    let loss = policy_loss(&pin, &cfg).unwrap();
    let dlogp = policy_loss_backward(&pin, &cfg, 1.0, None).unwrap();
    let grads = LogProbGrads {
        logp: &dlogp[..],
        entropy: None,
        lse: None,
    };
    let g = fused_linear_logprobs_backward(&x.rows(), &lin, &lp.saved(), &grads).unwrap();
    (loss.loss(), sum(&g.hidden), sum(&g.weight))
}

fn sum(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum()
}

/// Reused outputs of the `_into` form.
struct Outputs {
    logp: Vec<f32>,
    per_token: Vec<f32>,
    summary: Vec<f32>,
    dh: Vec<f32>,
    dw: Vec<f32>,
}

/// The three GEMMs' buffers.
struct Gemms {
    logits: Vec<f32>,
    dh: Vec<f32>,
    dw: Vec<f32>,
}

impl Gemms {
    fn run(&mut self, x: &Problem) {
        let n = x.n;
        util::gemm_f32(&mut self.logits, (n, V, H), &x.hidden, false, &x.weight, true);
        util::gemm_f32(&mut self.dh, (n, H, V), &self.logits, false, &x.weight, false);
        util::gemm_f32(&mut self.dw, (V, H, n), &self.logits, true, &x.hidden, false);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
    let rounds: usize = value("--rounds").map_or(5, |v| v.parse().unwrap());
    let n: usize = value("--n").map_or(256, |v| v.parse().unwrap());
    let threads = rayon::current_num_threads();
    let x = Problem::new(n, H, V, T);
    let cfg = fused_cfg();
    let fused = fused_alloc(&x, &cfg);
    let two = two_call(&x);
    println!(
        "fused loss {} sum dh {:.6e} sum dW {:.6e}",
        fused.0, fused.1, fused.2
    );
    println!(
        "two-call loss {} sum dh {:.6e} sum dW {:.6e}",
        two.0, two.1, two.2
    );
    assert!(
        (fused.0 - two.0).abs() <= 1e-5 * two.0.abs().max(1.0),
        "losses differ"
    );
    let mut gemms = Gemms {
        logits: vec![0.0; n * V],
        dh: vec![0.0; n * H],
        dw: vec![0.0; V * H],
    };
    gemms.run(&x);
    let mut outputs = Outputs {
        logp: vec![0.0; n],
        per_token: vec![0.0; n],
        summary: vec![0.0; PolicyLossStats::SUMMARY_LEN],
        dh: vec![0.0; n * H],
        dw: vec![0.0; V * H],
    };
    let into = fused_into(&x, &cfg, &mut outputs);
    assert_eq!(into, fused.0);
    let names = ["3 GEMMs", "fused", "two-call", "fused _into"];
    let mut times = vec![Vec::new(); names.len()];
    let mut faults = vec![Vec::new(); names.len()];
    for _ in 0..rounds {
        for (k, time) in times.iter_mut().enumerate() {
            let f0 = minor_faults();
            let t0 = Instant::now();
            match k {
                0 => gemms.run(&x),
                1 => {
                    std::hint::black_box(fused_alloc(&x, &cfg));
                }
                3 => {
                    std::hint::black_box(fused_into(&x, &cfg, &mut outputs));
                }
                _ => {
                    std::hint::black_box(two_call(&x));
                }
            }
            time.push(t0.elapsed().as_secs_f64());
            faults[k].push((minor_faults() - f0) as f64);
        }
    }
    println!(
        "N = {n}, H = {H}, V = {V}, f32, {threads} thread(s), {rounds} interleaved rounds, peak RSS {:.0} MB",
        util::rusage().1 as f64 / 1e6
    );
    for k in 0..names.len() {
        println!(
            "{:>9}: min {:8.1} ms  median {:8.1} ms  minor faults/call {:.0}",
            names[k],
            times[k].iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
            median(times[k].clone()) * 1e3,
            median(faults[k].clone()),
        );
    }
    let ratio =
        |a: usize, b: usize| -> Vec<f64> { times[a].iter().zip(&times[b]).map(|(x, y)| x / y).collect() };
    let gemm_flops = 3.0 * 2.0 * (n * H * V) as f64;
    let gemms_gflops = gemm_flops / median(times[0].clone()) / 1e9;
    match util::fma_peak_gflops() {
        Some(peak) => println!(
            "3 GEMMs: {gemms_gflops:.0} GFLOP/s, {:.0}% of this machine's f32 FMA peak ({peak:.0} GFLOP/s on {threads} thread(s)): \
             no code computing them runs more than {:.2}x faster here",
            100.0 * gemms_gflops / peak,
            peak / gemms_gflops,
        ),
        None => println!("3 GEMMs: {gemms_gflops:.0} GFLOP/s (no FMA peak measured on this CPU)"),
    }
    for (a, b, what) in [
        (1, 0, "fused / 3 GEMMs"),
        (3, 0, "fused _into / 3 GEMMs"),
        (2, 1, "two-call / fused"),
    ] {
        let r = ratio(a, b);
        println!(
            "{what}: median {:.3}x (min {:.3}x, max {:.3}x)",
            median(r.clone()),
            r.iter().copied().fold(f64::INFINITY, f64::min),
            r.iter().copied().fold(0.0, f64::max)
        );
    }
}
