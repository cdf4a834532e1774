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
use crate::report::summary::{describe_r1_sgg, eval_table, recall_gains, write};
use crate::reward::{EdgeReward, RewardWeights};
use crate::train::grpo::LossVariant;
use crate::train::session::{Run, Stage};

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
    /// The Hugging Face Qwen2-VL model to train or evaluate, and how.
    #[command(flatten)]
    pub hf: HfArgs,
    /// Micro-batches per optimizer step: SFT's --batch and GRPO's --prompts
    /// are split evenly, each part runs forward and backward alone and the
    /// gradients add up. Default: 1; 32 with --model (R1-SGG's 32 devices:
    /// SFT 128 samples as 32 x 4, GRPO 32 prompts as 32 x 1 prompt's 8
    /// completions).
    #[arg(long, value_parser = at_least(1))]
    pub accumulate: Option<usize>,
    /// Gradients are clipped to this global L2 norm. Default: 1.0; SFT with
    /// --model 0.3 (R1-SGG's).
    #[arg(long, value_parser = positive::<f64>)]
    pub max_grad_norm: Option<f64>,
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
    /// Row groups of a parquet --data whose rows are shuffled together
    /// (the shuffle buffer: each epoch the row groups in a seeded order, then
    /// this many at a time, their rows shuffled; memory grows with it). A
    /// JSONL --data is shuffled whole. See the README's "Real data".
    #[arg(long, default_value_t = crate::data::stream::DEFAULT_WINDOW, value_parser = at_least(1))]
    pub shuffle_window: usize,
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
    /// Longest answer generated, in tokens. Default: 160; with --model
    /// 1024 in GRPO and 2048 in evaluation (R1-SGG's).
    #[arg(long, value_parser = at_least(1))]
    pub max_new: Option<usize>,
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

/// The Hugging Face model flags (`--model` and what goes with it).
#[derive(Args)]
pub struct HfArgs {
    /// A Hugging Face Qwen2-VL model directory (the Hub's layout or
    /// `save_pretrained`'s) to train or evaluate instead of the demo's
    /// model, with R1-SGG's prompts and, unless given, R1-SGG's settings.
    /// Checkpoints are written in the same layout (`<out>/sft/`,
    /// `<out>/grpo/`, with the optimizer state as
    /// `trainer_state.safetensors`): pass one as --model to the next stage.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With --model: the weights' dtype (f32 optimizer moments either way).
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DtypeArg,
    /// With --model: f32 master copies of bf16 weights, updated by AdamW
    /// and rounded into the weights (4 more bytes per parameter). Without
    /// them, updates below half a bf16 ulp of a weight are lost.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub master_weights: bool,
    /// With --model: the processor's largest image in pixels. Default:
    /// R1-SGG's, 512*28*28 in GRPO and 1024*28*28 in SFT and evaluation.
    #[arg(long, value_parser = clap::value_parser!(u64).range(3136..))]
    pub max_pixels: Option<u64>,
    /// With --model: ask for the scene graph in any vocabulary (`open`,
    /// R1-SGG's default) or in the data's (`closed`, R1-SGG's
    /// `--use_predefined_cats`).
    #[arg(long, value_enum, default_value = "open")]
    pub prompt: PromptArg,
    /// With --model: the system prompt. Default: R1-SGG's, `think` in GRPO,
    /// `plain` in SFT and evaluation.
    #[arg(long, value_enum)]
    pub system_prompt: Option<crate::data::prompt::SystemPrompt>,
    /// With --model: train the decoder only (the vision tower's output is
    /// detached and its weights get no optimizer state).
    #[arg(long)]
    pub freeze_vision: bool,
    /// With --model: recompute each decoder layer and vision block in the
    /// backward pass instead of keeping its activations (R1-SGG's
    /// `--gradient_checkpointing`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub checkpointing: bool,
}

/// `--prompt` values.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptArg {
    /// R1-SGG's `PROMPT_SG`.
    Open,
    /// R1-SGG's closed-vocabulary prompt over the data's vocabulary.
    Closed,
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
    /// SFT samples per optimizer step (split by --accumulate). Default: 16;
    /// 128 with --model (R1-SGG's).
    #[arg(long, value_parser = at_least(1))]
    pub batch: Option<usize>,
    /// Peak SFT learning rate. Default: 3e-3 (warmup over 5%, cosine decay
    /// to 10%); 1e-5 with --model (R1-SGG's: warmup over 5%, then linear
    /// decay to 0).
    #[arg(long, value_parser = positive::<f64>)]
    pub sft_lr: Option<f64>,
    /// Answers with objects and relations shuffled and renumbered; else
    /// in reading order (top to bottom). Same as `--augment always`.
    #[arg(long, conflicts_with = "augment")]
    pub shuffle: bool,
    /// How answers are varied: `none`, `always` (objects and relations
    /// shuffled, objects renumbered), or `r1-sgg` (R1-SGG's: from a
    /// sample's second visit, with probability 0.5, the objects shuffled and
    /// renumbered). Default: none; r1-sgg with --model.
    #[arg(long, value_enum)]
    pub augment: Option<AugmentArg>,
    /// Which tokens the SFT loss covers: `answer` (the answer and its end
    /// token) or `all` (R1-SGG's: the whole chat but padding and image
    /// tokens, the prompt included).
    #[arg(long, value_enum, default_value = "answer")]
    pub sft_loss_on: crate::train::policy::LossOn,
    /// Train to list the objects only (the R1-SGG-Zero starting point:
    /// then `grpo --init` from this checkpoint).
    #[arg(long)]
    pub objects_only: bool,
}

/// `--augment` values.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AugmentArg {
    None,
    Always,
    R1Sgg,
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
    /// Loss normalization: GRPO, BNPO, Dr. GRPO or DAPO. Default: grpo;
    /// bnpo with --model (R1-SGG's).
    #[arg(long, value_enum)]
    pub loss: Option<LossVariant>,
    /// Optimizer steps per batch of completions (mu).
    #[arg(long, default_value_t = 1, value_parser = at_least(1))]
    pub inner_steps: usize,
    /// KL coefficient to the starting model (k3 estimator). R1-SGG uses 0
    /// (the default with --model); the demo uses 0.04 (TRL's former
    /// default): without it the tiny model's GRPO drifts to shorter answers
    /// with fewer objects, and loses recall.
    #[arg(long, value_parser = non_negative::<f32>)]
    pub beta: Option<f32>,
    /// Completions per image (G).
    #[arg(long, default_value_t = 8, value_parser = at_least(2))]
    pub group: usize,
    /// Images per GRPO step (split by --accumulate). Default: 4; 32 with
    /// --model (R1-SGG's).
    #[arg(long, value_parser = at_least(1))]
    pub prompts: Option<usize>,
    /// Prompts whose completions are generated in one batch (their
    /// prompt caches and G completions each decoded together). Default:
    /// all of a step's prompts; 8 with --model (64 rows: larger batches
    /// decode faster on a GPU while their KV cache fits).
    #[arg(long, value_parser = at_least(1))]
    pub rollout_prompts: Option<usize>,
    /// Peak GRPO learning rate. Default: 1e-4 after a warmup over 10% of
    /// the steps; 6e-7 with --model, decaying linearly to 0 (R1-SGG's).
    #[arg(long, value_parser = positive::<f64>)]
    pub grpo_lr: Option<f64>,
    /// Sampling temperature of the completions. R1-SGG samples at 1.0 (the
    /// default with --model); the tiny model's flatter distributions fail
    /// the format check in most samples there, so the demo samples at 0.6.
    #[arg(long, value_parser = positive::<f32>)]
    pub temperature: Option<f32>,
    /// Edge reward: hard recall, hard + relaxed labels, or soft (R1-SGG: hard).
    #[arg(long, value_enum, default_value = "hard")]
    pub edge_reward: EdgeRewardArg,
    /// How the rewards compare labels. `spacy`: spaCy's similarity over the
    /// data's vocabulary (--vocabulary), as R1-SGG, with exact match for
    /// labels outside it. `exact`: exact match everywhere.
    #[arg(long, value_enum, default_value = "spacy")]
    pub label_similarity: LabelSimilarityArg,
    /// Reward weights `format,node,edge` (0 turns one off). R1-SGG weighs
    /// 1,2,5 (the default with --model); the tiny model's commonest fault
    /// is an id copied wrong into a relation (an invalid answer, the
    /// relation lost), so the demo weighs the format 3 (3,2,5).
    #[arg(long, value_parser = parse_weights)]
    pub reward_weights: Option<RewardWeights>,
    /// Leave the box-coordinate tokens out of the policy loss: the rewards
    /// then steer only which objects and relations are written and how ids
    /// are copied, and the boxes stay where SFT put them. By default they
    /// are trained, as in R1-SGG: with the KL penalty (`--beta`) this
    /// locates more of the tiny model's objects instead of blurring them.
    #[arg(long)]
    pub freeze_box_tokens: bool,
    /// Evaluate on (up to 256) validation images every this many GRPO
    /// steps (0: never). Default: 25; 0 with --model.
    #[arg(long)]
    pub eval_every: Option<usize>,
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
            let mut run = Run::new(&common, Stage::Sft)?;
            run.sft(&sft)?;
            Ok(())
        }
        Command::Grpo { common, grpo } => {
            let mut run = Run::new(&common, Stage::Grpo)?;
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
            let run = Run::new(&common, Stage::Eval)?;
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
    println!("{}", describe_r1_sgg(&s, args.predictions.is_none()));
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
    if common.hf.model.is_some() {
        anyhow::bail!("demo trains the demo's model: run sft, grpo and eval with --model");
    }
    let mut run = Run::new(common, Stage::Demo)?;
    if !common.resume {
        // A fresh demo: earlier evaluations in this folder are stale.
        let _ = fs::remove_file(run.path("eval.jsonl"));
    }
    if common.resume && run.path("grpo.safetensors").is_file() {
        // GRPO started, so SFT finished: its weights are the SFT baseline.
        run.load_tiny_weights(&run.path("sft.safetensors"))?;
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
