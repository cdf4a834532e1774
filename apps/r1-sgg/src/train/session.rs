//! One invocation of the command line: the model (the demo's, or a Hugging
//! Face Qwen2-VL with `--model`), the data, the stages it runs, and the
//! hooks that record metrics, save checkpoints and stop on Ctrl-C.
//!
//! **Defaults by model.** A flag left unset takes the demo's value for the
//! demo's model and R1-SGG's for a Hugging Face one (`--model`): learning rates,
//! schedules, batch sizes, accumulation, gradient clipping, loss, KL,
//! temperature, reward weights, completion length, image size and prompts
//! (each flag's help names both).
//!
//! **Data.** `--data` is streamed ([`TrainSet`]): epochs of a seeded
//! order, read on demand with bounded memory, its position saved in each
//! checkpoint so `--resume` continues the same order. Without `--data` the
//! demo's synthetic set is generated in memory and drawn as it always was
//! (independent uniform picks). Evaluation sets (`--eval-data`, or the
//! synthetic val, test and shifted splits) are small and loaded whole.
//!
//! **Checkpoints.** The demo's model: `<out>/<stage>.safetensors`
//! (weights, optimizer, step) with `model.json` and `tokenizer.json`. A
//! Qwen2-VL: `<out>/<stage>/`, a Hugging Face model directory (loads in
//! transformers as it is) holding `trainer_state.safetensors` (AdamW's
//! moments, master weights, step; [`checkpoint`]'s layout without weights),
//! written in one atomic swap with the model files.

use std::collections::HashSet;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_nn::VarMap;
use serde_json::{json, Value};

use super::checkpoint::{self, TrainingState};
use super::grpo::{grpo, grpo_defaults, LossVariant};
use super::optim::AdamW;
use super::policy::{Policy, QwenOptions, QwenPolicy, TinyPolicy, TRAINER_STATE};
use super::sft::{sft, Augment, SftConfig};
use super::{adamw, Hooks, Learner, Schedule, MAX_GRAD_NORM};
use crate::cli::{AugmentArg, Common, GrpoArgs, LabelSimilarityArg, Preset, PromptArg, SftArgs};
use crate::data::format::{graph_json, parse_answer, BoxRounding};
use crate::data::preview::render_preview;
use crate::data::prompt::{PromptStyle, SystemPrompt};
use crate::data::scene::{add_labels, covering_labels, Vocabulary};
use crate::data::source::{load_samples, DataSource};
use crate::data::stream::{Order, TrainSet, POSITION_KEY};
use crate::data::synthetic::{generate_split, Split};
use crate::data::{BadRows, Sample};
use crate::eval::r1_sgg::records::{evaluate_records, write_records, Record};
use crate::eval::r1_sgg::Dataset;
use crate::eval::{evaluate, predict, EvalSummary};
use crate::model::qwen2_vl::Checkpointing;
use crate::model::tiny_tokenizer::Tokenizer;
use crate::model::{NumberTokens, PixelStem, SeededVars, Vlm, VlmConfig};
use crate::report::metrics::MetricsLog;
use crate::report::summary::{describe, describe_r1_sgg, eval_record, grpo_chart, r1_sgg_record, sft_chart};
use crate::reward::{RewardWeights, SpacyTable};

/// Which command a [`Run`] serves (R1-SGG's prompts and image sizes differ by stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// SFT, evaluation, GRPO, evaluation (the demo's model only).
    Demo,
    Sft,
    Grpo,
    Eval,
}

/// The model of a run.
pub(crate) enum Model {
    /// The demo's.
    Tiny(Box<TinyPolicy>),
    /// A Hugging Face Qwen2-VL (`--model`).
    Qwen(Box<QwenPolicy>),
}

/// A model and the data of one invocation.
pub struct Run<'a> {
    pub(crate) common: &'a Common,
    pub(crate) model: Model,
    /// Streamed from --data, or the synthetic set in memory.
    pub(crate) train: TrainSet,
    /// Named evaluation sets, in memory: val, test, shifted (or the --eval-data file).
    pub(crate) eval: Vec<(String, Vec<Sample>)>,
    /// The data's vocabulary (--vocabulary).
    pub(crate) vocab: Vocabulary,
    pub(crate) stage: Stage,
}

/// Samples read from `path` (given by `flag`: a JSONL file, a parquet
/// shard, a folder or glob of shards; see [`DataSource`]), each passed
/// through `fit` as it is read (the demo's model resizes them there, so a
/// parquet set's full-size images are never all in memory). Malformed
/// records fail the run, or with `--skip-bad-rows` are skipped and counted.
/// An error names the flag and file when they hold no samples: a training
/// loop cannot draw from nothing.
pub(crate) fn load_samples_from(
    path: &Path,
    flag: &str,
    skip_bad_rows: bool,
    fit: impl FnMut(Sample) -> Sample,
) -> Result<Vec<Sample>> {
    let bad_rows = if skip_bad_rows {
        BadRows::Skip
    } else {
        BadRows::Fail
    };
    let (samples, skipped) = load_samples(&DataSource::resolve(path)?, bad_rows, fit)?;
    if let Some(first) = &skipped.first {
        println!(
            "{flag}: skipped {} malformed records; the first: {first}",
            skipped.count
        );
    }
    if samples.is_empty() {
        bail!("{flag} {}: the file holds no samples", path.display());
    }
    Ok(samples)
}

impl<'a> Run<'a> {
    pub(crate) fn new(common: &'a Common, stage: Stage) -> Result<Self> {
        let device = common.device.device()?;
        let real = common.hf.model.is_some();
        if real && common.init.is_some() {
            bail!("--init loads the demo's model; with --model, point --model at the checkpoint directory");
        }
        let t0 = Instant::now();
        // The demo's model reads images at its own size; Qwen2-VL's processor resizes them.
        let tiny_size = (!real).then(|| tiny_model(common)).transpose()?;
        let side = tiny_size.as_ref().map(|(_, cfg)| cfg.image_size as u32);
        let fit = |s: Sample| match side {
            Some(size) => s.resized(size, size),
            None => s,
        };
        let resize = |samples: Vec<Sample>| samples.into_iter().map(fit).collect();
        let load = |path: &Path, flag: &str| load_samples_from(path, flag, common.skip_bad_rows, fit);
        let train = match &common.data {
            Some(p) => {
                let bad_rows = if common.skip_bad_rows {
                    BadRows::Skip
                } else {
                    BadRows::Fail
                };
                let order = Order::Epochs {
                    seed: common.seed,
                    window: common.shuffle_window,
                };
                let set = TrainSet::open(&DataSource::resolve(p)?, bad_rows, order, side)
                    .with_context(|| format!("--data {}", p.display()))?;
                if set.is_empty() {
                    bail!("--data {}: the file holds no samples", p.display());
                }
                set
            }
            None => TrainSet::in_memory(resize(generate_split(
                Split::Train,
                common.train_size,
                common.seed,
            ))),
        };
        let eval: Vec<(String, Vec<Sample>)> = match &common.eval_data {
            Some(p) => vec![(p.display().to_string(), load(p, "--eval-data")?)],
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
        let data_seconds = t0.elapsed().as_secs_f64();
        let vocab = match common.vocabulary.named() {
            Some(vocab) => vocab,
            None => {
                // The data files' labels decide; without any, the data is
                // synthetic. A streamed set's labels are read without images.
                let mut labels = HashSet::new();
                if common.data.is_some() {
                    train.labels(&mut labels);
                }
                if common.eval_data.is_some() {
                    for s in eval.iter().flat_map(|(_, s)| s) {
                        add_labels(&s.graph, &mut labels);
                    }
                }
                let (vocab, share) = covering_labels(&labels);
                println!(
                    "vocabulary: {} ({:.1}% of the data's labels; --vocabulary to choose)",
                    vocab.name,
                    100.0 * share
                );
                vocab
            }
        };
        let model = match (tiny_size, &common.hf.model) {
            (Some((tok, cfg)), None) => {
                let mut vars = VarMap::new();
                let model = Vlm::new(&cfg, SeededVars::builder(&vars, common.seed, &device))?;
                if let Some(ckpt) = &common.init {
                    checkpoint::load(ckpt, &mut vars, None)?;
                }
                Model::Tiny(Box::new(TinyPolicy {
                    cfg,
                    vars,
                    model,
                    tok,
                    // R1-SGG's files are read as its SFT target writes them.
                    rounding: match common.data {
                        Some(_) => BoxRounding::Truncate,
                        None => BoxRounding::Nearest,
                    },
                }))
            }
            (_, Some(dir)) => {
                let hf = &common.hf;
                let options = QwenOptions {
                    dtype: hf.dtype.into(),
                    prompt: PromptStyle {
                        system: hf.system_prompt.unwrap_or(match stage {
                            Stage::Grpo => SystemPrompt::Think,
                            _ => SystemPrompt::Plain,
                        }),
                        vocabulary: (hf.prompt == PromptArg::Closed).then_some(vocab),
                    },
                    max_pixels: Some(hf.max_pixels.unwrap_or(match stage {
                        Stage::Grpo => 512 * 28 * 28,
                        _ => 1024 * 28 * 28,
                    })),
                    freeze_vision: hf.freeze_vision,
                    checkpointing: Checkpointing {
                        text: hf.checkpointing,
                        vision: hf.checkpointing,
                    },
                };
                let policy = QwenPolicy::load(dir, &device, options)
                    .with_context(|| format!("--model {}", dir.display()))?;
                Model::Qwen(Box::new(policy))
            }
            (None, None) => bail!("no model: the demo's is built unless --model names one"),
        };
        let run = Self {
            common,
            model,
            train,
            eval,
            vocab,
            stage,
        };
        let described = match &run.model {
            Model::Tiny(t) => format!(
                "{:?} preset, vocab {}, {s}x{s} images",
                common.preset,
                t.tok.vocab_size(),
                s = t.cfg.image_size
            ),
            Model::Qwen(q) => format!(
                "Qwen2-VL {}, {:?}, vocab {}",
                q.pretrained.files.dir.display(),
                q.options.dtype,
                q.pretrained.config.text.vocab_size
            ),
        };
        println!(
            "model: {} parameters ({described}); data: {} train, {} eval ({data_seconds:.1}s)",
            run.policy()
                .vars()
                .all_vars()
                .iter()
                .map(|v| v.elem_count())
                .sum::<usize>(),
            run.train.len(),
            run.eval
                .iter()
                .map(|(name, s)| format!("{} {name}", s.len()))
                .collect::<Vec<_>>()
                .join(" + "),
        );
        fs::create_dir_all(&common.out)?;
        Ok(run)
    }

    /// The model as the loops drive it.
    pub(crate) fn policy(&self) -> &dyn Policy {
        match &self.model {
            Model::Tiny(t) => t.as_ref(),
            Model::Qwen(q) => q.as_ref(),
        }
    }

    /// Whether the model is a Hugging Face one (R1-SGG's defaults apply).
    pub(crate) fn real(&self) -> bool {
        matches!(self.model, Model::Qwen(_))
    }

    /// `demo` for the demo's model, `real` for a Hugging Face one.
    fn pick<T>(&self, demo: T, real: T) -> T {
        if self.real() {
            real
        } else {
            demo
        }
    }

    /// Loads the demo model's weights from a checkpoint file.
    pub(crate) fn load_tiny_weights(&mut self, path: &Path) -> Result<()> {
        match &mut self.model {
            Model::Tiny(t) => {
                checkpoint::load(path, &mut t.vars, None)?;
                Ok(())
            }
            Model::Qwen(_) => bail!("{}: a checkpoint of the demo's model", path.display()),
        }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.common.out.join(name)
    }

    /// Where a stage's checkpoint goes: `<stage>.safetensors` for the
    /// demo's model, the directory `<stage>/` for a Hugging Face one.
    pub(crate) fn checkpoint_path(&self, stage: &str) -> PathBuf {
        match self.model {
            Model::Tiny(_) => self.path(&format!("{stage}.safetensors")),
            Model::Qwen(_) => self.path(stage),
        }
    }

    /// The stage's optimizer and first step: fresh, or restored from its
    /// checkpoint in `--out` with --resume (for a Hugging Face model, the
    /// weights too).
    pub(crate) fn start(&mut self, stage: &str, lr: f64) -> Result<(AdamW, usize, MetricsLog)> {
        let mut opt = adamw(self.policy(), lr, self.common.hf.master_weights)?;
        if self.real() {
            println!(
                "optimizer: {} trainable weights, {:.2} GB of state (f32 moments{})",
                opt.vars().map(|v| v.elem_count()).sum::<usize>(),
                opt.state_bytes() as f64 / 1e9,
                if self.common.hf.master_weights && self.common.hf.dtype != crate::cli::DtypeArg::F32 {
                    ", f32 master weights"
                } else {
                    ""
                }
            );
        }
        let ckpt = self.checkpoint_path(stage);
        let metrics_path = self.path(&format!("{stage}.jsonl"));
        let state_file = match self.model {
            Model::Tiny(_) => ckpt.clone(),
            Model::Qwen(_) => ckpt.join(TRAINER_STATE),
        };
        if self.common.resume && state_file.is_file() {
            let state = match &mut self.model {
                Model::Tiny(t) => checkpoint::load(&ckpt, &mut t.vars, Some(&mut opt))?,
                Model::Qwen(q) => q.resume(&ckpt, &mut opt)?,
            };
            if state.stage != stage {
                bail!("{}: a {} checkpoint, not {stage}", ckpt.display(), state.stage);
            }
            println!("resuming {stage} at step {} from {}", state.step, ckpt.display());
            if let Some(position) = state.extra.get(POSITION_KEY) {
                let position = position
                    .parse()
                    .with_context(|| format!("{}: {POSITION_KEY} {position:?}", ckpt.display()))?;
                self.train.restore(position);
            }
            return Ok((opt, state.step, MetricsLog::append(&metrics_path)?));
        }
        Ok((opt, 0, MetricsLog::create(&metrics_path)?))
    }

    /// Writes the stage's checkpoint (weights, optimizer, next step): for
    /// the demo's model `<stage>.safetensors`, `model.json` and
    /// `tokenizer.json` in the output folder; for a Hugging Face model the
    /// directory `<stage>/` with `trainer_state.safetensors`.
    pub(crate) fn save(&self, stage: &str, next_step: usize, opt: &AdamW) -> Result<()> {
        let mut state = TrainingState {
            stage: stage.to_string(),
            step: next_step,
            seed: self.common.seed,
            extra: Default::default(),
        };
        if self.train.order() != Order::Independent {
            state
                .extra
                .insert(POSITION_KEY.to_string(), self.train.position().to_string());
        }
        let ckpt = self.checkpoint_path(stage);
        match &self.model {
            Model::Tiny(t) => {
                crate::model::tiny_vlm::save_config(&t.cfg, &self.path("model.json"))?;
                t.tok.save(&self.path("tokenizer.json"))?;
                checkpoint::save(&ckpt, &t.vars, Some(opt), &state)?;
            }
            Model::Qwen(q) => q.save_checkpoint(&ckpt, opt, &state)?,
        }
        Ok(())
    }

    /// Runs (or resumes) SFT; false if interrupted.
    pub(crate) fn sft(&mut self, args: &SftArgs) -> Result<bool> {
        let augment = match (args.shuffle, args.augment) {
            (true, _) | (_, Some(AugmentArg::Always)) => Augment::Always,
            (_, Some(AugmentArg::None)) => Augment::None,
            (_, Some(AugmentArg::R1Sgg)) => Augment::R1Sgg,
            (false, None) => self.pick(Augment::None, Augment::R1Sgg),
        };
        let cfg = SftConfig {
            steps: args.sft_steps,
            batch: args.batch.unwrap_or(self.pick(16, 128)),
            accumulate: self.common.accumulate.unwrap_or(self.pick(1, 32)),
            lr: args.sft_lr.unwrap_or(self.pick(3e-3, 1e-5)),
            schedule: self.pick(Schedule::WarmupCosine, Schedule::WarmupLinear { warmup: 0.05 }),
            max_grad_norm: self.common.max_grad_norm.unwrap_or(self.pick(MAX_GRAD_NORM, 0.3)),
            seed: self.common.seed,
            augment,
            objects_only: args.objects_only,
            loss_on: args.sft_loss_on,
        };
        check_split(cfg.batch, cfg.accumulate, "--batch")?;
        let (mut opt, start, metrics) = self.start("sft", cfg.lr)?;
        let mut hooks = Recorder::new(self, metrics, cfg.steps, 0);
        sft(self.learner(), &cfg, &mut opt, start, &mut hooks)?;
        let done = hooks.finish("sft", &opt)?;
        sft_chart(&self.path("sft.jsonl"), &self.path("sft.png"))?;
        Ok(done)
    }

    /// Runs (or resumes) GRPO; false if interrupted.
    pub(crate) fn grpo(&mut self, args: &GrpoArgs) -> Result<bool> {
        let mut cfg = grpo_defaults(args.grpo_steps, self.common.seed);
        cfg.max_new = self.max_new();
        cfg.inner_steps = args.inner_steps;
        cfg.group = args.group;
        cfg.prompts = args.prompts.unwrap_or(self.pick(4, 32));
        cfg.accumulate = self.common.accumulate.unwrap_or(self.pick(1, 32));
        cfg.rollout_prompts = args.rollout_prompts.unwrap_or(self.pick(cfg.prompts, 8));
        cfg.lr = args.grpo_lr.unwrap_or(self.pick(1e-4, 6e-7));
        cfg.schedule = self.pick(cfg.schedule, Schedule::WarmupLinear { warmup: 0.0 });
        cfg.max_grad_norm = self.common.max_grad_norm.unwrap_or(MAX_GRAD_NORM);
        cfg.loss.beta = args.beta.unwrap_or(self.pick(0.04, 0.0));
        cfg.sampling.temperature = args.temperature.unwrap_or(self.pick(0.6, 1.0));
        cfg.rewards.form = self.policy().answer_form();
        cfg.rewards.edge = args.edge_reward.into();
        cfg.rewards.weights = args.reward_weights.unwrap_or(self.pick(
            RewardWeights {
                format: 3.0,
                node: 2.0,
                edge: 5.0,
            },
            RewardWeights {
                format: 1.0,
                node: 2.0,
                edge: 5.0,
            },
        ));
        cfg.similarity = match args.label_similarity {
            LabelSimilarityArg::Exact => None,
            LabelSimilarityArg::Spacy => Some(SpacyTable::of(&self.vocab)?),
        };
        match cfg.similarity {
            Some(t) => println!(
                "rewards: labels by spaCy {} similarity (spaCy {}, {} table; exact match outside it)",
                t.pipeline(),
                t.spacy_version(),
                t.vocabulary()
            ),
            None => println!("rewards: labels by exact match"),
        }
        if args.freeze_box_tokens {
            let Model::Tiny(t) = &self.model else {
                bail!("--freeze-box-tokens: the demo's model only (its box coordinates are tokens of their own)");
            };
            let numbers = number_tokens(&t.tok, 1)
                .context("--freeze-box-tokens: the tokenizer has no run of box-coordinate tokens 0..=1000")?;
            cfg.masked_tokens = Some(numbers.first as u32..(numbers.first + numbers.count) as u32);
        }
        let cfg = cfg.with_variant(
            args.loss
                .unwrap_or(self.pick(LossVariant::Grpo, LossVariant::Bnpo)),
        );
        check_split(cfg.prompts, cfg.accumulate, "--prompts")?;
        let eval_every = args.eval_every.unwrap_or(self.pick(25, 0));
        let (mut opt, start, metrics) = self.start("grpo", cfg.lr)?;
        let mut hooks = Recorder::new(self, metrics, cfg.steps, eval_every);
        if start == 0 && eval_every > 0 {
            hooks.eval_val(0)?;
        }
        grpo(self.learner(), &cfg, &mut opt, start, &mut hooks)?;
        let done = hooks.finish("grpo", &opt)?;
        grpo_chart(&self.path("grpo.jsonl"), &self.path("grpo.png"))?;
        Ok(done)
    }

    /// The longest completion: --max-new, or the model's and stage's default.
    fn max_new(&self) -> usize {
        self.common.max_new.unwrap_or(match (self.real(), self.stage) {
            (false, _) => 160,
            (true, Stage::Grpo) => 1024,
            (true, _) => 2048,
        })
    }

    pub(crate) fn learner(&self) -> Learner<'_> {
        Learner {
            policy: self.policy(),
            train: &self.train,
        }
    }

    /// Greedy predictions on `samples`.
    pub(crate) fn predict(&self, samples: &[Sample]) -> Result<Vec<String>> {
        Ok(predict(self.policy(), samples, 32, self.max_new())?)
    }

    /// Evaluates on every evaluation set, logs the results as `stage`, writes
    /// every prediction beside its ground truth
    /// (`predictions_<stage>_<split>.jsonl`; a file given by `--eval-data`
    /// names the split by its stem), and draws the first images'
    /// predictions (`predictions_<stage>.png`). On VG150 or PSG data it also
    /// runs R1-SGG's own evaluation ([`crate::eval::r1_sgg`]; its numbers are
    /// the ones to set beside the paper's) on one record per image, written
    /// to `records_<stage>_<split>/` as R1-SGG's inference script writes
    /// them. Decoding is greedy: R1-SGG's temperature 0.01 with top-k 1
    /// picks the same argmax.
    pub(crate) fn eval_all(&self, stage: &str) -> Result<Vec<(String, EvalSummary)>> {
        let mut metrics = MetricsLog::append(&self.path("eval.jsonl"))?;
        let mut results = Vec::new();
        for (name, samples) in &self.eval {
            let texts = self.predict(samples)?;
            let summary = evaluate(&texts, samples, &self.vocab);
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
            // On R1-SGG's datasets, its own evaluation too, from one record
            // per image as its inference script writes them.
            if let Some(dataset) = Dataset::of(&self.vocab) {
                let records: Vec<Record> = samples
                    .iter()
                    .zip(&texts)
                    .map(|(s, t)| Record::from_sample(s, t))
                    .collect();
                write_records(&records, &self.path(&format!("records_{stage}_{label}")))?;
                // R1-SGG's code refuses ground truth outside its dataset's
                // vocabulary (mixed data, say): then only ours is reported.
                match evaluate_records(&records, dataset, &Default::default()) {
                    Ok((eval, _)) => {
                        let r = eval.summary();
                        println!(
                            "{stage} on {name}, R1-SGG's evaluation ({dataset:?}):\n{}",
                            describe_r1_sgg(&r, true)
                        );
                        metrics.write(&r1_sgg_record(stage, name, &r))?;
                    }
                    Err(e) => println!(
                        "{stage} on {name}: R1-SGG's evaluation ({dataset:?}) cannot score this data: {e:#}"
                    ),
                }
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
    pub(crate) fn predictions_png(
        &self,
        samples: &[Sample],
        texts: &[String],
        n: usize,
        path: &Path,
    ) -> Result<()> {
        let n = n.min(samples.len());
        let mut tiles: Vec<Sample> = samples[..n].to_vec();
        for (s, text) in samples[..n].iter().zip(texts) {
            let graph = parse_answer(text, self.policy().answer_form())
                .graph
                .unwrap_or_default();
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
    /// Off a terminal (no progress bar): when this stage's steps began, and
    /// the first of them, for the progress lines' rate and ETA.
    plain: Option<(Instant, usize)>,
}

impl<'r, 'a> Recorder<'r, 'a> {
    pub(crate) fn new(run: &'r Run<'a>, metrics: MetricsLog, steps: usize, eval_every: usize) -> Self {
        Self {
            run,
            metrics,
            steps,
            eval_every,
            interrupted_at: None,
            plain: None,
        }
    }

    /// Failure rate and recall on the first 256 validation images, logged as
    /// `grpo` evaluation at `step`.
    pub(crate) fn eval_val(&mut self, step: usize) -> Result<()> {
        let (name, samples) = &self.run.eval[0];
        let samples = &samples[..samples.len().min(256)];
        let summary = evaluate(&self.run.predict(samples)?, samples, &self.run.vocab);
        self.metrics
            .write(&eval_record("grpo", Some(step), name, &summary))?;
        Ok(())
    }

    /// Saves the stage's final (or interrupted) checkpoint; true if it ran to the end.
    pub(crate) fn finish(&mut self, stage: &str, opt: &AdamW) -> Result<bool> {
        let next = self.interrupted_at.map_or(self.steps, |s| s + 1);
        self.run.save(stage, next, opt)?;
        if let (n @ 1.., Some(first)) = self.run.train.skipped() {
            println!("--data: skipped {n} malformed records; the first: {first}");
        }
        let ckpt = self.run.checkpoint_path(stage);
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
        let wrap = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
        let mut line = json!({ "stage": stage, "step": step });
        if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), &record) {
            line.extend(fields.clone());
        }
        self.metrics.write(&line)?;
        if !std::io::stderr().is_terminal() {
            let (t0, first) = *self.plain.get_or_insert((Instant::now(), step));
            if (step + 1).is_multiple_of((self.steps / 20).max(1)) {
                println!("{}", progress_line(stage, step, self.steps, t0, first, &record));
            }
        }
        if self.eval_every > 0 && (step + 1).is_multiple_of(self.eval_every) {
            self.eval_val(step + 1).map_err(wrap)?;
        }
        if crate::util::interrupt::interrupted() {
            self.interrupted_at = Some(step);
            return Ok(false);
        }
        if self.run.common.save_every > 0
            && (step + 1).is_multiple_of(self.run.common.save_every)
            && step + 1 < self.steps
        {
            self.run.save(stage, step + 1, opt).map_err(wrap)?;
        }
        Ok(true)
    }
}

/// A progress line for logs (where the progress bar does not draw):
/// `sft step 120/2400 (5%), 0.42 s/step, 16 min left: loss 1.130, lr 0.003`,
/// the rate and what is left measured from `t0`, when step `first` began.
fn progress_line(
    stage: &str,
    step: usize,
    steps: usize,
    t0: Instant,
    first: usize,
    record: &Value,
) -> String {
    let done = step + 1;
    let per_step = t0.elapsed().as_secs_f64() / (done - first).max(1) as f64;
    let left = per_step * steps.saturating_sub(done) as f64;
    let left = if left >= 90.0 {
        format!("{:.0} min left", left / 60.0)
    } else {
        format!("{left:.0} s left")
    };
    let fields: Vec<String> = record
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "seconds")
        .filter_map(|(k, v)| {
            let v = v.as_f64()?;
            Some(if v.fract() == 0.0 && v.abs() < 1e9 {
                format!("{k} {v:.0}")
            } else {
                format!("{k} {v:.3}")
            })
        })
        .collect();
    format!(
        "{stage} step {done}/{steps} ({:.0}%), {per_step:.2} s/step, {left}: {}",
        100.0 * done as f64 / steps.max(1) as f64,
        fields.join(", ")
    )
}

/// An error naming `flag` unless `total` splits into `parts` equal micro-batches.
fn check_split(total: usize, parts: usize, flag: &str) -> Result<()> {
    if !total.is_multiple_of(parts) {
        bail!("{flag} {total} does not split into --accumulate {parts} equal micro-batches");
    }
    Ok(())
}

/// The demo model's tokenizer and configuration: from `--init`'s folder, or
/// new (the preset, the number basis and the pixel stem).
fn tiny_model(common: &Common) -> Result<(Tokenizer, VlmConfig)> {
    let (tok, cfg) = match &common.init {
        Some(ckpt) => {
            if !ckpt.is_file() {
                bail!("--init {}: no such checkpoint file", ckpt.display());
            }
            let folder = ckpt.parent().unwrap_or(Path::new("."));
            let tok_file = folder.join("tokenizer.json");
            let tok = if tok_file.is_file() {
                Tokenizer::from_file(&tok_file)?
            } else {
                Tokenizer::new(&crate::data::scene::SYNTHETIC, 32)
            };
            (
                tok,
                crate::model::tiny_vlm::load_config(&folder.join("model.json"))?,
            )
        }
        None => {
            let tok = Tokenizer::new(&crate::data::scene::SYNTHETIC, 32);
            let cfg = match common.preset {
                Preset::Tiny => VlmConfig::tiny(tok.vocab_size()),
                Preset::Gpu => VlmConfig::gpu(tok.vocab_size()),
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
        bail!(
            "model vocabulary {} does not match the tokenizer's {}",
            cfg.vocab_size,
            tok.vocab_size()
        );
    }
    Ok((tok, cfg))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_read_as_a_sentence() {
        let record = json!({"loss": 1.1308999, "tokens": 1242, "seconds": 0.4, "lr": 0.003});
        let line = progress_line("sft", 119, 2400, Instant::now(), 0, &record);
        assert!(
            line.starts_with("sft step 120/2400 (5%), 0.00 s/step, 0 s left: "),
            "{line}"
        );
        assert!(
            line.contains("loss 1.131") && line.contains("tokens 1242") && !line.contains("seconds"),
            "{line}"
        );
    }

    #[test]
    pub(crate) fn number_tokens_are_found_in_the_answer_tokenizer() {
        let tok = Tokenizer::new(&crate::data::scene::SYNTHETIC, 32);
        let numbers = number_tokens(&tok, 64).unwrap();
        assert_eq!(numbers.count, 1001);
        assert_eq!(tok.encode("1000"), [numbers.first as u32 + 1000]);
        assert!(number_tokens(&tok, 0).is_none());
    }
}
