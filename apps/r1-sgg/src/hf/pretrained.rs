//! A Qwen2-VL model directory opened as a trainable model with its processor,
//! and saved back in the Hub layout: what transformers'
//! `Qwen2VLForConditionalGeneration.from_pretrained` / `save_pretrained` and
//! `AutoProcessor.from_pretrained` do together.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use r1_sgg::hf::pretrained::Pretrained;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A directory downloaded from the Hub, e.g. Qwen/Qwen2-VL-2B-Instruct.
//! let qwen = Pretrained::load("models/Qwen2-VL-2B-Instruct".as_ref(), DType::BF16, &Device::Cpu)?;
//! println!("{} parameters", qwen.parameters());
//! qwen.save("runs/qwen-copy".as_ref())?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarMap;

use super::processor::Qwen2VlProcessor;
use super::weights::{
    load_weights, save_pretrained, ExtraFile, LoadReport, SaveOptions, DEFAULT_MAX_SHARD_BYTES,
};
use super::{HfError, ModelFiles};
use crate::model::qwen2_vl::config::{Config, ConfigFileError};
use crate::model::qwen2_vl::Qwen2Vl;
use crate::model::SeededVars;

/// Why a model directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PretrainedError {
    /// A file is missing or unreadable, a tensor is missing, extra or misshapen, or the
    /// tokenizer, template or image processor is unusable.
    #[error(transparent)]
    Files(#[from] HfError),
    /// `config.json` is not a Qwen2-VL configuration this crate can build.
    #[error(transparent)]
    Config(#[from] ConfigFileError),
    /// The model could not be built from a valid configuration (e.g. out of memory).
    #[error("building the Qwen2-VL model of {}: {source}", dir.display())]
    Model {
        /// The model directory.
        dir: PathBuf,
        /// What candle said.
        #[source]
        source: candle_core::Error,
    },
}

/// A Qwen2-VL checkpoint in memory: its files, configuration, trainable
/// variables (the Hub's tensor names), the model built on them, and the
/// processor (chat template, tokenizer, image processor).
pub struct Pretrained {
    /// Where it was loaded from.
    pub files: ModelFiles,
    /// `config.json`.
    pub config: Config,
    /// The weights, as `Var`s named as on the Hub (`visual.*`, `model.*`, `lm_head.weight`).
    pub vars: VarMap,
    /// The model on `vars`.
    pub model: Qwen2Vl,
    /// The processor of the directory.
    pub processor: Qwen2VlProcessor,
    /// What the weight loader did.
    pub report: LoadReport,
}

impl Pretrained {
    /// Opens `dir` (the Hub's layout or `save_pretrained`'s, see [`ModelFiles::locate`]):
    /// builds the model of its `config.json` with zero placeholders in `dtype` on `device`,
    /// then fills every variable from the checkpoint ([`load_weights`]: a missing, extra or
    /// misshapen tensor is an error naming the file and tensor, and nothing is half-loaded).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, PretrainedError> {
        let files = ModelFiles::locate(dir)?;
        let config = Config::from_file(&files.config)?;
        // The processor first: a broken tokenizer or template fails before the weights load.
        let processor = Qwen2VlProcessor::from_files(&files)?;
        let vars = VarMap::new();
        let model =
            Qwen2Vl::new(&config, SeededVars::placeholders(&vars, dtype, device)).map_err(|source| {
                PretrainedError::Model {
                    dir: dir.to_path_buf(),
                    source,
                }
            })?;
        let report = load_weights(&files.weights, &vars, config.tie_word_embeddings)?;
        Ok(Self {
            files,
            config,
            vars,
            model,
            processor,
            report,
        })
    }

    /// Number of weights.
    pub fn parameters(&self) -> usize {
        self.vars.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Writes the model to `dir` in the Hub layout ([`save_pretrained`]): `config.json` in the
    /// Hub's flat form ([`Config::to_hub_json`]), the weights in their dtype as one
    /// `model.safetensors` (shards with an index above 50 GB, transformers' default), and the
    /// tokenizer, chat template and image processor files copied from the source directory.
    /// Atomic: `dir` holds either its previous checkpoint or the complete new one.
    pub fn save(&self, dir: &Path) -> Result<(), HfError> {
        self.save_sharded(dir, DEFAULT_MAX_SHARD_BYTES)
    }

    /// [`Pretrained::save`] with weights split into shards of at most `max_shard_bytes`.
    pub fn save_sharded(&self, dir: &Path, max_shard_bytes: u64) -> Result<(), HfError> {
        self.save_with(dir, max_shard_bytes, &[])
    }

    /// [`Pretrained::save_sharded`] with `extra` files written into `dir` in the same atomic
    /// swap (a trainer's state beside the model it belongs to).
    pub fn save_with(
        &self,
        dir: &Path,
        max_shard_bytes: u64,
        extra: &[ExtraFile<'_>],
    ) -> Result<(), HfError> {
        let config = self.config.to_hub_json();
        let opts = SaveOptions {
            config: &config,
            tie_word_embeddings: self.config.tie_word_embeddings,
            max_shard_bytes,
            source: &self.files.dir,
            extra,
        };
        save_pretrained(&self.vars, dir, &opts)
    }
}
