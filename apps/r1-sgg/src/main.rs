//! The `r1-sgg` command line: see the library's docs (`r1_sgg`).

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use r1_sgg::checkpoint::{AdamW, TrainingState};
use r1_sgg::data::{generate_split, load_jsonl, render_preview, write_dataset, Sample, Split};
use r1_sgg::format::{graph_json, parse_answer};
use r1_sgg::metrics::MetricsLog;
use r1_sgg::model::{NumberTokens, PixelStem, SeededVars, Vlm, VlmConfig};
use r1_sgg::plot::{line_chart_png, panels_png, smooth, Panel, Series};
use r1_sgg::reward::{EdgeReward, EvalSummary, RelativeGain, RewardWeights};
use r1_sgg::tokenizer::Tokenizer;
use r1_sgg::train::{
    adamw, evaluate, grpo, grpo_defaults, predict, sft, Hooks, Learner, LossVariant, SftConfig, FORM,
};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(about = "R1-SGG: scene graphs by SFT then GRPO, on candle with grpo-kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// SFT, evaluation, GRPO, evaluation on synthetic scenes; charts and a summary.
    Demo {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sft: SftArgs,
        #[command(flatten)]
        grpo: GrpoArgs,
    },
    /// Writes the synthetic dataset (train, val, test, shifted) in R1-SGG's JSONL layout.
    Data {
        /// Output folder.
        #[arg(long, default_value = "runs/data")]
        out: PathBuf,
        #[arg(long, default_value_t = 4000)]
        train_size: usize,
        /// Images in each of val, test and shifted.
        #[arg(long, default_value_t = 128)]
        eval_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Supervised fine-tuning from scratch (or from --init).
    Sft {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sft: SftArgs,
    },
    /// GRPO from a checkpoint (--init, usually the SFT one).
    Grpo {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        grpo: GrpoArgs,
    },
    /// Failure rate, recall and mean recall of a checkpoint (--init).
    Eval {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// Output folder (checkpoints, metrics, charts, summary).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Checkpoint to start from (`*.safetensors`, with its `model.json` and
    /// `tokenizer.json` beside it).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue an interrupted stage from its checkpoint in --out (weights,
    /// optimizer state and step), appending to its `<stage>.jsonl`.
    #[arg(long)]
    resume: bool,
    /// Training data: a JSONL file in R1-SGG's format; synthetic scenes if absent.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Evaluation data (JSONL); the synthetic val, test and shifted splits if absent.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Synthetic training scenes to generate.
    #[arg(long, default_value_t = 4000)]
    train_size: usize,
    /// Images to evaluate on, per split.
    #[arg(long, default_value_t = 512)]
    eval_size: usize,
    /// Model size: `tiny` (CPU) or `gpu`.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// `cpu`, or `cuda` (needs --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest answer generated, in tokens.
    #[arg(long, default_value_t = 160)]
    max_new: usize,
    /// Cosine basis functions of the box-coordinate tokens' smooth part (0: none).
    #[arg(long, default_value_t = 64)]
    number_basis: usize,
    /// Channels of a 3x3 convolution stem ahead of the patch embedding of a
    /// new model (0: none, the patches are embedded from raw RGB).
    #[arg(long, default_value_t = 0)]
    pixel_stem: usize,
    /// Write a checkpoint every this many steps (and always at the end and on Ctrl-C).
    #[arg(long, default_value_t = 200)]
    save_every: usize,
}

/// Settings of the SFT stage.
#[derive(Args)]
struct SftArgs {
    #[arg(long, default_value_t = 2400)]
    sft_steps: usize,
    /// SFT batch size.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 3e-3)]
    sft_lr: f64,
    /// Answers with objects and relations shuffled and renumbered
    /// (R1-SGG's augmentation); else in reading order (top to bottom).
    #[arg(long)]
    shuffle: bool,
    /// Train to list the objects only (the R1-SGG-Zero starting point:
    /// then `grpo --init` from this checkpoint).
    #[arg(long)]
    objects_only: bool,
}

/// `--edge-reward` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum EdgeRewardArg {
    Hard,
    Relax,
    Soft,
}

impl From<EdgeRewardArg> for EdgeReward {
    fn from(arg: EdgeRewardArg) -> Self {
        match arg {
            EdgeRewardArg::Hard => EdgeReward::HardRecall,
            EdgeRewardArg::Relax => EdgeReward::HardRelax,
            EdgeRewardArg::Soft => EdgeReward::Soft,
        }
    }
}

/// `format,node,edge` weights, each finite and `>= 0`.
fn parse_weights(text: &str) -> Result<RewardWeights, String> {
    let values: Vec<f64> = text
        .split(',')
        .map(|v| v.trim().parse::<f64>().map_err(|e| format!("{v:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match values[..] {
        [format, node, edge] if values.iter().all(|w| w.is_finite() && *w >= 0.0) => {
            Ok(RewardWeights { format, node, edge })
        }
        _ => Err(format!(
            "expected three weights >= 0 as format,node,edge, got {text:?}"
        )),
    }
}

/// Settings of the GRPO stage.
#[derive(Args)]
struct GrpoArgs {
    #[arg(long, default_value_t = 150)]
    grpo_steps: usize,
    /// Loss normalization: GRPO, BNPO, Dr. GRPO or DAPO.
    #[arg(long, value_enum, default_value = "grpo")]
    loss: LossVariant,
    /// Optimizer steps per batch of completions (mu).
    #[arg(long, default_value_t = 1)]
    inner_steps: usize,
    /// KL coefficient to the starting model (k3 estimator). R1-SGG uses 0;
    /// the example uses 0.04 (TRL's former default): without it the tiny
    /// model's GRPO drifts to shorter answers with fewer objects, and loses
    /// recall.
    #[arg(long, default_value_t = 0.04)]
    beta: f32,
    /// Completions per image (G).
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Images per GRPO step.
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Peak GRPO learning rate (after a warmup over 10% of the steps).
    #[arg(long, default_value_t = 1e-4)]
    grpo_lr: f64,
    /// Sampling temperature of the completions. R1-SGG samples at 1.0; the
    /// tiny model's flatter distributions fail the format check in most samples
    /// there, so the example samples at 0.6.
    #[arg(long, default_value_t = 0.6)]
    temperature: f32,
    /// Edge reward: hard recall, hard + relaxed labels, or soft (R1-SGG: hard).
    #[arg(long, value_enum, default_value = "hard")]
    edge_reward: EdgeRewardArg,
    /// Reward weights `format,node,edge` (0 turns one off). R1-SGG weighs
    /// 1,2,5; the tiny model's commonest fault is an id copied wrong into a
    /// relation (an invalid answer, the relation lost), so the example
    /// weighs the format 3.
    #[arg(long, value_parser = parse_weights, default_value = "3,2,5")]
    reward_weights: RewardWeights,
    /// Leave the box-coordinate tokens out of the policy loss: the rewards
    /// then steer only which objects and relations are written and how ids
    /// are copied, and the boxes stay where SFT put them. By default they
    /// are trained, as in R1-SGG: with the KL penalty (`--beta`) this
    /// locates more of the tiny model's objects instead of blurring them.
    #[arg(long)]
    freeze_box_tokens: bool,
    /// Evaluate on (up to 256) validation images every this many GRPO steps (0: never).
    #[arg(long, default_value_t = 25)]
    eval_every: usize,
}

fn main() -> AnyResult<()> {
    r1_sgg::checkpoint::install_interrupt_handler()?;
    match Cli::parse().command {
        Command::Demo { common, sft, grpo } => demo(&common, &sft, &grpo),
        Command::Data {
            out,
            train_size,
            eval_size,
            seed,
        } => {
            let sizes = [
                (Split::Train, train_size),
                (Split::Val, eval_size),
                (Split::Test, eval_size),
                (Split::Shifted, eval_size),
            ];
            for path in write_dataset(&out, &sizes, seed)? {
                println!("wrote {}", path.display());
            }
            println!("layout and statistics: {}", out.join("README.md").display());
            Ok(())
        }
        Command::Sft { common, sft } => {
            let mut run = Run::new(&common)?;
            run.sft(&sft)?;
            Ok(())
        }
        Command::Grpo { common, grpo } => {
            let mut run = Run::new(&common)?;
            run.grpo(&grpo)?;
            Ok(())
        }
        Command::Eval { common } => {
            let run = Run::new(&common)?;
            let results = run.eval_all("eval")?;
            println!("{}", eval_table(&[("checkpoint", &results)]));
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
    /// Named evaluation sets: val, test, shifted (or the --eval-data file).
    eval: Vec<(String, Vec<Sample>)>,
}

impl<'a> Run<'a> {
    fn new(common: &'a Common) -> AnyResult<Self> {
        let device = match common.device.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::new_cuda(0)?,
            other => return Err(format!("--device must be cpu or cuda, got {other}").into()),
        };
        let (tok, cfg) = match &common.init {
            Some(ckpt) => {
                let folder = ckpt.parent().unwrap_or(Path::new("."));
                let tok_file = folder.join("tokenizer.json");
                let tok = if tok_file.is_file() {
                    Tokenizer::from_file(&tok_file)?
                } else {
                    Tokenizer::new(&r1_sgg::scene::SYNTHETIC, 32)
                };
                (tok, r1_sgg::model::load_config(&folder.join("model.json"))?)
            }
            None => {
                let tok = Tokenizer::new(&r1_sgg::scene::SYNTHETIC, 32);
                let cfg = match common.preset.as_str() {
                    "tiny" => VlmConfig::tiny(tok.vocab_size()),
                    "gpu" => VlmConfig::gpu(tok.vocab_size()),
                    other => return Err(format!("--preset must be tiny or gpu, got {other}").into()),
                };
                let numbers = number_tokens(&tok, common.number_basis);
                let stem = (common.pixel_stem > 0).then_some(PixelStem {
                    channels: common.pixel_stem,
                    kernel: 3,
                });
                (tok, VlmConfig { numbers, stem, ..cfg })
            }
        };
        if cfg.vocab_size != tok.vocab_size() {
            return Err(format!(
                "model vocabulary {} does not match the tokenizer's {}",
                cfg.vocab_size,
                tok.vocab_size()
            )
            .into());
        }
        let mut vars = VarMap::new();
        let model = Vlm::new(&cfg, SeededVars::builder(&vars, common.seed, &device))?;
        if let Some(ckpt) = &common.init {
            r1_sgg::checkpoint::load(ckpt, &mut vars, None)?;
        }
        let size = cfg.image_size as u32;
        let t0 = Instant::now();
        let resize = |samples: Vec<Sample>| samples.iter().map(|s| s.resized(size, size)).collect();
        let train: Vec<Sample> = match &common.data {
            Some(p) => resize(load_jsonl(p)?),
            None => resize(generate_split(Split::Train, common.train_size, common.seed)),
        };
        let eval: Vec<(String, Vec<Sample>)> = match &common.eval_data {
            Some(p) => vec![(p.display().to_string(), resize(load_jsonl(p)?))],
            None => [Split::Val, Split::Test, Split::Shifted]
                .into_iter()
                .map(|s| {
                    (
                        s.name().to_string(),
                        resize(generate_split(s, common.eval_size, common.seed)),
                    )
                })
                .collect(),
        };
        println!(
            "model: {} parameters ({} preset), vocab {}, {}x{} images; data: {} train, {} eval ({:.1}s)",
            vars.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(),
            common.preset,
            tok.vocab_size(),
            size,
            size,
            train.len(),
            eval.iter()
                .map(|(name, s)| format!("{} {name}", s.len()))
                .collect::<Vec<_>>()
                .join(" + "),
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

    fn path(&self, name: &str) -> PathBuf {
        self.common.out.join(name)
    }

    /// The stage's optimizer and first step: fresh, or restored from
    /// `<out>/<stage>.safetensors` with --resume.
    fn start(&mut self, stage: &str, lr: f64) -> AnyResult<(AdamW, usize, MetricsLog)> {
        let mut opt = adamw(&self.vars, lr)?;
        let ckpt = self.path(&format!("{stage}.safetensors"));
        let metrics_path = self.path(&format!("{stage}.jsonl"));
        if self.common.resume && ckpt.is_file() {
            let state = r1_sgg::checkpoint::load(&ckpt, &mut self.vars, Some(&mut opt))?;
            if state.stage != stage {
                return Err(format!("{}: a {} checkpoint, not {stage}", ckpt.display(), state.stage).into());
            }
            println!("resuming {stage} at step {} from {}", state.step, ckpt.display());
            return Ok((opt, state.step, MetricsLog::append(&metrics_path)?));
        }
        Ok((opt, 0, MetricsLog::create(&metrics_path)?))
    }

    /// Writes `<stage>.safetensors` (weights, optimizer, next step),
    /// `model.json` and `tokenizer.json` into the output folder.
    fn save(&self, stage: &str, next_step: usize, opt: &AdamW) -> AnyResult<()> {
        r1_sgg::model::save_config(&self.cfg, &self.path("model.json"))?;
        self.tok.save(&self.path("tokenizer.json"))?;
        let state = TrainingState {
            stage: stage.to_string(),
            step: next_step,
            seed: self.common.seed,
            extra: Default::default(),
        };
        r1_sgg::checkpoint::save(
            &self.path(&format!("{stage}.safetensors")),
            &self.vars,
            Some(opt),
            &state,
        )?;
        Ok(())
    }

    /// Runs (or resumes) SFT; false if interrupted.
    fn sft(&mut self, args: &SftArgs) -> AnyResult<bool> {
        let cfg = SftConfig {
            steps: args.sft_steps,
            batch: args.batch,
            lr: args.sft_lr,
            seed: self.common.seed,
            shuffle: args.shuffle,
            objects_only: args.objects_only,
        };
        let (mut opt, start, metrics) = self.start("sft", cfg.lr)?;
        let mut hooks = Recorder::new(self, metrics, cfg.steps, 0);
        sft(self.learner(), &cfg, &mut opt, start, &mut hooks)?;
        let done = hooks.finish("sft", &opt)?;
        sft_chart(&self.path("sft.jsonl"), &self.path("sft.png"))?;
        Ok(done)
    }

    /// Runs (or resumes) GRPO; false if interrupted.
    fn grpo(&mut self, args: &GrpoArgs) -> AnyResult<bool> {
        let mut cfg = grpo_defaults(args.grpo_steps, self.common.seed);
        cfg.max_new = self.common.max_new;
        cfg.inner_steps = args.inner_steps;
        cfg.group = args.group;
        cfg.prompts = args.prompts;
        cfg.lr = args.grpo_lr;
        cfg.loss.beta = args.beta;
        cfg.sampling.temperature = args.temperature;
        cfg.rewards.edge = args.edge_reward.into();
        cfg.rewards.weights = args.reward_weights;
        if args.freeze_box_tokens {
            let numbers = number_tokens(&self.tok, 1)
                .ok_or("--freeze-box-tokens: the tokenizer has no run of box-coordinate tokens 0..=1000")?;
            cfg.masked_tokens = Some(numbers.first as u32..(numbers.first + numbers.count) as u32);
        }
        let cfg = cfg.with_variant(args.loss);
        let (mut opt, start, metrics) = self.start("grpo", cfg.lr)?;
        let mut hooks = Recorder::new(self, metrics, cfg.steps, args.eval_every);
        if start == 0 && args.eval_every > 0 {
            hooks.eval_val(0)?;
        }
        grpo(self.learner(), &cfg, &mut opt, start, &mut hooks)?;
        let done = hooks.finish("grpo", &opt)?;
        grpo_chart(&self.path("grpo.jsonl"), &self.path("grpo.png"))?;
        Ok(done)
    }

    fn learner(&self) -> Learner<'_> {
        Learner {
            model: &self.model,
            vars: &self.vars,
            tok: &self.tok,
            train: &self.train,
        }
    }

    /// Greedy predictions on `samples`.
    fn predict(&self, samples: &[Sample]) -> AnyResult<Vec<String>> {
        Ok(predict(&self.model, &self.tok, samples, 32, self.common.max_new)?)
    }

    /// Evaluates on every evaluation set, logs the results as `stage`, writes
    /// every prediction beside its ground truth
    /// (`predictions_<stage>_<split>.jsonl`; a file given by `--eval-data`
    /// names the split by its stem), and draws the first images'
    /// predictions (`predictions_<stage>.png`).
    fn eval_all(&self, stage: &str) -> AnyResult<Vec<(String, EvalSummary)>> {
        let mut metrics = MetricsLog::append(&self.path("eval.jsonl"))?;
        let mut results = Vec::new();
        for (name, samples) in &self.eval {
            let texts = self.predict(samples)?;
            let summary = evaluate(&texts, samples);
            println!("{stage} on {name}: {}", describe(&summary));
            metrics.write(&eval_record(stage, None, name, &summary))?;
            // A split read with --eval-data is named by its path: the file takes its stem.
            let label = Path::new(name)
                .file_stem()
                .map_or(name.into(), |s| s.to_string_lossy());
            let mut predictions =
                MetricsLog::create(&self.path(&format!("predictions_{stage}_{label}.jsonl")))?;
            for (s, text) in samples.iter().zip(&texts) {
                predictions
                    .write(&json!({"id": s.id, "prediction": text, "ground_truth": graph_json(&s.graph)}))?;
            }
            if results.is_empty() {
                self.predictions_png(
                    samples,
                    &texts,
                    8,
                    &self.path(&format!("predictions_{stage}.png")),
                )?;
            }
            results.push((name.clone(), summary));
        }
        Ok(results)
    }

    /// Ground truth (top row) over predictions (bottom row) for the first
    /// `n` images.
    fn predictions_png(&self, samples: &[Sample], texts: &[String], n: usize, path: &Path) -> AnyResult<()> {
        let n = n.min(samples.len());
        let mut tiles: Vec<Sample> = samples[..n].to_vec();
        for (s, text) in samples[..n].iter().zip(texts) {
            let graph = parse_answer(text, FORM).graph.unwrap_or_default();
            tiles.push(Sample { graph, ..s.clone() });
        }
        render_preview(&tiles, n, 3).save(path)?;
        Ok(())
    }
}

/// The training loops' hooks for the CLI: every step's record to
/// `<stage>.jsonl` (periodic validation lines too), a checkpoint every `--save-every` steps and on Ctrl-C
/// (which stops the loop), a validation check every `eval_every` steps, and
/// a line of progress every 5% when stderr is not a terminal (where the
/// progress bar does not draw).
struct Recorder<'r, 'a> {
    run: &'r Run<'a>,
    metrics: MetricsLog,
    steps: usize,
    eval_every: usize,
    interrupted_at: Option<usize>,
    plain: bool,
}

impl<'r, 'a> Recorder<'r, 'a> {
    fn new(run: &'r Run<'a>, metrics: MetricsLog, steps: usize, eval_every: usize) -> Self {
        Self {
            run,
            metrics,
            steps,
            eval_every,
            interrupted_at: None,
            plain: !std::io::stderr().is_terminal(),
        }
    }

    /// Failure rate and recall on the first 256 validation images, logged as
    /// `grpo` evaluation at `step`.
    fn eval_val(&mut self, step: usize) -> AnyResult<()> {
        let (name, samples) = &self.run.eval[0];
        let samples = &samples[..samples.len().min(256)];
        let summary = evaluate(&self.run.predict(samples)?, samples);
        self.metrics
            .write(&eval_record("grpo", Some(step), name, &summary))?;
        Ok(())
    }

    /// Saves the stage's final (or interrupted) checkpoint; true if it ran to the end.
    fn finish(&mut self, stage: &str, opt: &AdamW) -> AnyResult<bool> {
        let next = self.interrupted_at.map_or(self.steps, |s| s + 1);
        self.run.save(stage, next, opt)?;
        let ckpt = self.run.path(&format!("{stage}.safetensors"));
        match self.interrupted_at {
            Some(step) => {
                println!(
                    "interrupted after {stage} step {step}: checkpoint {}; continue with --resume",
                    ckpt.display()
                );
                Ok(false)
            }
            None => Ok(true),
        }
    }
}

impl Hooks for Recorder<'_, '_> {
    fn after_step(
        &mut self,
        stage: &str,
        step: usize,
        record: Value,
        opt: &AdamW,
    ) -> candle_core::Result<bool> {
        let wrap = |e: Box<dyn std::error::Error>| candle_core::Error::Msg(e.to_string());
        let mut line = json!({ "stage": stage, "step": step });
        if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), &record) {
            line.extend(fields.clone());
        }
        self.metrics.write(&line)?;
        if self.plain && (step + 1) % (self.steps / 20).max(1) == 0 {
            println!("{stage} step {}/{}: {record}", step + 1, self.steps);
        }
        if self.eval_every > 0 && (step + 1) % self.eval_every == 0 {
            self.eval_val(step + 1).map_err(wrap)?;
        }
        if r1_sgg::checkpoint::interrupted() {
            self.interrupted_at = Some(step);
            return Ok(false);
        }
        if self.run.common.save_every > 0
            && (step + 1) % self.run.common.save_every == 0
            && step + 1 < self.steps
        {
            self.run.save(stage, step + 1, opt).map_err(wrap)?;
        }
        Ok(true)
    }
}

/// The box-coordinate tokens of `tok` (ids of "0" to "1000", contiguous),
/// or `None` when `basis` is 0 or the vocabulary has no such run.
fn number_tokens(tok: &Tokenizer, basis: usize) -> Option<NumberTokens> {
    let first = *tok.encode("0").first()?;
    let contiguous = (0..=1000u32).all(|n| tok.encode(&n.to_string()) == [first + n]);
    (basis > 0 && contiguous).then_some(NumberTokens {
        first: first as usize,
        count: 1001,
        basis,
    })
}

fn demo(common: &Common, sft_args: &SftArgs, grpo_args: &GrpoArgs) -> AnyResult<()> {
    let t0 = Instant::now();
    let mut run = Run::new(common)?;
    if !common.resume {
        // A fresh demo: earlier evaluations in this folder are stale.
        let _ = fs::remove_file(run.path("eval.jsonl"));
    }
    if common.resume && run.path("grpo.safetensors").is_file() {
        // GRPO started, so SFT finished: its weights are the SFT baseline.
        r1_sgg::checkpoint::load(&run.path("sft.safetensors"), &mut run.vars, None)?;
    } else if !run.sft(sft_args)? {
        return Ok(());
    }
    let after_sft = run.eval_all("sft")?;
    if !run.grpo(grpo_args)? {
        return Ok(());
    }
    let after_grpo = run.eval_all("grpo")?;
    if let Some(text) = run.predict(&run.eval[0].1[..1])?.first() {
        println!("\nfirst validation image, GRPO model's answer:\n{text}\n");
    }
    let summary = format!(
        "# R1-SGG demo ({:.1} min, {} SFT steps, {} GRPO steps, seed {})\n\n{}\n{}\n\
         Charts: sft.png, grpo.png. Predictions (ground truth on top): \
         predictions_sft.png, predictions_grpo.png. Every step: sft.jsonl, grpo.jsonl; \
         evaluations: eval.jsonl.\n",
        t0.elapsed().as_secs_f64() / 60.0,
        sft_args.sft_steps,
        grpo_args.grpo_steps,
        common.seed,
        eval_table(&[("SFT", &after_sft), ("SFT + GRPO", &after_grpo)]),
        recall_gains(&after_sft, &after_grpo, 50),
    );
    write(&run.path("summary.md"), &summary)?;
    println!("{summary}\nwritten to {}", common.out.display());
    Ok(())
}

/// The entry for `k` of a per-K list of an [`EvalSummary`].
fn entry_at<T>(list: &[(usize, T)], k: usize) -> Option<&T> {
    list.iter().find(|(kk, _)| *kk == k).map(|(_, v)| v)
}

fn at_k(list: &[(usize, f64)], k: usize) -> f64 {
    entry_at(list, k).copied().unwrap_or(0.0)
}

fn describe(s: &EvalSummary) -> String {
    format!(
        "{} images, failure rate {:.1}%, invalid {:.1}%, R@50 {:.1}%, mR@50 {:.1}%, objects found {:.1}%, pairs found {:.1}%",
        s.images,
        100.0 * s.failure_rate,
        100.0 * s.invalid_rate,
        100.0 * at_k(&s.recall, 50),
        100.0 * at_k(&s.mean_recall, 50),
        100.0 * s.object_recall,
        100.0 * s.pair_recall,
    )
}

/// One metrics line for an evaluation.
fn eval_record(stage: &str, step: Option<usize>, split: &str, s: &EvalSummary) -> Value {
    let mut record = json!({
        "stage": stage,
        "eval": split,
        "images": s.images,
        "failure_rate": s.failure_rate,
        "invalid_rate": s.invalid_rate,
        "object_recall": s.object_recall,
        "pair_recall": s.pair_recall,
    });
    if let Some(fields) = record.as_object_mut() {
        if let Some(step) = step {
            fields.insert("step".into(), json!(step));
        }
        for (k, r) in &s.recall {
            fields.insert(format!("R@{k}"), json!(r));
        }
        for (k, r) in &s.mean_recall {
            fields.insert(format!("mR@{k}"), json!(r));
        }
    }
    record
}

/// A markdown table: one row per (stage, split).
fn eval_table(stages: &[(&str, &Vec<(String, EvalSummary)>)]) -> String {
    let mut table = String::from(
        "| stage | split | failure rate | invalid | R@20 | R@50 | R@100 | mR@20 | mR@50 | mR@100 | objects found | pairs found |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    for (stage, results) in stages {
        for (split, s) in results.iter() {
            table += &format!(
                "| {stage} | {split} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                pct(s.failure_rate),
                pct(s.invalid_rate),
                pct(at_k(&s.recall, 20)),
                pct(at_k(&s.recall, 50)),
                pct(at_k(&s.recall, 100)),
                pct(at_k(&s.mean_recall, 20)),
                pct(at_k(&s.mean_recall, 50)),
                pct(at_k(&s.mean_recall, 100)),
                pct(s.object_recall),
                pct(s.pair_recall),
            );
        }
    }
    table
}

/// GRPO's relative change of R@`k` over SFT on each split, compared image
/// by image, with its 95% interval ([`RelativeGain::paired`]): on a few
/// hundred images a recall of a few percent moves by tens of percent
/// between runs, and the interval says how much of a gain that covers.
fn recall_gains(sft: &[(String, EvalSummary)], grpo: &[(String, EvalSummary)], k: usize) -> String {
    let mut text = format!("GRPO against SFT, R@{k} on the same images (relative change, 95% interval):\n\n");
    for ((split, before), (_, after)) in sft.iter().zip(grpo) {
        let (b, a) = (100.0 * at_k(&before.recall, k), 100.0 * at_k(&after.recall, k));
        text += &match RelativeGain::paired(
            entry_at(&before.image_recall, k).map_or(&[], Vec::as_slice),
            entry_at(&after.image_recall, k).map_or(&[], Vec::as_slice),
        ) {
            Some(g) => format!(
                "- {split}: {b:.1}% -> {a:.1}%, {:+.0}% ({:+.0}% to {:+.0}%)\n",
                100.0 * g.gain,
                100.0 * (g.gain - g.half_width),
                100.0 * (g.gain + g.half_width),
            ),
            None => format!("- {split}: {b:.1}% -> {a:.1}% (no relative change: SFT recalls nothing)\n"),
        };
    }
    text
}

/// `(step, field)` of the metrics lines of `stage` that have `field`
/// (training lines, or evaluation lines when `eval` names a split).
fn curve(lines: &[Value], stage: &str, eval: Option<&str>, field: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter(|l| l["stage"] == stage && l.get("eval").and_then(Value::as_str) == eval)
        .filter_map(|l| Some((l["step"].as_f64()?, l.get(field)?.as_f64()?)))
        .collect()
}

/// The SFT loss over steps, from sft.jsonl.
fn sft_chart(metrics: &Path, png: &Path) -> AnyResult<()> {
    let lines: Vec<Value> = MetricsLog::read(metrics)?;
    let loss = curve(&lines, "sft", None, "loss");
    let smoothed = smooth(&loss, 20);
    line_chart_png(
        png,
        "SFT: cross-entropy per answer token",
        "step",
        "loss (nats)",
        &[
            Series {
                name: "loss",
                points: loss,
            },
            Series {
                name: "mean of 20",
                points: smoothed,
            },
        ],
    )
}

/// GRPO over steps, from grpo.jsonl: rewards, validation failure rate
/// and recall, completion length and clipping.
fn grpo_chart(metrics: &Path, png: &Path) -> AnyResult<()> {
    let lines: Vec<Value> = MetricsLog::read(metrics)?;
    let train = |field| smooth(&curve(&lines, "grpo", None, field), 5);
    // The periodic validation lines are the GRPO evaluation lines with a step.
    let val = lines
        .iter()
        .find(|l| l["stage"] == "grpo" && l.get("step").is_some())
        .and_then(|l| l.get("eval")?.as_str())
        .unwrap_or("val");
    let eval = |field| curve(&lines, "grpo", Some(val), field);
    let pct = |points: Vec<(f64, f64)>| points.into_iter().map(|(x, y)| (x, 100.0 * y)).collect();
    let panels = [
        Panel {
            title: "reward per completion, weighted (mean of 5 steps)",
            x_label: "step",
            y_label: "reward",
            series: vec![
                Series {
                    name: "total",
                    points: train("reward"),
                },
                Series {
                    name: "format",
                    points: train("format"),
                },
                Series {
                    name: "node acc",
                    points: train("node_acc"),
                },
                Series {
                    name: "node box",
                    points: train("node_box"),
                },
                Series {
                    name: "edge",
                    points: train("edge"),
                },
            ],
        },
        Panel {
            title: "validation (greedy, up to 256 images)",
            x_label: "step",
            y_label: "%",
            series: vec![
                Series {
                    name: "failure rate",
                    points: pct(eval("failure_rate")),
                },
                Series {
                    name: "invalid (e.g. undefined object)",
                    points: pct(eval("invalid_rate")),
                },
                Series {
                    name: "R@50",
                    points: pct(eval("R@50")),
                },
                Series {
                    name: "mR@50",
                    points: pct(eval("mR@50")),
                },
            ],
        },
        Panel {
            title: "completion length (mean of 5 steps)",
            x_label: "step",
            y_label: "tokens",
            series: vec![Series {
                name: "mean length",
                points: train("length"),
            }],
        },
        Panel {
            title: "clipped tokens (mean of 5 steps)",
            x_label: "step",
            y_label: "fraction",
            series: vec![
                Series {
                    name: "low",
                    points: train("clip_low"),
                },
                Series {
                    name: "high",
                    points: train("clip_high"),
                },
            ],
        },
    ];
    panels_png(png, "GRPO", &panels)
}

fn write(path: &Path, text: &str) -> AnyResult<()> {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_weights_parse_or_name_the_problem() {
        let w = parse_weights("1, 2,5").unwrap();
        assert_eq!((w.format, w.node, w.edge), (1.0, 2.0, 5.0));
        assert_eq!(parse_weights("0,0,1").unwrap().edge, 1.0);
        for bad in ["1,2", "1,2,3,4", "-1,2,5", "a,2,5", "nan,1,1", "inf,1,1", ""] {
            assert!(parse_weights(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn number_tokens_are_found_in_the_answer_tokenizer() {
        let tok = Tokenizer::new(&r1_sgg::scene::SYNTHETIC, 32);
        let numbers = number_tokens(&tok, 64).unwrap();
        assert_eq!(numbers.count, 1001);
        assert_eq!(tok.encode("1000"), [numbers.first as u32 + 1000]);
        assert!(number_tokens(&tok, 0).is_none());
    }

    #[test]
    fn curves_pick_their_stage_and_split() {
        let lines = vec![
            json!({"stage": "grpo", "step": 0, "reward": 1.0}),
            json!({"stage": "grpo", "step": 0, "eval": "val", "R@50": 0.25}),
            json!({"stage": "sft", "step": 0, "loss": 3.0}),
            json!({"stage": "grpo", "step": 1, "reward": 2.0}),
        ];
        assert_eq!(curve(&lines, "grpo", None, "reward"), [(0.0, 1.0), (1.0, 2.0)]);
        assert_eq!(curve(&lines, "grpo", Some("val"), "R@50"), [(0.0, 0.25)]);
        assert!(curve(&lines, "grpo", Some("test"), "R@50").is_empty());
    }
}
