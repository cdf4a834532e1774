//! The command line: `demo`, `data`, `sft`, `grpo` and `eval`, their flags
//! and what each runs.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::data::dataset::{write_dataset, DatasetFormat};
use crate::data::scene::{Vocabulary, PSG, SYNTHETIC, VG150};
use crate::data::synthetic::Split;
use crate::report::summary::{eval_table, recall_gains, write};
use crate::reward::{EdgeReward, RewardWeights};
use crate::train::checkpoint;
use crate::train::grpo::LossVariant;
use crate::train::session::Run;

#[derive(Parser)]
#[command(about = "R1-SGG: scene graphs by SFT then GRPO, on candle with grpo-kernels")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// SFT, evaluation, GRPO, evaluation on synthetic scenes; charts and a summary.
    Demo {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sft: SftArgs,
        #[command(flatten)]
        grpo: GrpoArgs,
    },
    /// Writes the synthetic dataset (train, val, test, shifted) in R1-SGG's JSONL or parquet layout.
    Data {
        /// Output folder.
        #[arg(long, default_value = "runs/data")]
        out: PathBuf,
        /// `jsonl`: R1-SGG's JSONL export beside an image folder; `parquet`:
        /// its Hugging Face shards, images embedded.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: DatasetFormat,
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
    /// Scores saved answers without a model: per-image records as R1-SGG's
    /// inference script writes them (a folder of `<image_id>.json`, or a
    /// JSONL file of records), by R1-SGG's own evaluation (failure rate,
    /// R@20/50/100, mR@K over all predicates, per-predicate recall; the
    /// numbers of its Table 1) or, with --strict, by this crate's.
    EvalRecords(EvalRecordsArgs),
    /// Logits of a Hugging Face Qwen2-VL checkpoint for one image and prompt,
    /// with the inputs that produced them, to check a downloaded, converted
    /// or trained model against transformers (`scripts/compare_logits.py`).
    Logits(LogitsArgs),
}

/// `eval-records` settings.
#[derive(Args)]
pub struct EvalRecordsArgs {
    /// A folder of per-image records (`{"image_id", "response",
    /// "gt_objects", "gt_relationships", "box_scale"}`, plus optional
    /// `"width"` and `"height"`) or a JSONL file of them.
    #[arg(long)]
    pub records: PathBuf,
    /// The dataset whose vocabulary and label maps score them.
    #[arg(long, value_enum)]
    pub data: DatasetArg,
    /// Score by this crate's stricter evaluation instead of R1-SGG's:
    /// every relation as written ranked, ids as written, no synonyms, IoU on
    /// normalized boxes, mR@K over the predicates present.
    #[arg(long)]
    pub strict: bool,
    /// Image sizes for records without `"width"`/`"height"` (R1-SGG's own
    /// records): a JSONL file in R1-SGG's data layout, each line an
    /// `"image_id"` with `"width"` and `"height"` or an `"image"` path.
    #[arg(long)]
    pub image_sizes: Option<PathBuf>,
    /// Score these gathered predictions (`sgg_pred_results.json`, as
    /// R1-SGG's `sgg_gather_preds.py` writes them) against the records'
    /// ground truth, instead of the records' answers (no failure rate then).
    #[arg(long, conflicts_with = "strict")]
    pub predictions: Option<PathBuf>,
    /// Write the summary and every image's scores here (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the gathered predictions here, as `sgg_gather_preds.py` does,
    /// for R1-SGG's `vg150_eval.py`.
    #[arg(long, conflicts_with_all = ["strict", "predictions"])]
    pub write_gathered: Option<PathBuf>,
}

/// `--data` values of `eval-records`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetArg {
    /// Visual Genome's VG150 (150 objects, 50 predicates).
    Vg150,
    /// Panoptic Scene Graph (133 objects, 56 predicates).
    Psg,
}

/// `logits` settings.
#[derive(Args)]
pub struct LogitsArgs {
    /// A Qwen2-VL model directory (the Hub's layout or `save_pretrained`'s).
    #[arg(long)]
    pub model: PathBuf,
    /// The image (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,
    /// The user's text, after the image in one user turn; the chat template
    /// adds its default system turn and the assistant's generation prompt.
    #[arg(long)]
    pub prompt: String,
    /// Output file: `input_ids`, `pixel_values`, `image_grid_thw`,
    /// `position_ids` and `logits` (f32) as safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Weights' dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Where the model runs.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

/// `--dtype` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats.
    F32,
    /// bfloat16 weights (norms, rope and log-probs still in f32).
    Bf16,
}

impl From<DtypeArg> for candle_core::DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => candle_core::DType::F32,
            DtypeArg::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl DeviceArg {
    /// The candle device.
    pub fn device(self) -> Result<candle_core::Device> {
        Ok(match self {
            DeviceArg::Cpu => candle_core::Device::Cpu,
            DeviceArg::Cuda => candle_core::Device::new_cuda(0).context("--device cuda")?,
        })
    }
}

#[derive(Args)]
pub struct Common {
    /// Output folder (checkpoints, metrics, charts, summary).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Checkpoint to start from (`*.safetensors`, with its `model.json` and
    /// `tokenizer.json` beside it).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue an interrupted stage from its checkpoint in --out (weights,
    /// optimizer state and step), appending to its `<stage>.jsonl`.
    #[arg(long)]
    pub resume: bool,
    /// Training data in R1-SGG's layout: a JSONL file, a parquet shard, a
    /// folder of shards or a quoted pattern ('data/train-*.parquet');
    /// synthetic scenes if absent.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluation data, as --data; the synthetic val, test and shifted splits if absent.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Skip malformed records of --data and --eval-data (bad JSON or boxes,
    /// missing or undecodable images, mistyped columns) and report how many,
    /// instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Synthetic training scenes to generate.
    #[arg(long, default_value_t = 4000, value_parser = at_least(1))]
    pub train_size: usize,
    /// Images to evaluate on, per split.
    #[arg(long, default_value_t = 512, value_parser = at_least(1))]
    pub eval_size: usize,
    /// Size of a new model: `tiny` (CPU) or `gpu`.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Where the model runs: `cpu`, or `cuda` (needs `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest answer generated, in tokens.
    #[arg(long, default_value_t = 160, value_parser = at_least(1))]
    pub max_new: usize,
    /// Cosine basis functions of the box-coordinate tokens' smooth part (0: none).
    #[arg(long, default_value_t = 64)]
    pub number_basis: usize,
    /// Channels of a 3x3 convolution stem ahead of the patch embedding of a
    /// new model (0: none, the patches are embedded from raw RGB).
    #[arg(long, default_value_t = 0)]
    pub pixel_stem: usize,
    /// Write a checkpoint every this many steps (and always at the end and on Ctrl-C).
    #[arg(long, default_value_t = 200)]
    pub save_every: usize,
    /// The data's vocabulary, whose spaCy table the rewards use and outside
    /// which the evaluation counts predicted labels. `auto`: the one holding
    /// most of the data files' labels (synthetic without --data or --eval-data).
    #[arg(long, value_enum, default_value = "auto")]
    pub vocabulary: VocabularyArg,
}

/// `--vocabulary` values.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum VocabularyArg {
    Auto,
    Synthetic,
    Vg150,
    Psg,
}

impl VocabularyArg {
    /// The vocabulary named, `None` for `auto`.
    pub fn named(self) -> Option<Vocabulary> {
        match self {
            VocabularyArg::Auto => None,
            VocabularyArg::Synthetic => Some(SYNTHETIC),
            VocabularyArg::Vg150 => Some(VG150),
            VocabularyArg::Psg => Some(PSG),
        }
    }
}

/// `--label-similarity` values.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelSimilarityArg {
    /// 1 for equal labels, else 0.
    Exact,
    /// spaCy's en_core_web_sm similarity, R1-SGG's, from the vocabulary's table.
    Spacy,
}

/// Settings of the SFT stage.
#[derive(Args)]
pub struct SftArgs {
    #[arg(long, default_value_t = 2400)]
    pub sft_steps: usize,
    /// SFT batch size.
    #[arg(long, default_value_t = 16, value_parser = at_least(1))]
    pub batch: usize,
    #[arg(long, default_value_t = 3e-3, value_parser = positive::<f64>)]
    pub sft_lr: f64,
    /// Answers with objects and relations shuffled and renumbered
    /// (R1-SGG's augmentation); else in reading order (top to bottom).
    #[arg(long)]
    pub shuffle: bool,
    /// Train to list the objects only (the R1-SGG-Zero starting point:
    /// then `grpo --init` from this checkpoint).
    #[arg(long)]
    pub objects_only: bool,
}

/// `--edge-reward` values.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum EdgeRewardArg {
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

/// `--preset` values: the size of a model trained from scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// About 1M parameters: trains on two CPU cores in minutes.
    Tiny,
    /// About 38M parameters, for a GPU.
    Gpu,
}

/// `--device` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The CPU, with the crate's multithreaded CPU ops.
    Cpu,
    /// The first CUDA GPU, with the crate's CUDA kernels.
    Cuda,
}

/// A count flag's parser: an integer of at least `min`, the message naming
/// the range.
fn at_least(min: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(min..)
}

/// A number flag's parser: a finite number `x` with `ok(x)`, the message
/// naming the range (`what`).
fn finite<T: std::str::FromStr + Into<f64> + Copy>(
    text: &str,
    ok: fn(f64) -> bool,
    what: &str,
) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let v: T = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a number: {e}"))?;
    let x: f64 = v.into();
    if x.is_finite() && ok(x) {
        Ok(v)
    } else {
        Err(format!("must be a finite number {what}, got {text}"))
    }
}

/// A rate or temperature flag's parser: a finite number above 0.
fn positive<T: std::str::FromStr + Into<f64> + Copy>(text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    finite(text, |x| x > 0.0, "above 0")
}

/// A coefficient flag's parser: a finite number of at least 0.
fn non_negative<T: std::str::FromStr + Into<f64> + Copy>(text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    finite(text, |x| x >= 0.0, "of at least 0")
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
pub struct GrpoArgs {
    #[arg(long, default_value_t = 150)]
    pub grpo_steps: usize,
    /// Loss normalization: GRPO, BNPO, Dr. GRPO or DAPO.
    #[arg(long, value_enum, default_value = "grpo")]
    pub loss: LossVariant,
    /// Optimizer steps per batch of completions (mu).
    #[arg(long, default_value_t = 1, value_parser = at_least(1))]
    pub inner_steps: usize,
    /// KL coefficient to the starting model (k3 estimator). R1-SGG uses 0;
    /// the example uses 0.04 (TRL's former default): without it the tiny
    /// model's GRPO drifts to shorter answers with fewer objects, and loses
    /// recall.
    #[arg(long, default_value_t = 0.04, value_parser = non_negative::<f32>)]
    pub beta: f32,
    /// Completions per image (G).
    #[arg(long, default_value_t = 8, value_parser = at_least(2))]
    pub group: usize,
    /// Images per GRPO step.
    #[arg(long, default_value_t = 4, value_parser = at_least(1))]
    pub prompts: usize,
    /// Peak GRPO learning rate (after a warmup over 10% of the steps).
    #[arg(long, default_value_t = 1e-4, value_parser = positive::<f64>)]
    pub grpo_lr: f64,
    /// Sampling temperature of the completions. R1-SGG samples at 1.0; the
    /// tiny model's flatter distributions fail the format check in most samples
    /// there, so the example samples at 0.6.
    #[arg(long, default_value_t = 0.6, value_parser = positive::<f32>)]
    pub temperature: f32,
    /// Edge reward: hard recall, hard + relaxed labels, or soft (R1-SGG: hard).
    #[arg(long, value_enum, default_value = "hard")]
    pub edge_reward: EdgeRewardArg,
    /// How the rewards compare labels. `spacy`: spaCy's similarity over the
    /// data's vocabulary (--vocabulary), as R1-SGG, with exact match for
    /// labels outside it. `exact`: exact match everywhere.
    #[arg(long, value_enum, default_value = "spacy")]
    pub label_similarity: LabelSimilarityArg,
    /// Reward weights `format,node,edge` (0 turns one off). R1-SGG weighs
    /// 1,2,5; the tiny model's commonest fault is an id copied wrong into a
    /// relation (an invalid answer, the relation lost), so the example
    /// weighs the format 3.
    #[arg(long, value_parser = parse_weights, default_value = "3,2,5")]
    pub reward_weights: RewardWeights,
    /// Leave the box-coordinate tokens out of the policy loss: the rewards
    /// then steer only which objects and relations are written and how ids
    /// are copied, and the boxes stay where SFT put them. By default they
    /// are trained, as in R1-SGG: with the KL penalty (`--beta`) this
    /// locates more of the tiny model's objects instead of blurring them.
    #[arg(long)]
    pub freeze_box_tokens: bool,
    /// Evaluate on (up to 256) validation images every this many GRPO steps (0: never).
    #[arg(long, default_value_t = 25)]
    pub eval_every: usize,
}

pub fn run(cli: Cli) -> Result<()> {
    crate::util::interrupt::install_interrupt_handler()?;
    match cli.command {
        Command::Demo { common, sft, grpo } => demo(&common, &sft, &grpo),
        Command::Data {
            out,
            format,
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
            for path in write_dataset(&out, &sizes, seed, format)? {
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
        Command::EvalRecords(args) => eval_records(&args),
        Command::Logits(args) => crate::hf::logits::write_logits(
            &args.model,
            &args.image,
            &args.prompt,
            &args.out,
            args.dtype.into(),
            &args.device.device()?,
        ),
        Command::Eval { common } => {
            let run = Run::new(&common)?;
            let results = run.eval_all("eval")?;
            println!("{}", eval_table(&[("checkpoint", &results)]));
            Ok(())
        }
    }
}

/// `eval-records`: reads the records, scores them, prints the metrics and
/// writes what was asked for.
fn eval_records(args: &EvalRecordsArgs) -> Result<()> {
    use crate::eval::r1_sgg::records::{
        evaluate_records, read_gathered, read_image_sizes, read_records, write_gathered,
    };
    use crate::eval::r1_sgg::{Dataset, Gathered, R1SggEval};

    let records = read_records(&args.records).context("reading the records")?;
    let sizes = match &args.image_sizes {
        Some(path) => read_image_sizes(path).context("reading --image-sizes")?,
        None => Default::default(),
    };
    let dataset = match args.data {
        DatasetArg::Vg150 => Dataset::Vg150,
        DatasetArg::Psg => Dataset::Psg,
    };
    if args.strict {
        let vocab = match dataset {
            Dataset::Vg150 => VG150,
            Dataset::Psg => PSG,
        };
        let summary = crate::eval::r1_sgg::records::evaluate_strict(&records, &vocab, &sizes)?;
        let name = args.records.display().to_string();
        println!(
            "{}",
            eval_table(&[("strict", &vec![(name.clone(), summary.clone())])])
        );
        if let Some(out) = &args.out {
            let record = crate::report::summary::eval_record("strict", None, &name, &summary);
            write(out, &serde_json::to_string_pretty(&record)?)?;
        }
        return Ok(());
    }
    let (eval, gathered) = match &args.predictions {
        None => evaluate_records(&records, dataset, &sizes)?,
        Some(path) => {
            let predictions = read_gathered(path).context("reading --predictions")?;
            let mut eval = R1SggEval::new(dataset);
            for r in &records {
                let p = predictions.get(&r.image_id).cloned().unwrap_or_default();
                eval.add(
                    &r.image_id,
                    &Gathered::Graph(p),
                    &r.gt_objects,
                    &r.gt_relationships,
                )?;
            }
            (eval, Vec::new())
        }
    };
    let s = eval.summary();
    let (commit, nltk, wordnet) = eval.provenance();
    println!(
        "R1-SGG's evaluation ({dataset:?}; its code at {}, synonyms by NLTK {nltk} over WordNet {wordnet}), {} images:",
        &commit[..7],
        s.images
    );
    if args.predictions.is_none() {
        println!(
            "  failure rate {:.2}% ({} of {})",
            100.0 * s.failure_rate,
            s.failures,
            s.images
        );
    }
    let pct = |v: &[(usize, f64)]| {
        v.iter()
            .map(|(k, r)| format!("@{k} {:.2}", 100.0 * r))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("  R   {}   ({} images counted)", pct(&s.recall), s.recall_images);
    println!("  mR  {}", pct(&s.mean_recall));
    println!(
        "  triplet recall {:.2}, its mean over predicates {:.2}",
        100.0 * s.triplet_recall,
        100.0 * s.triplet_mean_recall
    );
    if let Some(out) = &args.out {
        let json = serde_json::json!({"summary": s, "images": eval.images()});
        write(out, &serde_json::to_string_pretty(&json)?)?;
        println!("written to {}", out.display());
    }
    if let Some(path) = &args.write_gathered {
        write_gathered(&eval, &gathered, path)?;
        println!("gathered predictions written to {}", path.display());
    }
    Ok(())
}

fn demo(common: &Common, sft_args: &SftArgs, grpo_args: &GrpoArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut run = Run::new(common)?;
    if !common.resume {
        // A fresh demo: earlier evaluations in this folder are stale.
        let _ = fs::remove_file(run.path("eval.jsonl"));
    }
    if common.resume && run.path("grpo.safetensors").is_file() {
        // GRPO started, so SFT finished: its weights are the SFT baseline.
        checkpoint::load(&run.path("sft.safetensors"), &mut run.vars, None)?;
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
}
