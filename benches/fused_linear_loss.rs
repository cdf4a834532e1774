//! The fused LM-head + GRPO loss on the CPU (forward + backward, f32) at
//! the issue's shape, h [256, 896], W [151936, 896] (Qwen2.5-0.5B's head),
//! against
//! - `3 GEMMs`: `h W^T`, `dz W`, `dz^T h` alone (the `gemm` crate, all
//!   threads, into preallocated buffers): the work the op cannot skip;
//! - `two-call`: `fused_linear_logprobs`, `policy_loss`,
//!   `policy_loss_backward`, `fused_linear_logprobs_backward` (4 GEMMs);
//! - PyTorch's eager chain, by `bench/torch/fused_linear_loss.py` on the
//!   same input files (`--dump DIR` writes them, with our loss and gradient
//!   checksums for it to compare before timing).
//!
//! Not criterion: on a shared machine only ratios measured side by side
//! mean anything, so each round runs every implementation once, in turn,
//! and the report gives the min and median of each and of the ratios per
//! round, plus minor page faults per call (from `/proc/self/stat`).
//!
//! ```text
//! cargo bench --bench fused_linear_loss -- [--rounds 5] [--n 256] [--dump DIR]
//! RAYON_NUM_THREADS=1 cargo bench --bench fused_linear_loss
//! ```

mod util;

use std::time::Instant;

use grpo_kernels::{
    fused_linear_logprobs, fused_linear_logprobs_backward, fused_linear_policy_loss,
    fused_linear_policy_loss_into, policy_loss, policy_loss_backward, Advantage, FusedLinearConfig,
    FusedLossConfig, KlEstimator, LinearLossInputs, LinearLossOut, LinearRows, LogProbGrads,
    PolicyLossConfig, PolicyLossInputs, SeqLayout,
};

const H: usize = 896;
const V: usize = 151_936;
/// Completion length: `N / T` sequences.
const T: usize = 64;

/// SplitMix64 normals, as the other benches draw them.
fn normals(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next().max(1e-300), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * scale
        })
        .collect()
}

/// Minor page faults of this process so far (field 10 of `/proc/self/stat`).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces: count fields after its closing ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(7))
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

/// Peak resident set of this process so far, in bytes (`VmHWM`).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

struct Inputs {
    n: usize,
    hidden: Vec<f32>,
    weight: Vec<f32>,
    targets: Vec<u32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    adv: Vec<f32>,
}

fn loss_cfg() -> PolicyLossConfig {
    // TRL's defaults with a KL term: eps 0.2, beta 0.04, k3, token-mean ("dapo"/"bnpo").
    PolicyLossConfig {
        beta: 0.04,
        kl: KlEstimator::K3,
        aggregation: grpo_kernels::Aggregation::TokenMean { normalizer: None },
        ..PolicyLossConfig::default()
    }
}

impl Inputs {
    fn new(n: usize) -> Self {
        let hidden = normals(n * H, 1.0, 1);
        let weight = normals(V * H, 2.0 / (H as f32).sqrt(), 2);
        let targets: Vec<u32> = normals(n, 1.0, 3)
            .iter()
            .map(|x| ((x.abs() * 1e6) as usize % V) as u32)
            .collect();
        let mut s = Self {
            n,
            hidden,
            weight,
            targets,
            old: vec![0.0; n],
            reference: vec![0.0; n],
            adv: normals(n / T, 1.0, 4),
        };
        // Old and reference log-probs near the policy's own.
        let logp = fused_linear_logprobs(&s.rows(), &FusedLinearConfig::default())
            .unwrap()
            .logp;
        let (a, b) = (normals(n, 0.1, 5), normals(n, 0.1, 6));
        s.old = logp.iter().zip(&a).map(|(l, e)| l + e).collect();
        s.reference = logp.iter().zip(&b).map(|(l, e)| l + e).collect();
        s
    }

    fn rows(&self) -> LinearRows<'_, f32, u32> {
        LinearRows::new(&self.hidden, &self.weight, &self.targets, H)
    }

    fn layout(&self) -> SeqLayout<'_> {
        SeqLayout::Padded {
            batch: self.n / T,
            seq_len: T,
        }
    }

    /// Ours, fused: `(loss, sum dh, sum dW)`.
    fn fused(&self, cfg: &FusedLossConfig) -> (f32, f64, f64) {
        let inputs = LinearLossInputs::new(self.rows(), Advantage::per_sequence(&self.adv), self.layout())
            .with_old(&self.old)
            .with_ref(&self.reference);
        let out = fused_linear_policy_loss(&inputs, cfg).unwrap();
        (out.loss(), sum(&out.grads.hidden), sum(&out.grads.weight))
    }

    /// Ours, fused, into reused outputs (`out`: logp, per_token, summary, dh, dW).
    fn fused_into(&self, cfg: &FusedLossConfig, out: &mut Outputs) -> f32 {
        let inputs = LinearLossInputs::new(self.rows(), Advantage::per_sequence(&self.adv), self.layout())
            .with_old(&self.old)
            .with_ref(&self.reference);
        let mut o = LinearLossOut {
            logp: &mut out.logp,
            entropy: None,
            per_token: &mut out.per_token,
            summary: &mut out.summary,
            dhidden: &mut out.dh,
            dweight: &mut out.dw,
            dbias: None,
        };
        fused_linear_policy_loss_into(&inputs, cfg, &mut o).unwrap();
        out.summary[0]
    }

    /// Ours, the two-call form.
    fn two_call(&self) -> (f32, f64, f64) {
        let lin = FusedLinearConfig::default();
        let lp = fused_linear_logprobs(&self.rows(), &lin).unwrap();
        let pin = PolicyLossInputs::new(&lp.logp, Advantage::per_sequence(&self.adv), self.layout())
            .with_old(&self.old)
            .with_ref(&self.reference);
        let cfg = loss_cfg();
        let loss = policy_loss(&pin, &cfg).unwrap();
        let dlogp = policy_loss_backward(&pin, &cfg, 1.0, None).unwrap();
        let grads = LogProbGrads {
            logp: &dlogp[..],
            entropy: None,
            lse: None,
        };
        let g = fused_linear_logprobs_backward(&self.rows(), &lin, &lp.saved(), &grads).unwrap();
        (loss.loss(), sum(&g.hidden), sum(&g.weight))
    }
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
    fn run(&mut self, x: &Inputs) {
        let n = x.n;
        util::gemm_f32(&mut self.logits, (n, V, H), &x.hidden, false, &x.weight, true);
        util::gemm_f32(&mut self.dh, (n, H, V), &self.logits, false, &x.weight, false);
        util::gemm_f32(&mut self.dw, (V, H, n), &self.logits, true, &x.hidden, false);
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn as_bytes<T: Copy>(xs: &[T]) -> &[u8] {
    // SAFETY: plain f32 / u32 data, read as bytes for as long as `xs` lives.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
    let rounds: usize = value("--rounds").map_or(5, |v| v.parse().unwrap());
    let n: usize = value("--n").map_or(256, |v| v.parse().unwrap());
    let threads = rayon::current_num_threads();
    let x = Inputs::new(n);
    let cfg = FusedLossConfig {
        loss: loss_cfg(),
        ..FusedLossConfig::default()
    };
    let fused = x.fused(&cfg);
    let two = x.two_call();
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
    if let Some(dir) = value("--dump") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, "hidden.f32", as_bytes(&x.hidden));
        write(&dir, "weight.f32", as_bytes(&x.weight));
        write(&dir, "targets.u32", as_bytes(&x.targets));
        write(&dir, "old.f32", as_bytes(&x.old));
        write(&dir, "ref.f32", as_bytes(&x.reference));
        write(&dir, "adv.f32", as_bytes(&x.adv));
        let meta = format!(
            "{{\"n\": {n}, \"h\": {H}, \"v\": {V}, \"seq_len\": {T}, \"beta\": 0.04, \"eps\": 0.2, \
             \"loss\": {}, \"sum_dh\": {}, \"sum_dw\": {}}}\n",
            fused.0, fused.1, fused.2
        );
        write(&dir, "meta.json", meta.as_bytes());
        println!("inputs written to {}", dir.display());
    }
    let mut gemms = Gemms {
        logits: vec![0.0; n * V],
        dh: vec![0.0; n * H],
        dw: vec![0.0; V * H],
    };
    gemms.run(&x);
    let mut outputs = Outputs {
        logp: vec![0.0; n],
        per_token: vec![0.0; n],
        summary: vec![0.0; 8],
        dh: vec![0.0; n * H],
        dw: vec![0.0; V * H],
    };
    let into = x.fused_into(&cfg, &mut outputs);
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
                    std::hint::black_box(x.fused(&cfg));
                }
                3 => {
                    std::hint::black_box(x.fused_into(&cfg, &mut outputs));
                }
                _ => {
                    std::hint::black_box(x.two_call());
                }
            }
            time.push(t0.elapsed().as_secs_f64());
            faults[k].push((minor_faults() - f0) as f64);
        }
    }
    println!(
        "N = {n}, H = {H}, V = {V}, f32, {threads} thread(s), {rounds} interleaved rounds, peak RSS {:.0} MB",
        peak_rss() as f64 / 1e6
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
