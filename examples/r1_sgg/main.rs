//! R1-SGG ("Compile Scene Graphs with Reinforcement Learning", Chen et al.,
//! 2025) on candle with grpo-kernels: a vision-language model learns to
//! write an image's scene graph (objects with boxes, relation triplets) as
//! JSON, by supervised fine-tuning and then GRPO with the graph rewards.
//!
//! ```text
//! cargo run --release --features candle --example r1_sgg -- demo
//! cargo run --release --features candle --example r1_sgg -- --help
//! ```
//!
//! `demo` runs everything on synthetic scenes (shapes and their spatial
//! relations; no download): SFT, evaluation, GRPO, evaluation, and writes
//! curves (SVG), a picture of predictions (PNG), checkpoints and a summary
//! to `runs/demo/`. `sft`, `grpo` and `eval` run one stage, on the synthetic
//! data or on a JSONL file of real images in R1-SGG's format
//! (`--data train.jsonl`, see `data::load_jsonl`). With `--features
//! candle-cuda` and `--device cuda` the same code trains on a GPU, and the
//! crate's ops run as CUDA kernels.

// The data, format and reward modules are a library for scene-graph RL: the
// CLI uses part of their API, their tests the rest.
#[allow(dead_code)]
mod data;
#[allow(dead_code)]
mod format;
mod model;
mod plot;
#[allow(dead_code)]
mod reward;
#[allow(dead_code)]
mod scene;
mod tokenizer;
mod train;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, Parser, Subcommand};

use data::{generate_split, load_jsonl, render_preview, Sample, Split};
use format::parse_answer;
use model::{Vlm, VlmConfig};
use plot::{line_chart, smooth, Series};
use reward::EvalSummary;
use tokenizer::Tokenizer;
use train::{evaluate, grpo, grpo_defaults, predict, sft, GrpoLog, SftConfig, SftLog, FORM};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(about = "R1-SGG: scene graphs by SFT then GRPO, on candle with grpo-kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// SFT, evaluation, GRPO, evaluation on synthetic scenes; plots and a summary.
    Demo {
        #[command(flatten)]
        common: Common,
        /// SFT steps.
        #[arg(long, default_value_t = 2400)]
        sft_steps: usize,
        /// GRPO steps.
        #[arg(long, default_value_t = 150)]
        grpo_steps: usize,
    },
    /// Supervised fine-tuning from scratch (or from --init).
    Sft {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2400)]
        steps: usize,
    },
    /// GRPO from a checkpoint (--init, usually the SFT one).
    Grpo {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 150)]
        steps: usize,
    },
    /// Failure rate, recall and mean recall of a checkpoint (--init).
    Eval {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// Output folder (checkpoints, curves, summary).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Checkpoint to start from (`*.safetensors`, with its `model.json` beside it).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Training data: a JSONL file in R1-SGG's format; synthetic scenes if absent.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Evaluation data (JSONL); the synthetic validation split if absent.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Synthetic training scenes to generate.
    #[arg(long, default_value_t = 4000)]
    train_size: usize,
    /// Images to evaluate on.
    #[arg(long, default_value_t = 128)]
    eval_size: usize,
    /// Model size: `tiny` (CPU) or `gpu`.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// `cpu`, or `cuda` (needs --features candle-cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SFT batch size.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Longest answer generated, in tokens.
    #[arg(long, default_value_t = 160)]
    max_new: usize,
}

fn main() -> AnyResult<()> {
    match Cli::parse().command {
        Command::Demo {
            common,
            sft_steps,
            grpo_steps,
        } => demo(&common, sft_steps, grpo_steps),
        Command::Sft { common, steps } => {
            let run = Run::new(&common)?;
            let log = run.sft(steps)?;
            run.save("sft")?;
            write(&common.out.join("sft_loss.svg"), &sft_chart(&log))?;
            Ok(())
        }
        Command::Grpo { common, steps } => {
            let run = Run::new(&common)?;
            let log = run.grpo(steps)?;
            run.save("grpo")?;
            write(&common.out.join("grpo_log.csv"), &grpo_csv(&log))?;
            write(&common.out.join("grpo_reward.svg"), &grpo_chart(&log))?;
            Ok(())
        }
        Command::Eval { common } => {
            let run = Run::new(&common)?;
            let (summary, _) = run.eval()?;
            println!("{}", describe(&summary));
            Ok(())
        }
    }
}

/// A model, its variables, the tokenizer and the data of one invocation.
struct Run<'a> {
    common: &'a Common,
    tok: Tokenizer,
    cfg: VlmConfig,
    vars: VarMap,
    model: Vlm,
    train: Vec<Sample>,
    eval: Vec<Sample>,
}

impl<'a> Run<'a> {
    fn new(common: &'a Common) -> AnyResult<Self> {
        let device = match common.device.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::new_cuda(0)?,
            other => return Err(format!("--device must be cpu or cuda, got {other}").into()),
        };
        let tok = Tokenizer::new(&scene::SYNTHETIC, 32);
        let cfg = match (&common.init, common.preset.as_str()) {
            (Some(ckpt), _) => model::load_config(&ckpt.with_file_name("model.json"))?,
            (None, "tiny") => VlmConfig::tiny(tok.vocab_size()),
            (None, "gpu") => VlmConfig::gpu(tok.vocab_size()),
            (None, other) => return Err(format!("--preset must be tiny or gpu, got {other}").into()),
        };
        let mut vars = VarMap::new();
        let model = Vlm::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &device))?;
        if let Some(ckpt) = &common.init {
            model::load_checkpoint(&mut vars, ckpt)?;
        }
        let size = cfg.image_size as u32;
        let t0 = Instant::now();
        let load = |path: &Option<PathBuf>, split: Split, n: usize| -> AnyResult<Vec<Sample>> {
            let samples = match path {
                Some(p) => load_jsonl(p)?,
                None => generate_split(split, n, common.seed),
            };
            Ok(samples.iter().map(|s| s.resized(size, size)).collect())
        };
        let train = load(&common.data, Split::Train, common.train_size)?;
        let eval = load(&common.eval_data, Split::Val, common.eval_size)?;
        println!(
            "model: {} parameters ({} preset), vocab {}, {}x{} images; data: {} train, {} eval ({:.1}s)",
            vars.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(),
            common.preset,
            tok.vocab_size(),
            size,
            size,
            train.len(),
            eval.len(),
            t0.elapsed().as_secs_f64()
        );
        fs::create_dir_all(&common.out)?;
        Ok(Self {
            common,
            tok,
            cfg,
            vars,
            model,
            train,
            eval,
        })
    }

    fn sft(&self, steps: usize) -> AnyResult<Vec<SftLog>> {
        let cfg = SftConfig {
            steps,
            batch: self.common.batch,
            lr: 3e-3,
            seed: self.common.seed,
        };
        Ok(sft(&self.model, &self.vars, &self.tok, &self.train, &cfg)?)
    }

    fn grpo(&self, steps: usize) -> AnyResult<Vec<GrpoLog>> {
        let mut cfg = grpo_defaults(steps, self.common.seed);
        cfg.max_new = self.common.max_new;
        Ok(grpo(&self.model, &self.vars, &self.tok, &self.train, &cfg)?)
    }

    fn eval(&self) -> AnyResult<(EvalSummary, Vec<String>)> {
        let texts = predict(&self.model, &self.tok, &self.eval, 32, self.common.max_new)?;
        Ok((evaluate(&texts, &self.eval), texts))
    }

    /// Writes `<name>.safetensors` and `model.json` into the output folder.
    fn save(&self, name: &str) -> AnyResult<()> {
        model::save_config(&self.cfg, &self.common.out.join("model.json"))?;
        model::save_checkpoint(&self.vars, &self.common.out.join(format!("{name}.safetensors")))?;
        Ok(())
    }

    /// Ground truth (top row) over predictions (bottom row) for the first
    /// `n` evaluation images.
    fn predictions_png(&self, texts: &[String], n: usize, path: &Path) -> AnyResult<()> {
        let n = n.min(self.eval.len());
        let mut tiles: Vec<Sample> = self.eval[..n].to_vec();
        for (s, text) in self.eval[..n].iter().zip(texts) {
            let graph = parse_answer(text, FORM).graph.unwrap_or_default();
            tiles.push(Sample { graph, ..s.clone() });
        }
        render_preview(&tiles, n, 3).save(path)?;
        Ok(())
    }
}

fn demo(common: &Common, sft_steps: usize, grpo_steps: usize) -> AnyResult<()> {
    let t0 = Instant::now();
    let run = Run::new(common)?;
    let out = &common.out;

    let sft_log = run.sft(sft_steps)?;
    run.save("sft")?;
    write(&out.join("sft_loss.svg"), &sft_chart(&sft_log))?;
    let (after_sft, texts) = run.eval()?;
    println!("after SFT:  {}", describe(&after_sft));
    run.predictions_png(&texts, 8, &out.join("predictions_sft.png"))?;

    let grpo_log = run.grpo(grpo_steps)?;
    run.save("grpo")?;
    write(&out.join("grpo_log.csv"), &grpo_csv(&grpo_log))?;
    write(&out.join("grpo_reward.svg"), &grpo_chart(&grpo_log))?;
    let (after_grpo, texts) = run.eval()?;
    println!("after GRPO: {}", describe(&after_grpo));
    run.predictions_png(&texts, 8, &out.join("predictions_grpo.png"))?;
    if let Some(text) = texts.first() {
        println!("\nfirst evaluation image, GRPO model's answer:\n{text}\n");
    }

    let summary = format!(
        "# R1-SGG demo ({:.1} min, {} SFT steps, {} GRPO steps)\n\n\
         | stage | failure rate | R@50 | mR@50 |\n|---|---|---|---|\n{}\n{}\n\n\
         Curves: sft_loss.svg, grpo_reward.svg. Predictions (ground truth on top): \
         predictions_sft.png, predictions_grpo.png.\n",
        t0.elapsed().as_secs_f64() / 60.0,
        sft_steps,
        grpo_steps,
        table_row("SFT", &after_sft),
        table_row("SFT + GRPO", &after_grpo),
    );
    write(&out.join("summary.md"), &summary)?;
    println!("{summary}\nwritten to {}", out.display());
    Ok(())
}

fn at_k(list: &[(usize, f64)], k: usize) -> f64 {
    list.iter().find(|(kk, _)| *kk == k).map_or(0.0, |p| p.1)
}

fn describe(s: &EvalSummary) -> String {
    format!(
        "{} images, failure rate {:.1}%, R@50 {:.1}%, mR@50 {:.1}%",
        s.images,
        100.0 * s.failure_rate,
        100.0 * at_k(&s.recall, 50),
        100.0 * at_k(&s.mean_recall, 50)
    )
}

fn table_row(stage: &str, s: &EvalSummary) -> String {
    format!(
        "| {stage} | {:.1}% | {:.1}% | {:.1}% |",
        100.0 * s.failure_rate,
        100.0 * at_k(&s.recall, 50),
        100.0 * at_k(&s.mean_recall, 50)
    )
}

fn sft_chart(log: &[SftLog]) -> String {
    let points: Vec<(f64, f64)> = log.iter().map(|l| (l.step as f64, l.loss as f64)).collect();
    line_chart(
        "SFT: cross-entropy per answer token",
        "step",
        "loss (nats)",
        &[
            Series {
                name: "loss",
                points: points.clone(),
            },
            Series {
                name: "mean of 20",
                points: smooth(&points, 20),
            },
        ],
    )
}

fn grpo_chart(log: &[GrpoLog]) -> String {
    let curve =
        |f: fn(&GrpoLog) -> f64| smooth(&log.iter().map(|l| (l.step as f64, f(l))).collect::<Vec<_>>(), 5);
    line_chart(
        "GRPO: mean reward per completion (mean of 5 steps)",
        "step",
        "reward",
        &[
            Series {
                name: "total",
                points: curve(|l| l.total),
            },
            Series {
                name: "format (1)",
                points: curve(|l| l.rewards.format),
            },
            Series {
                name: "node acc (2)",
                points: curve(|l| l.rewards.node_acc),
            },
            Series {
                name: "node box (2)",
                points: curve(|l| l.rewards.node_box),
            },
            Series {
                name: "edge (5)",
                points: curve(|l| l.rewards.edge),
            },
        ],
    )
}

/// The GRPO log as CSV, one row per step.
fn grpo_csv(log: &[GrpoLog]) -> String {
    let mut csv = String::from(
        "step,reward,format,node_acc,node_box,edge,loss,clip_low,clip_high,ratio_mean,ratio_max,tokens,mean_length,seconds\n",
    );
    for l in log {
        let (r, s) = (&l.rewards, &l.stats);
        csv += &format!(
            "{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.6},{:.4},{:.4},{:.5},{:.5},{},{:.1},{:.2}\n",
            l.step,
            l.total,
            r.format,
            r.node_acc,
            r.node_box,
            r.edge,
            s.loss,
            s.clip_frac_low,
            s.clip_frac_high,
            s.ratio_mean,
            s.ratio_max,
            s.tokens,
            l.length,
            l.seconds
        );
    }
    csv
}

fn write(path: &Path, text: &str) -> AnyResult<()> {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()).into())
}
