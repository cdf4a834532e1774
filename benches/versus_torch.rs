//! Every CPU op of the crate against PyTorch's CPU path, case by case, in
//! fresh processes: this binary runs our side, `bench/torch/versus.py`
//! PyTorch's on the same input files, and `bench/cpu_versus_torch.sh`
//! drives both (interleaved rounds, `taskset`-pinned thread counts) into a
//! markdown table and rows of `bench/data/kernels.csv`.
//!
//! ```text
//! cargo bench --bench versus_torch -- --dump DIR [--small]
//! cargo bench --bench versus_torch -- --case NAME --threads N --rounds R DIR
//! cargo bench --bench versus_torch -- --list
//! cargo test --release --bench versus_torch     # the self-test below
//! ```
//!
//! `--dump` writes every case's inputs (raw little-endian arrays, one file
//! each, shared between the cases that use them) and `meta.json`: the
//! sizes, the settings, and per case our outputs (in full, or for an array
//! over 4 Mi elements 16 evenly spaced rows of it) and their checksum (the
//! f64 sum of every output element). Each case runs twice there, through
//! the same code `--case` times, and must give the same checksum both times
//! (buffers reused between calls). `--small` shrinks every case, for a
//! smoke test of the whole pipeline. With no subcommand (`cargo test`,
//! plain `cargo bench`) the binary tests itself: a small dump into a
//! temporary directory, every case through `--case`'s code, reading the
//! files back to the dump's checksums, and, where `$PYTHON` (default
//! `python3`) has torch, transformers and TRL, `versus.py`'s comparison.
//!
//! `--case` reads the case's inputs from `DIR`, builds a rayon pool of `N`
//! threads, runs one untimed call, then `R` timed calls, and prints one
//! JSON line: min and median seconds per call, minor page faults per call
//! (median of the `getrusage` `ru_minflt` deltas), the process's RSS before
//! loading (`start_rss`) and its peak (`ru_maxrss`), and the checksum.
//!
//! The cases, at the sizes of the crate's criterion benches (`form`: what
//! runs on our side; a training loop reuses its buffers, so the `_into`
//! forms run wherever they exist):
//!
//! | case | size | our form |
//! |---|---|---|
//! | `logprob_fwd_f32`, `_bf16` | logits [4096, 151936] (`benches/logprob.rs`'s Qwen-vocab rows, as 64 sequences x 64 tokens) | `token_logprobs_into` |
//! | `logprob_fwd_bwd_f32`, `_bf16` | the same, `dlogits` into a buffer | `token_logprobs_into` + `token_logprobs_backward_into` |
//! | `fused_linear_fwd` | h [256, 896], W [151936, 896] f32 (Qwen2.5-0.5B's head) | `fused_linear_logprobs_into` |
//! | `fused_linear_fwd_bwd` | the same, `dh` and `dW` | `fused_linear_logprobs_into` + `fused_linear_logprobs_backward_into` |
//! | `fused_linear_loss_fwd_bwd` | the same + GRPO loss (eps 0.2, k3 beta 0.04, token mean) | `fused_linear_policy_loss_into` |
//! | `kl_k3_fwd`, `kl_k3_fwd_bwd` | 128 x 2048 tokens | `kl_divergence_into` (+ `kl_divergence_backward_into`) |
//! | `policy_loss_fwd`, `policy_loss_fwd_bwd` | 128 x 2048 tokens, completions of 256..2048, k3 beta 0.04, sequence mean of token means | `policy_loss_into` (+ `policy_loss_backward_into`) |
//! | `sample` | logits [64, 151936] f32, temperature 0.7, top-k 50, top-p 0.9 | `sample_into` |
//! | `advantages` | 2^20 rewards in groups of 8 | `group_advantages_into` |

mod util;

use std::path::{Path, PathBuf};
use std::time::Instant;

use grpo_kernels::{
    fused_linear_logprobs_backward_into, fused_linear_logprobs_into, fused_linear_policy_loss_into,
    group_advantages_into, kl_divergence_backward_into, kl_divergence_into, policy_loss_backward_into,
    policy_loss_into, sample_into, token_logprobs_backward_into, token_logprobs_into, Advantage,
    AdvantageMode, Float, FusedLinearConfig, GroupAdvantagesOut, KlEstimator, KlInputs, LinearGradsOut,
    LinearLossOut, LogProbConfig, LogProbGrads, LogProbSaved, LogProbsOut, LogitRows, PolicyLossConfig,
    PolicyLossInputs, PolicyLossStats, Rewards, SampleInputs, SamplesOut, SamplingConfig, SeqLayout,
};
use half::bf16;
use serde_json::{json, Value};
use util::fused_loss::{self, Problem};
use util::{median, read_raw, rusage, write_raw};

/// The problems' dimensions.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// Token log-probs: `lp_batch * lp_seq` rows of `vocab` logits.
    lp_batch: usize,
    lp_seq: usize,
    /// Every vocabulary: logits, the LM head, sampling.
    vocab: usize,
    /// Fused linear: `fl_rows` hidden states of `hidden`, sequences of `fl_seq`.
    fl_rows: usize,
    hidden: usize,
    fl_seq: usize,
    /// KL and policy loss: `seqs` sequences padded to `seq_len` tokens.
    seqs: usize,
    seq_len: usize,
    /// Sampling: rows of `vocab` logits.
    sample_rows: usize,
    /// Advantages: rewards, in groups of `group`.
    rewards: usize,
    group: usize,
}

const FULL: Sizes = Sizes {
    lp_batch: 64,
    lp_seq: 64,
    vocab: 151_936,
    fl_rows: 256,
    hidden: 896,
    fl_seq: 64,
    seqs: 128,
    seq_len: 2048,
    sample_rows: 64,
    rewards: 1 << 20,
    group: 8,
};

/// `--small`: every case in milliseconds.
const SMALL: Sizes = Sizes {
    lp_batch: 4,
    lp_seq: 8,
    vocab: 1000,
    fl_rows: 32,
    hidden: 24,
    fl_seq: 8,
    seqs: 6,
    seq_len: 40,
    sample_rows: 8,
    rewards: 256,
    group: 8,
};

/// The settings both sides use (`meta.json`'s `params`).
const BETA: f32 = 0.04;
const TEMPERATURE: f32 = 0.7;
const TOP_K: usize = 50;
const TOP_P: f32 = 0.9;

#[derive(Clone, Copy, Debug)]
enum Kind {
    LogProb { bf16: bool, backward: bool },
    FusedLinear { backward: bool },
    FusedLoss,
    Kl { backward: bool },
    PolicyLoss { backward: bool },
    Sample,
    Advantages,
}

/// One row of the comparison.
struct Case {
    /// The name both scripts know the case by.
    name: &'static str,
    /// `op` in `bench/data/kernels.csv`.
    op: &'static str,
    dtype: &'static str,
    /// What runs on our side.
    form: &'static str,
    kind: Kind,
}

const CASES: &[Case] = &[
    Case {
        name: "logprob_fwd_f32",
        op: "logprob_fwd",
        dtype: "f32",
        form: "token_logprobs_into",
        kind: Kind::LogProb {
            bf16: false,
            backward: false,
        },
    },
    Case {
        name: "logprob_fwd_bwd_f32",
        op: "logprob_fwd_bwd_buf",
        dtype: "f32",
        form: "token_logprobs_into + token_logprobs_backward_into",
        kind: Kind::LogProb {
            bf16: false,
            backward: true,
        },
    },
    Case {
        name: "logprob_fwd_bf16",
        op: "logprob_fwd",
        dtype: "bf16",
        form: "token_logprobs_into",
        kind: Kind::LogProb {
            bf16: true,
            backward: false,
        },
    },
    Case {
        name: "logprob_fwd_bwd_bf16",
        op: "logprob_fwd_bwd_buf",
        dtype: "bf16",
        form: "token_logprobs_into + token_logprobs_backward_into",
        kind: Kind::LogProb {
            bf16: true,
            backward: true,
        },
    },
    Case {
        name: "fused_linear_fwd",
        op: "fused_linear_fwd",
        dtype: "f32",
        form: "fused_linear_logprobs_into",
        kind: Kind::FusedLinear { backward: false },
    },
    Case {
        name: "fused_linear_fwd_bwd",
        op: "fused_linear_fwd_bwd",
        dtype: "f32",
        form: "fused_linear_logprobs_into + fused_linear_logprobs_backward_into",
        kind: Kind::FusedLinear { backward: true },
    },
    Case {
        name: "fused_linear_loss_fwd_bwd",
        op: "fused_linear_loss_fwd_bwd",
        dtype: "f32",
        form: "fused_linear_policy_loss_into",
        kind: Kind::FusedLoss,
    },
    Case {
        name: "kl_k3_fwd",
        op: "kl_k3_fwd",
        dtype: "f32",
        form: "kl_divergence_into",
        kind: Kind::Kl { backward: false },
    },
    Case {
        name: "kl_k3_fwd_bwd",
        op: "kl_k3_fwd_bwd",
        dtype: "f32",
        form: "kl_divergence_into + kl_divergence_backward_into",
        kind: Kind::Kl { backward: true },
    },
    Case {
        name: "policy_loss_fwd",
        op: "policy_loss_fwd",
        dtype: "f32",
        form: "policy_loss_into",
        kind: Kind::PolicyLoss { backward: false },
    },
    Case {
        name: "policy_loss_fwd_bwd",
        op: "policy_loss_fwd_bwd",
        dtype: "f32",
        form: "policy_loss_into + policy_loss_backward_into",
        kind: Kind::PolicyLoss { backward: true },
    },
    Case {
        name: "sample",
        op: "sample_topk50_topp09",
        dtype: "f32",
        form: "sample_into",
        kind: Kind::Sample,
    },
    Case {
        name: "advantages",
        op: "advantages",
        dtype: "f32",
        form: "group_advantages_into",
        kind: Kind::Advantages,
    },
];

impl Case {
    /// The size as `kernels.csv` writes it.
    fn shape(&self, s: &Sizes) -> String {
        match self.kind {
            Kind::LogProb { .. } => format!("{}x{}", s.lp_batch * s.lp_seq, s.vocab),
            Kind::FusedLinear { .. } | Kind::FusedLoss => format!("{}x{}x{}", s.fl_rows, s.hidden, s.vocab),
            Kind::Kl { .. } | Kind::PolicyLoss { .. } => format!("{}", s.seqs * s.seq_len),
            Kind::Sample => format!("{}x{}", s.sample_rows, s.vocab),
            Kind::Advantages => format!("{}", s.rewards),
        }
    }
}

/// An output array read as f32 (bf16 and token ids exactly), borrowed:
/// reading it allocates nothing, so the checksum leaves the peak RSS alone.
trait Values {
    fn len(&self) -> usize;
    fn at(&self, i: usize) -> f32;
    /// The f64 sum of the elements.
    fn sum(&self) -> f64;
}

struct Floats<'a, T>(&'a [T]);

impl<T: Float> Values for Floats<'_, T> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn at(&self, i: usize) -> f32 {
        self.0[i].to_f32()
    }
    fn sum(&self) -> f64 {
        self.0.iter().map(|x| x.to_f32() as f64).sum()
    }
}

struct Ids<'a>(&'a [u32]);

impl Values for Ids<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn at(&self, i: usize) -> f32 {
        self.0[i] as f32
    }
    fn sum(&self) -> f64 {
        self.0.iter().map(|&x| x as f64).sum()
    }
}

/// One output array, `[rows, cols]`.
struct Output<'a> {
    name: &'static str,
    values: Box<dyn Values + 'a>,
    cols: usize,
}

fn out<'a, T: Float>(name: &'static str, values: &'a [T], cols: usize) -> Output<'a> {
    Output {
        name,
        values: Box::new(Floats(values)),
        cols,
    }
}

/// A loaded case: `call` is what is timed.
trait Run {
    fn call(&mut self);
    fn outputs(&self) -> Vec<Output<'_>>;
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Writes the inputs of `kind` under `dir` unless a case before it did.
fn generate(kind: Kind, s: &Sizes, dir: &Path) {
    let missing = |name: &str| !file(dir, name).exists();
    match kind {
        Kind::LogProb { bf16: half, .. } => {
            let (rows, v) = (s.lp_batch * s.lp_seq, s.vocab);
            let logits = if half {
                "logprob.logits.bf16"
            } else {
                "logprob.logits.f32"
            };
            if missing(logits) {
                // The same normals as `benches/logprob.rs` draws (sd 3).
                if half {
                    write_raw(&file(dir, logits), &util::normals::<bf16>(rows * v, 3.0, 1));
                } else {
                    write_raw(&file(dir, logits), &util::normals::<f32>(rows * v, 3.0, 1));
                }
            }
            if missing("logprob.targets.u32") {
                write_raw(&file(dir, "logprob.targets.u32"), &util::targets(rows, v, 2));
                // Upstream gradients bf16 can hold, so both dtypes use them as they are.
                let grad: Vec<f32> = util::normals::<bf16>(rows, 1.0, 3)
                    .iter()
                    .map(|g| g.to_f32())
                    .collect();
                write_raw(&file(dir, "logprob.grad.f32"), &grad);
            }
        }
        Kind::FusedLinear { .. } | Kind::FusedLoss => {
            if missing("fused.hidden.f32") {
                let p = Problem::new(s.fl_rows, s.hidden, s.vocab, s.fl_seq);
                write_raw(&file(dir, "fused.hidden.f32"), &p.hidden);
                write_raw(&file(dir, "fused.weight.f32"), &p.weight);
                write_raw(&file(dir, "fused.targets.u32"), &p.targets);
                write_raw(&file(dir, "fused.old.f32"), &p.old);
                write_raw(&file(dir, "fused.ref.f32"), &p.reference);
                write_raw(&file(dir, "fused.adv.f32"), &p.adv);
                write_raw(
                    &file(dir, "fused.grad.f32"),
                    &util::normals::<f32>(s.fl_rows, 1.0, 7),
                );
            }
        }
        Kind::Kl { .. } | Kind::PolicyLoss { .. } => {
            if missing("tokens.logp.f32") {
                // As `benches/policy_loss.rs` and `benches/kl.rs` draw them.
                let n = s.seqs * s.seq_len;
                let logp = util::uniforms(n, -4.0, -0.01, 1);
                let shifted = |seed, lo, hi| -> Vec<f32> {
                    logp.iter()
                        .zip(util::uniforms(n, lo, hi, seed))
                        .map(|(l, d)| l + d)
                        .collect()
                };
                write_raw(&file(dir, "tokens.old.f32"), &shifted(2, -0.4, 0.4));
                write_raw(&file(dir, "tokens.ref.f32"), &shifted(3, -0.5, 0.5));
                write_raw(&file(dir, "tokens.logp.f32"), &logp);
                write_raw(
                    &file(dir, "tokens.adv.f32"),
                    &util::uniforms(s.seqs, -1.5, 1.5, 4),
                );
                // Completions of seq_len / 8 .. seq_len tokens, padded.
                let lens = util::uniforms(s.seqs, (s.seq_len / 8) as f32, s.seq_len as f32, 5);
                let mask: Vec<u8> = (0..n)
                    .map(|t| ((t % s.seq_len) < lens[t / s.seq_len] as usize) as u8)
                    .collect();
                write_raw(&file(dir, "tokens.mask.u8"), &mask);
                write_raw(&file(dir, "tokens.grad.f32"), &util::uniforms(n, -1.0, 1.0, 8));
            }
        }
        Kind::Sample => {
            if missing("sample.logits.f32") {
                write_raw(
                    &file(dir, "sample.logits.f32"),
                    &util::normals::<f32>(s.sample_rows * s.vocab, 3.0, 11),
                );
            }
        }
        Kind::Advantages => {
            if missing("rewards.f32") {
                // Rewards in {0, 1, 2}, like R1-SGG's, some groups flat.
                let r: Vec<f32> = util::uniforms(s.rewards, 0.0, 3.0, 9)
                    .iter()
                    .map(|x| x.floor())
                    .collect();
                write_raw(&file(dir, "rewards.f32"), &r);
            }
        }
    }
}

struct LogProbRun<T> {
    logits: Vec<T>,
    targets: Vec<u32>,
    grad: Vec<f32>,
    vocab: usize,
    backward: bool,
    logp: Vec<f32>,
    lse: Vec<f32>,
    dlogits: Vec<T>,
}

impl<T: Float> Run for LogProbRun<T> {
    fn call(&mut self) {
        let rows = LogitRows::new(&self.logits, &self.targets, self.vocab);
        let cfg = LogProbConfig::default();
        let mut o = LogProbsOut {
            logp: &mut self.logp,
            entropy: None,
            lse: &mut self.lse,
        };
        token_logprobs_into(&rows, &cfg, &mut o).unwrap();
        if self.backward {
            let saved = LogProbSaved {
                lse: &self.lse[..],
                entropy: None,
            };
            let grads = LogProbGrads {
                logp: &self.grad[..],
                entropy: None,
                lse: None,
            };
            token_logprobs_backward_into(&rows, &cfg, &saved, &grads, &mut self.dlogits).unwrap();
        }
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        let mut o = vec![out("logp", &self.logp, 1)];
        if self.backward {
            o.push(out("dlogits", &self.dlogits, self.vocab));
        }
        o
    }
}

struct FusedLinearRun {
    p: Problem,
    grad: Vec<f32>,
    backward: bool,
    logp: Vec<f32>,
    lse: Vec<f32>,
    dh: Vec<f32>,
    dw: Vec<f32>,
}

impl Run for FusedLinearRun {
    fn call(&mut self) {
        let (rows, cfg) = (self.p.rows(), FusedLinearConfig::default());
        let mut o = LogProbsOut {
            logp: &mut self.logp,
            entropy: None,
            lse: &mut self.lse,
        };
        fused_linear_logprobs_into(&rows, &cfg, &mut o).unwrap();
        if self.backward {
            let saved = LogProbSaved {
                lse: &self.lse[..],
                entropy: None,
            };
            let grads = LogProbGrads {
                logp: &self.grad[..],
                entropy: None,
                lse: None,
            };
            let mut g = LinearGradsOut {
                hidden: &mut self.dh,
                weight: &mut self.dw,
                bias: None,
            };
            fused_linear_logprobs_backward_into(&rows, &cfg, &saved, &grads, &mut g).unwrap();
        }
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        let mut o = vec![out("logp", &self.logp, 1)];
        if self.backward {
            o.push(out("dhidden", &self.dh, self.p.h));
            o.push(out("dweight", &self.dw, self.p.h));
        }
        o
    }
}

struct FusedLossRun {
    p: Problem,
    logp: Vec<f32>,
    per_token: Vec<f32>,
    summary: Vec<f32>,
    dh: Vec<f32>,
    dw: Vec<f32>,
}

impl Run for FusedLossRun {
    fn call(&mut self) {
        let mut o = LinearLossOut {
            logp: &mut self.logp,
            entropy: None,
            per_token: &mut self.per_token,
            summary: &mut self.summary,
            dhidden: &mut self.dh,
            dweight: &mut self.dw,
            dbias: None,
        };
        fused_linear_policy_loss_into(&self.p.loss_inputs(), &fused_loss::fused_cfg(), &mut o).unwrap();
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        vec![
            out("loss", &self.summary[PolicyLossStats::LOSS..][..1], 1),
            out("dhidden", &self.dh, self.p.h),
            out("dweight", &self.dw, self.p.h),
        ]
    }
}

struct KlRun {
    logp: Vec<f32>,
    reference: Vec<f32>,
    grad: Vec<f32>,
    backward: bool,
    kl: Vec<f32>,
    dlogp: Vec<f32>,
}

impl Run for KlRun {
    fn call(&mut self) {
        let inputs = KlInputs::new(&self.logp, &self.reference);
        kl_divergence_into(&inputs, KlEstimator::K3, &mut self.kl).unwrap();
        if self.backward {
            kl_divergence_backward_into(&inputs, KlEstimator::K3, &self.grad, &mut self.dlogp).unwrap();
        }
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        let mut o = vec![out("kl", &self.kl, 1)];
        if self.backward {
            o.push(out("dlogp", &self.dlogp, 1));
        }
        o
    }
}

struct PolicyRun {
    logp: Vec<f32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<u8>,
    seq_len: usize,
    backward: bool,
    per_token: Vec<f32>,
    summary: Vec<f32>,
    dlogp: Vec<f32>,
}

/// TRL's GRPO loss with a KL term: eps 0.2, k3 beta 0.04, `loss_type="grpo"`
/// (the sequence mean of token means).
fn policy_cfg() -> PolicyLossConfig {
    PolicyLossConfig {
        beta: BETA,
        kl: KlEstimator::K3,
        ..PolicyLossConfig::default()
    }
}

impl Run for PolicyRun {
    fn call(&mut self) {
        let layout = SeqLayout::Padded {
            batch: self.adv.len(),
            seq_len: self.seq_len,
        };
        let inputs = PolicyLossInputs::new(&self.logp, Advantage::per_sequence(&self.adv), layout)
            .with_old(&self.old)
            .with_ref(&self.reference)
            .with_mask(&self.mask);
        let cfg = policy_cfg();
        policy_loss_into(&inputs, &cfg, &mut self.per_token, &mut self.summary).unwrap();
        if self.backward {
            policy_loss_backward_into(&inputs, &cfg, 1.0, None, &mut self.dlogp).unwrap();
        }
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        let mut o = vec![
            out("loss", &self.summary[PolicyLossStats::LOSS..][..1], 1),
            out("per_token", &self.per_token, 1),
        ];
        if self.backward {
            o.push(out("dlogp", &self.dlogp, 1));
        }
        o
    }
}

struct SampleRun {
    logits: Vec<f32>,
    vocab: usize,
    tokens: Vec<u32>,
    logp: Vec<f32>,
}

impl Run for SampleRun {
    fn call(&mut self) {
        let cfg = SamplingConfig {
            temperature: TEMPERATURE,
            top_k: TOP_K,
            top_p: TOP_P,
            ..SamplingConfig::default()
        };
        let mut o = SamplesOut {
            tokens: &mut self.tokens,
            logp: &mut self.logp,
        };
        sample_into(&SampleInputs::new(&self.logits, self.vocab), &cfg, &mut o).unwrap();
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        let tokens = Output {
            name: "tokens",
            values: Box::new(Ids(&self.tokens)),
            cols: 1,
        };
        vec![tokens, out("logp", &self.logp, 1)]
    }
}

struct AdvantagesRun {
    rewards: Vec<f32>,
    group: usize,
    advantages: Vec<f32>,
    combined: Vec<f32>,
    group_mean: Vec<f32>,
    group_std: Vec<f32>,
}

impl Run for AdvantagesRun {
    fn call(&mut self) {
        let r = Rewards::new(&self.rewards, self.group);
        let mut out = GroupAdvantagesOut {
            advantages: &mut self.advantages,
            rewards: &mut self.combined,
            group_mean: &mut self.group_mean,
            group_std: &mut self.group_std,
        };
        group_advantages_into(&r, AdvantageMode::default(), &mut out).unwrap();
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        vec![out("advantages", &self.advantages, 1)]
    }
}

/// The case's inputs read from `dir`, its outputs allocated.
fn load(kind: Kind, s: &Sizes, dir: &Path) -> Box<dyn Run> {
    fn logprob<T: Float>(dir: &Path, logits: &str, s: &Sizes, backward: bool) -> Box<dyn Run> {
        let logits: Vec<T> = read_raw(&file(dir, logits));
        let rows = s.lp_batch * s.lp_seq;
        Box::new(LogProbRun {
            dlogits: if backward {
                vec![T::default(); logits.len()]
            } else {
                Vec::new()
            },
            logits,
            targets: read_raw(&file(dir, "logprob.targets.u32")),
            grad: read_raw(&file(dir, "logprob.grad.f32")),
            vocab: s.vocab,
            backward,
            logp: vec![0.0; rows],
            lse: vec![0.0; rows],
        })
    }
    let f32s = |name: &str| -> Vec<f32> { read_raw(&file(dir, name)) };
    let problem = || Problem {
        n: s.fl_rows,
        h: s.hidden,
        v: s.vocab,
        seq_len: s.fl_seq,
        hidden: f32s("fused.hidden.f32"),
        weight: f32s("fused.weight.f32"),
        targets: read_raw(&file(dir, "fused.targets.u32")),
        old: f32s("fused.old.f32"),
        reference: f32s("fused.ref.f32"),
        adv: f32s("fused.adv.f32"),
    };
    let n = s.seqs * s.seq_len;
    match kind {
        Kind::LogProb { bf16: true, backward } => logprob::<bf16>(dir, "logprob.logits.bf16", s, backward),
        Kind::LogProb {
            bf16: false,
            backward,
        } => logprob::<f32>(dir, "logprob.logits.f32", s, backward),
        Kind::FusedLinear { backward } => Box::new(FusedLinearRun {
            p: problem(),
            grad: f32s("fused.grad.f32"),
            backward,
            logp: vec![0.0; s.fl_rows],
            lse: vec![0.0; s.fl_rows],
            dh: vec![0.0; if backward { s.fl_rows * s.hidden } else { 0 }],
            dw: vec![0.0; if backward { s.vocab * s.hidden } else { 0 }],
        }),
        Kind::FusedLoss => Box::new(FusedLossRun {
            p: problem(),
            logp: vec![0.0; s.fl_rows],
            per_token: vec![0.0; s.fl_rows],
            summary: vec![0.0; PolicyLossStats::SUMMARY_LEN],
            dh: vec![0.0; s.fl_rows * s.hidden],
            dw: vec![0.0; s.vocab * s.hidden],
        }),
        Kind::Kl { backward } => Box::new(KlRun {
            logp: f32s("tokens.logp.f32"),
            reference: f32s("tokens.ref.f32"),
            grad: f32s("tokens.grad.f32"),
            backward,
            kl: vec![0.0; n],
            dlogp: vec![0.0; if backward { n } else { 0 }],
        }),
        Kind::PolicyLoss { backward } => Box::new(PolicyRun {
            logp: f32s("tokens.logp.f32"),
            old: f32s("tokens.old.f32"),
            reference: f32s("tokens.ref.f32"),
            adv: f32s("tokens.adv.f32"),
            mask: read_raw(&file(dir, "tokens.mask.u8")),
            seq_len: s.seq_len,
            backward,
            per_token: vec![0.0; n],
            summary: vec![0.0; PolicyLossStats::SUMMARY_LEN],
            dlogp: vec![0.0; if backward { n } else { 0 }],
        }),
        Kind::Sample => Box::new(SampleRun {
            logits: f32s("sample.logits.f32"),
            vocab: s.vocab,
            tokens: vec![0; s.sample_rows],
            logp: vec![0.0; s.sample_rows],
        }),
        Kind::Advantages => {
            let rewards = f32s("rewards.f32");
            let (n, groups) = (rewards.len(), rewards.len() / s.group);
            Box::new(AdvantagesRun {
                rewards,
                group: s.group,
                advantages: vec![0.0; n],
                combined: vec![0.0; n],
                group_mean: vec![0.0; groups],
                group_std: vec![0.0; groups],
            })
        }
    }
}

/// The f64 sum of every output element.
fn checksum(outputs: &[Output]) -> f64 {
    outputs.iter().map(|o| o.values.sum()).sum()
}

/// Arrays over this many elements are dumped as [`SAMPLED_ROWS`] rows.
const DUMP_WHOLE: usize = 1 << 22;
const SAMPLED_ROWS: usize = 16;

/// Writes `o` (whole or sampled rows) as `out.CASE.NAME.f32`; returns its meta.
fn dump_output(dir: &Path, case: &str, o: &Output) -> Value {
    let rows = o.values.len() / o.cols;
    let name = format!("out.{case}.{}.f32", o.name);
    let picked: Option<Vec<usize>> = (o.values.len() > DUMP_WHOLE).then(|| {
        (0..SAMPLED_ROWS)
            .map(|i| i * (rows - 1) / (SAMPLED_ROWS - 1))
            .collect()
    });
    let elements: Vec<usize> = match &picked {
        None => (0..o.values.len()).collect(),
        Some(idx) => idx.iter().flat_map(|&r| r * o.cols..(r + 1) * o.cols).collect(),
    };
    let values: Vec<f32> = elements.into_iter().map(|i| o.values.at(i)).collect();
    write_raw(&file(dir, &name), &values);
    json!({"name": o.name, "file": name, "shape": [rows, o.cols], "rows": picked})
}

fn sizes_json(s: &Sizes) -> Value {
    json!({
        "lp_batch": s.lp_batch, "lp_seq": s.lp_seq, "vocab": s.vocab,
        "fl_rows": s.fl_rows, "hidden": s.hidden, "fl_seq": s.fl_seq,
        "seqs": s.seqs, "seq_len": s.seq_len, "sample_rows": s.sample_rows,
        "rewards": s.rewards, "group": s.group,
    })
}

fn dump(dir: &Path, small: bool) {
    let s = if small { SMALL } else { FULL };
    std::fs::create_dir_all(dir).unwrap();
    let mut cases = Vec::new();
    for case in CASES {
        let t0 = Instant::now();
        generate(case.kind, &s, dir);
        let mut run = load(case.kind, &s, dir);
        run.call();
        let outputs = run.outputs();
        let sum = checksum(&outputs);
        let outs: Vec<Value> = outputs.iter().map(|o| dump_output(dir, case.name, o)).collect();
        drop(outputs);
        // Again, into the same buffers: the form reused as a loop reuses it.
        run.call();
        let again = checksum(&run.outputs());
        assert!(
            sum.to_bits() == again.to_bits(),
            "{}: a second call into the same buffers gave checksum {again}, the first {sum}",
            case.name
        );
        println!(
            "{:<26} checksum {sum:<24e} ({:.1} s)",
            case.name,
            t0.elapsed().as_secs_f64()
        );
        cases.push(json!({
            "name": case.name, "op": case.op, "dtype": case.dtype, "shape": case.shape(&s),
            "form": case.form, "outputs": outs, "checksum": sum,
        }));
    }
    let meta = json!({
        "small": small,
        "sizes": sizes_json(&s),
        "params": {"eps": 0.2, "beta": BETA, "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P,
                   "adv_eps": 1e-4},
        "cases": cases,
    });
    std::fs::write(
        file(dir, "meta.json"),
        serde_json::to_string_pretty(&meta).unwrap() + "\n",
    )
    .unwrap();
    println!(
        "{} cases' inputs and outputs written to {}",
        CASES.len(),
        dir.display()
    );
}

fn find(name: &str) -> &'static Case {
    CASES
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name:?} (--list names them)"))
}

/// The sizes `dir/meta.json` was dumped at.
fn dumped_sizes(dir: &Path) -> Sizes {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(file(dir, "meta.json")).unwrap()).unwrap();
    let s = if meta["small"].as_bool().unwrap() {
        SMALL
    } else {
        FULL
    };
    assert_eq!(
        meta["sizes"],
        sizes_json(&s),
        "meta.json's sizes differ from this binary's"
    );
    s
}

/// `--case`: loads the case, one untimed call, `rounds` timed ones; the JSON line.
fn time_case(case: &Case, threads: usize, rounds: usize, dir: &Path) -> Value {
    let s = dumped_sizes(dir);
    let start_rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|m| m.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096);
    let mut run = load(case.kind, &s, dir);
    run.call();
    let sum = checksum(&run.outputs());
    let (mut times, mut faults) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let f0 = rusage().0;
        let t0 = Instant::now();
        run.call();
        times.push(t0.elapsed().as_secs_f64());
        faults.push((rusage().0 - f0) as f64);
    }
    json!({
        "case": case.name, "impl": "ours", "form": case.form, "threads": threads, "rounds": rounds,
        "min_s": times.iter().copied().fold(f64::INFINITY, f64::min), "median_s": median(times),
        "faults_per_call": median(faults), "start_rss": start_rss, "peak_rss": rusage().1, "checksum": sum,
    })
}

/// `bench/torch/versus.py DIR --rounds 0` (PyTorch's outputs against ours)
/// when `$PYTHON` (default `python3`) has torch, transformers and TRL;
/// skipped, saying so, otherwise (CI has no Python).
fn torch_check(dir: &Path) {
    use std::process::Command;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch = Command::new(&python)
        .args(["-c", "import torch, transformers, trl"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_torch {
        println!("PyTorch comparison skipped: {python} lacks torch, transformers or trl (set PYTHON)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch/versus.py");
    let status = Command::new(&python)
        .arg(script)
        .arg(dir)
        .args(["--rounds", "0"])
        .status()
        .unwrap();
    assert!(status.success(), "PyTorch's outputs differ from ours (above)");
}

/// No subcommand (`cargo bench`, `cargo test`): the small dump into a
/// temporary directory, then every case through `--case`'s path, which
/// must read the files back to the dump's checksum, then PyTorch's
/// comparison where a Python with torch is found ([`torch_check`]).
fn self_test() {
    let dir = std::env::temp_dir().join(format!("versus_torch_selftest_{}", std::process::id()));
    dump(&dir, true);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(file(&dir, "meta.json")).unwrap()).unwrap();
    for (case, m) in CASES.iter().zip(meta["cases"].as_array().unwrap()) {
        let line = time_case(case, rayon::current_num_threads(), 1, &dir);
        assert_eq!(
            line["checksum"], m["checksum"],
            "{}: --case read back another result",
            case.name
        );
    }
    torch_check(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    println!(
        "versus_torch self-test passed ({} cases, small sizes)",
        CASES.len()
    );
}

fn main() {
    // `cargo bench` appends `--bench`; nothing else is positional but DIR.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| {
            args.get(i + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        })
    };
    let number = |flag: &str, default: usize| value(flag).map_or(default, |v| v.parse().unwrap());
    if args.iter().any(|a| a == "--list") {
        for c in CASES {
            println!("{}", c.name);
        }
    } else if let Some(dir) = value("--dump") {
        dump(Path::new(&dir), args.iter().any(|a| a == "--small"));
    } else if let Some(name) = value("--case") {
        let dir = args
            .last()
            .filter(|a| !a.starts_with("--"))
            .expect("--case NAME ... DIR");
        let threads = number("--threads", 1);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .unwrap();
        println!(
            "{}",
            time_case(find(&name), threads, number("--rounds", 5), Path::new(dir))
        );
    } else {
        self_test();
    }
}
