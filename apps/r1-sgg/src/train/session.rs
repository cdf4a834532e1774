//! One invocation of the command line: the model, its variables, the
//! tokenizer and the data, the stages it runs, and the hooks that record
//! metrics, save checkpoints and stop on Ctrl-C.

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_nn::VarMap;
use serde_json::{json, Value};

use super::checkpoint::{self, TrainingState};
use super::grpo::{grpo, grpo_defaults};
use super::optim::AdamW;
use super::sft::{sft, SftConfig};
use super::{adamw, Hooks, Learner, FORM};
use crate::cli::{Common, GrpoArgs, LabelSimilarityArg, Preset, SftArgs};
use crate::data::format::{graph_json, parse_answer, BoxRounding};
use crate::data::preview::render_preview;
use crate::data::scene::{covering_vocabulary, SceneGraph, Vocabulary};
use crate::data::source::{load_samples, DataSource};
use crate::data::synthetic::{generate_split, Split};
use crate::data::{BadRows, Sample};
use crate::eval::{evaluate, predict, EvalSummary};
use crate::model::tiny_tokenizer::Tokenizer;
use crate::model::{NumberTokens, PixelStem, SeededVars, Vlm, VlmConfig};
use crate::report::metrics::MetricsLog;
use crate::report::summary::{describe, eval_record, grpo_chart, sft_chart};
use crate::reward::SpacyTable;

/// A model, its variables, the tokenizer and the data of one invocation.
pub struct Run<'a> {
    pub(crate) common: &'a Common,
    pub(crate) tok: Tokenizer,
    pub(crate) cfg: VlmConfig,
    pub(crate) vars: VarMap,
    pub(crate) model: Vlm,
    pub(crate) train: Vec<Sample>,
    /// Named evaluation sets: val, test, shifted (or the --eval-data file).
    pub(crate) eval: Vec<(String, Vec<Sample>)>,
    /// The data's vocabulary (--vocabulary).
    pub(crate) vocab: Vocabulary,
}

impl<'a> Run<'a> {
    pub(crate) fn new(common: &'a Common) -> Result<Self> {
        let device = common.device.device()?;
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
        let mut vars = VarMap::new();
        let model = Vlm::new(&cfg, SeededVars::builder(&vars, common.seed, &device))?;
        if let Some(ckpt) = &common.init {
            checkpoint::load(ckpt, &mut vars, None)?;
        }
        let size = cfg.image_size as u32;
        let t0 = Instant::now();
        let resize = |samples: Vec<Sample>| samples.iter().map(|s| s.resized(size, size)).collect();
        // Files are resized as they are read: a parquet set's full-size
        // images are never all in memory.
        let load = |path: &Path, flag: &str| -> Result<Vec<Sample>> {
            let bad_rows = if common.skip_bad_rows {
                BadRows::Skip
            } else {
                BadRows::Fail
            };
            let source = DataSource::resolve(path)?;
            let (samples, skipped) = load_samples(&source, bad_rows, |s| s.resized(size, size))?;
            if let Some(first) = &skipped.first {
                println!(
                    "{flag}: skipped {} malformed records; the first: {first}",
                    skipped.count
                );
            }
            non_empty(samples, flag, path)
        };
        let train: Vec<Sample> = match &common.data {
            Some(p) => load(p, "--data")?,
            None => resize(generate_split(Split::Train, common.train_size, common.seed)),
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
        println!(
            "model: {} parameters ({:?} preset), vocab {}, {}x{} images; data: {} train, {} eval ({:.1}s)",
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
        let vocab = match common.vocabulary.named() {
            Some(vocab) => vocab,
            None => {
                // The data files' labels decide; without any, the data is synthetic.
                let mut graphs: Vec<&SceneGraph> = Vec::new();
                if common.data.is_some() {
                    graphs.extend(train.iter().map(|s| &s.graph));
                }
                if common.eval_data.is_some() {
                    graphs.extend(eval.iter().flat_map(|(_, s)| s).map(|s| &s.graph));
                }
                let (vocab, share) = covering_vocabulary(graphs);
                println!(
                    "vocabulary: {} ({:.1}% of the data's labels; --vocabulary to choose)",
                    vocab.name,
                    100.0 * share
                );
                vocab
            }
        };
        fs::create_dir_all(&common.out)?;
        Ok(Self {
            common,
            tok,
            cfg,
            vars,
            model,
            train,
            eval,
            vocab,
        })
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.common.out.join(name)
    }

    /// The stage's optimizer and first step: fresh, or restored from
    /// `<out>/<stage>.safetensors` with --resume.
    pub(crate) fn start(&mut self, stage: &str, lr: f64) -> Result<(AdamW, usize, MetricsLog)> {
        let mut opt = adamw(&self.vars, lr)?;
        let ckpt = self.path(&format!("{stage}.safetensors"));
        let metrics_path = self.path(&format!("{stage}.jsonl"));
        if self.common.resume && ckpt.is_file() {
            let state = checkpoint::load(&ckpt, &mut self.vars, Some(&mut opt))?;
            if state.stage != stage {
                bail!("{}: a {} checkpoint, not {stage}", ckpt.display(), state.stage);
            }
            println!("resuming {stage} at step {} from {}", state.step, ckpt.display());
            return Ok((opt, state.step, MetricsLog::append(&metrics_path)?));
        }
        Ok((opt, 0, MetricsLog::create(&metrics_path)?))
    }

    /// Writes `<stage>.safetensors` (weights, optimizer, next step),
    /// `model.json` and `tokenizer.json` into the output folder.
    pub(crate) fn save(&self, stage: &str, next_step: usize, opt: &AdamW) -> Result<()> {
        crate::model::tiny_vlm::save_config(&self.cfg, &self.path("model.json"))?;
        self.tok.save(&self.path("tokenizer.json"))?;
        let state = TrainingState {
            stage: stage.to_string(),
            step: next_step,
            seed: self.common.seed,
            extra: Default::default(),
        };
        checkpoint::save(
            &self.path(&format!("{stage}.safetensors")),
            &self.vars,
            Some(opt),
            &state,
        )?;
        Ok(())
    }

    /// Runs (or resumes) SFT; false if interrupted.
    pub(crate) fn sft(&mut self, args: &SftArgs) -> Result<bool> {
        let cfg = SftConfig {
            steps: args.sft_steps,
            batch: args.batch,
            lr: args.sft_lr,
            seed: self.common.seed,
            shuffle: args.shuffle,
            objects_only: args.objects_only,
            rounding: match self.common.data {
                Some(_) => BoxRounding::Truncate,
                None => BoxRounding::Nearest,
            },
        };
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
        cfg.max_new = self.common.max_new;
        cfg.inner_steps = args.inner_steps;
        cfg.group = args.group;
        cfg.prompts = args.prompts;
        cfg.lr = args.grpo_lr;
        cfg.loss.beta = args.beta;
        cfg.sampling.temperature = args.temperature;
        cfg.rewards.edge = args.edge_reward.into();
        cfg.rewards.weights = args.reward_weights;
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
            let numbers = number_tokens(&self.tok, 1)
                .context("--freeze-box-tokens: the tokenizer has no run of box-coordinate tokens 0..=1000")?;
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

    pub(crate) fn learner(&self) -> Learner<'_> {
        Learner {
            model: &self.model,
            vars: &self.vars,
            tok: &self.tok,
            train: &self.train,
        }
    }

    /// Greedy predictions on `samples`.
    pub(crate) fn predict(&self, samples: &[Sample]) -> Result<Vec<String>> {
        Ok(predict(&self.model, &self.tok, samples, 32, self.common.max_new)?)
    }

    /// Evaluates on every evaluation set, logs the results as `stage`, writes
    /// every prediction beside its ground truth
    /// (`predictions_<stage>_<split>.jsonl`; a file given by `--eval-data`
    /// names the split by its stem), and draws the first images'
    /// predictions (`predictions_<stage>.png`).
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
    pub(crate) fn new(run: &'r Run<'a>, metrics: MetricsLog, steps: usize, eval_every: usize) -> Self {
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
        let wrap = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
        let mut line = json!({ "stage": stage, "step": step });
        if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), &record) {
            line.extend(fields.clone());
        }
        self.metrics.write(&line)?;
        if self.plain && (step + 1).is_multiple_of((self.steps / 20).max(1)) {
            println!("{stage} step {}/{}: {record}", step + 1, self.steps);
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

/// `samples` read from `path` (given by `flag`), or an error naming both
/// when the file holds none: a training loop cannot draw from nothing.
fn non_empty(samples: Vec<Sample>, flag: &str, path: &Path) -> Result<Vec<Sample>> {
    if samples.is_empty() {
        bail!("{flag} {}: the file holds no samples", path.display());
    }
    Ok(samples)
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
    pub(crate) fn number_tokens_are_found_in_the_answer_tokenizer() {
        let tok = Tokenizer::new(&crate::data::scene::SYNTHETIC, 32);
        let numbers = number_tokens(&tok, 64).unwrap();
        assert_eq!(numbers.count, 1001);
        assert_eq!(tok.encode("1000"), [numbers.first as u32 + 1000]);
        assert!(number_tokens(&tok, 0).is_none());
    }
}
