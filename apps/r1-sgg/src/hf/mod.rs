//! Hugging Face I/O for Qwen2-VL: a local model directory as the Hub publishes it and as
//! transformers' `save_pretrained` writes it.
//!
//! - [`ModelFiles::locate`] finds a directory's files (config, weights, tokenizer, chat template,
//!   image processor) the way transformers 5.25's `from_pretrained` looks for them.
//! - [`weights`] loads safetensors checkpoints (one file or shards) into a model's `VarMap` and
//!   writes a `VarMap` back in the Hub layout.
//! - [`tokenizer`] is the tokenizer with the chat template and Qwen2-VL's special tokens.
//! - [`processor`] is Qwen2-VL's image processor and the processor tying it to the tokenizer;
//!   [`resample`] is the Pillow resampling it resizes with.
//! - [`pretrained`] puts them together with the model: a directory opened as a trainable
//!   [`crate::model::qwen2_vl::Qwen2Vl`] with its processor, and saved back; [`logits`] writes
//!   a checkpoint's logits for one image and prompt, to compare with transformers.
//!
//! Every failure is an [`HfError`] naming the file (and tensor or token) and what is wrong.

pub mod logits;
pub mod pretrained;
pub mod processor;
pub mod resample;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod parity;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// `config.json`.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file checkpoint.
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint (`weight_map`: tensor name -> shard file name).
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// The `tokenizers` library's serialized tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer's settings (special tokens, and on older checkpoints the chat template).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The processor's chat template (legacy JSON form, `{"chat_template": "..."}`).
pub const CHAT_TEMPLATE_JSON_FILE: &str = "chat_template.json";
/// The chat template as a raw Jinja file (what transformers 5.x writes).
pub const CHAT_TEMPLATE_JINJA_FILE: &str = "chat_template.jinja";
/// The image processor's settings as the Hub publishes them.
pub const PREPROCESSOR_CONFIG_FILE: &str = "preprocessor_config.json";
/// The processor's settings as transformers 5.x writes them (image processor under `"image_processor"`).
pub const PROCESSOR_CONFIG_FILE: &str = "processor_config.json";

/// What can go wrong reading or writing a Hugging Face model directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HfError {
    /// A required file is not in the directory.
    #[error("{dir}: no {what} (looked for {})", .tried.join(", "))]
    MissingFile {
        /// The model directory.
        dir: PathBuf,
        /// What was looked for ("weights", "chat template", ...).
        what: &'static str,
        /// The file names tried, in order.
        tried: Vec<String>,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{}: invalid JSON: {source}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A file parses but does not hold what it should (a field of the wrong type, a bad value).
    #[error("{}: {reason}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `model.safetensors.index.json` names a shard file that is not there.
    #[error("{}: names shard {shard}, which is not in the directory", .index.display())]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard's file name as the index gives it.
        shard: String,
    },
    /// A safetensors file does not parse.
    #[error("{}: not a valid safetensors file: {source}", .path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The model has variables that no checkpoint file provides.
    #[error("{}: missing tensors the model needs: {}", list_paths(.files), .names.join(", "))]
    MissingTensors {
        /// The checkpoint's files.
        files: Vec<PathBuf>,
        /// The model's names without a tensor, sorted.
        names: Vec<String>,
    },
    /// A checkpoint tensor the model does not have.
    #[error("{}: tensor {name} is not a variable of the model", .path.display())]
    UnexpectedTensor {
        /// The file holding it.
        path: PathBuf,
        /// Its name in the file.
        name: String,
    },
    /// The same tensor (after renaming to Hub names) appears twice.
    #[error("{}: tensor {name} is also in {}", .path.display(), .first.display())]
    DuplicateTensor {
        /// The file holding the second copy.
        path: PathBuf,
        /// The file holding the first copy.
        first: PathBuf,
        /// The tensor's Hub name.
        name: String,
    },
    /// The index and the shards disagree about where a tensor is.
    #[error("{}: tensor {name}: {reason}", .index.display())]
    IndexMismatch {
        /// The index file.
        index: PathBuf,
        /// The tensor's name in the index or shard.
        name: String,
        /// How they disagree.
        reason: String,
    },
    /// A checkpoint tensor's shape differs from the model variable's.
    #[error("{}: tensor {name} has shape {got:?}, the model expects {expected:?}", .path.display())]
    ShapeMismatch {
        /// The file holding it.
        path: PathBuf,
        /// Its name in the file.
        name: String,
        /// The model variable's shape.
        expected: Vec<usize>,
        /// The file's shape.
        got: Vec<usize>,
    },
    /// A checkpoint tensor's element type cannot become a model variable.
    #[error("{}: tensor {name} has dtype {dtype}; only F32, BF16, F16 and F64 load", .path.display())]
    UnsupportedDtype {
        /// The file holding it.
        path: PathBuf,
        /// Its name in the file.
        name: String,
        /// The file's dtype.
        dtype: String,
    },
    /// A tensor operation failed (dtype conversion, device copy, ...).
    #[error("{context}: {source}")]
    Candle {
        /// The file or tensor being handled.
        context: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// `tokenizer.json` does not load, or encoding/decoding failed.
    #[error("{}: {message}", .path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The `tokenizers` library's message.
        message: String,
    },
    /// A special token Qwen2-VL needs is not in the tokenizer's vocabulary.
    #[error("{}: no token {token} in the vocabulary", .path.display())]
    MissingSpecialToken {
        /// The tokenizer file.
        path: PathBuf,
        /// The token's text.
        token: &'static str,
    },
    /// The chat template does not compile or fails to render.
    #[error("{}: chat template: {source:#}", .path.display())]
    Template {
        /// The file the template came from.
        path: PathBuf,
        /// minijinja's error (with the template's line when known).
        #[source]
        source: minijinja::Error,
    },
    /// An image file does not decode.
    #[error("{}: cannot decode image: {source}", .path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// An image cannot be made into patches (empty, too elongated, wrong size).
    #[error("image {width}x{height}: {reason}")]
    BadImage {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// What is wrong.
        reason: String,
    },
    /// The text has a different number of `<|image_pad|>` tokens than there are images.
    #[error("{pads} {token} placeholders in the text but {images} images")]
    ImageCountMismatch {
        /// The placeholder token.
        token: &'static str,
        /// Placeholders found.
        pads: usize,
        /// Images given.
        images: usize,
    },
}

fn list_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// Shorthand for results in this module.
pub type Result<T> = std::result::Result<T, HfError>;

impl HfError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn candle(context: impl fmt::Display, source: candle_core::Error) -> Self {
        Self::Candle {
            context: context.to_string(),
            source,
        }
    }
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| HfError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| HfError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Where a model directory's chat template was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateSource {
    /// `chat_template.json`, key `"chat_template"` (the processor's legacy file).
    ChatTemplateJson,
    /// `chat_template.jinja`, the whole file.
    ChatTemplateJinja,
    /// `tokenizer_config.json`, key `"chat_template"` (older checkpoints).
    TokenizerConfig,
}

/// The chat template of a model directory: its text and where it came from.
#[derive(Debug, Clone)]
pub struct ChatTemplateFile {
    /// The file it was read from.
    pub path: PathBuf,
    /// Which of the three places it was found in.
    pub source: TemplateSource,
    /// The Jinja source.
    pub template: String,
}

impl ChatTemplateFile {
    /// Finds the chat template in `dir` in the order transformers 5.25's
    /// `ProcessorMixin.from_pretrained` resolves it: `chat_template.json` (legacy, wins when
    /// present), then `chat_template.jinja`, then `tokenizer_config.json["chat_template"]` (what
    /// the tokenizer alone would use). In `tokenizer_config.json` the value may be a string or a
    /// list of `{"name", "template"}`, of which the one named `default` is taken.
    pub fn locate(dir: &Path) -> Result<Self> {
        let json = dir.join(CHAT_TEMPLATE_JSON_FILE);
        if json.is_file() {
            let template = template_field(&json, &read_json(&json)?)?
                .ok_or_else(|| HfError::invalid(&json, "no \"chat_template\" string"))?;
            return Ok(Self {
                path: json,
                source: TemplateSource::ChatTemplateJson,
                template,
            });
        }
        let jinja = dir.join(CHAT_TEMPLATE_JINJA_FILE);
        if jinja.is_file() {
            let template = std::fs::read_to_string(&jinja).map_err(|e| HfError::io(&jinja, e))?;
            return Ok(Self {
                path: jinja,
                source: TemplateSource::ChatTemplateJinja,
                template,
            });
        }
        let config = dir.join(TOKENIZER_CONFIG_FILE);
        if config.is_file() {
            if let Some(template) = template_field(&config, &read_json(&config)?)? {
                return Ok(Self {
                    path: config,
                    source: TemplateSource::TokenizerConfig,
                    template,
                });
            }
        }
        Err(HfError::MissingFile {
            dir: dir.to_path_buf(),
            what: "chat template",
            tried: vec![
                CHAT_TEMPLATE_JSON_FILE.into(),
                CHAT_TEMPLATE_JINJA_FILE.into(),
                format!("{TOKENIZER_CONFIG_FILE}[\"chat_template\"]"),
            ],
        })
    }
}

/// The `"chat_template"` of a JSON object: a string, or the `default` entry of a list of named
/// templates; `None` when the key is absent.
fn template_field(path: &Path, json: &Value) -> Result<Option<String>> {
    match json.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| {
                HfError::invalid(path, "\"chat_template\" list has no template named \"default\"")
            }),
        Some(_) => Err(HfError::invalid(
            path,
            "\"chat_template\" is neither a string nor a list",
        )),
    }
}

/// The image processor's settings file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageProcessorFile {
    /// `processor_config.json` with the settings under `"image_processor"` (transformers 5.x).
    Processor(PathBuf),
    /// `preprocessor_config.json`, the settings at top level (the Hub's layout).
    Preprocessor(PathBuf),
}

impl ImageProcessorFile {
    /// Finds the settings as transformers 5.25's `ImageProcessingMixin.get_image_processor_dict`
    /// does: the `"image_processor"` object of `processor_config.json` when it has one, else
    /// `preprocessor_config.json`.
    pub fn locate(dir: &Path) -> Result<Self> {
        let processor = dir.join(PROCESSOR_CONFIG_FILE);
        if processor.is_file() && read_json(&processor)?.get("image_processor").is_some() {
            return Ok(Self::Processor(processor));
        }
        let preprocessor = dir.join(PREPROCESSOR_CONFIG_FILE);
        if preprocessor.is_file() {
            return Ok(Self::Preprocessor(preprocessor));
        }
        Err(HfError::MissingFile {
            dir: dir.to_path_buf(),
            what: "image processor settings",
            tried: vec![
                format!("{PROCESSOR_CONFIG_FILE}[\"image_processor\"]"),
                PREPROCESSOR_CONFIG_FILE.into(),
            ],
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Processor(p) | Self::Preprocessor(p) => p,
        }
    }

    /// The image processor's settings object.
    pub fn read(&self) -> Result<Value> {
        match self {
            Self::Preprocessor(path) => read_json(path),
            Self::Processor(path) => read_json(path)?
                .get_mut("image_processor")
                .map(Value::take)
                .ok_or_else(|| HfError::invalid(path, "no \"image_processor\" object")),
        }
    }
}

/// The checkpoint's weight files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// One `model.safetensors`.
    Single(PathBuf),
    /// Shards listed by `model.safetensors.index.json`.
    Sharded {
        /// The index file.
        index: PathBuf,
        /// The shard files, each once, in name order.
        shards: Vec<PathBuf>,
        /// The index's `weight_map`: tensor name -> shard file name.
        weight_map: BTreeMap<String, String>,
    },
}

impl WeightFiles {
    /// Finds the weights as transformers does: `model.safetensors`, else the index and every
    /// shard it names (each must exist).
    pub fn locate(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_WEIGHTS_FILE);
        if single.is_file() {
            return Ok(Self::Single(single));
        }
        let index = dir.join(WEIGHTS_INDEX_FILE);
        if !index.is_file() {
            return Err(HfError::MissingFile {
                dir: dir.to_path_buf(),
                what: "weights",
                tried: vec![SINGLE_WEIGHTS_FILE.into(), WEIGHTS_INDEX_FILE.into()],
            });
        }
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| HfError::invalid(&index, "no \"weight_map\" object"))?;
        let mut weight_map = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                HfError::invalid(&index, format!("weight_map[{name:?}] is not a file name"))
            })?;
            weight_map.insert(name.clone(), shard.to_owned());
        }
        let mut shard_names: Vec<&String> = weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut shards = Vec::with_capacity(shard_names.len());
        for shard in shard_names {
            // A shard name is a bare file name; anything else could point outside the directory.
            let path = dir.join(shard);
            if Path::new(shard).file_name() != Some(std::ffi::OsStr::new(shard)) || !path.is_file() {
                return Err(HfError::MissingShard {
                    index,
                    shard: shard.clone(),
                });
            }
            shards.push(path);
        }
        Ok(Self::Sharded {
            index,
            shards,
            weight_map,
        })
    }

    /// The safetensors files, in load order.
    pub fn files(&self) -> &[PathBuf] {
        match self {
            Self::Single(path) => std::slice::from_ref(path),
            Self::Sharded { shards, .. } => shards,
        }
    }
}

/// The files of a local Qwen2-VL model directory, as the Hub publishes it (flat `config.json`,
/// sharded weights, `preprocessor_config.json`, `chat_template.json`) or as transformers 5.x's
/// `save_pretrained` writes it (nested config, one `model.safetensors`,
/// `processor_config.json`, `chat_template.jinja`).
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The directory.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// The weights.
    pub weights: WeightFiles,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `tokenizer_config.json`, when present (special-token names for the chat template).
    pub tokenizer_config: Option<PathBuf>,
    /// The chat template.
    pub chat_template: ChatTemplateFile,
    /// The image processor's settings.
    pub image_processor: ImageProcessorFile,
}

impl ModelFiles {
    /// Finds every file of the model directory `dir`; an error names the first one missing
    /// (with the names tried) or the file that does not parse.
    pub fn locate(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let required = |name: &str, what: &'static str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(HfError::MissingFile {
                    dir: dir.to_path_buf(),
                    what,
                    tried: vec![name.into()],
                })
            }
        };
        let config = required(CONFIG_FILE, "model config")?;
        let weights = WeightFiles::locate(dir)?;
        let tokenizer = required(TOKENIZER_FILE, "tokenizer")?;
        let tokenizer_config = Some(dir.join(TOKENIZER_CONFIG_FILE)).filter(|p| p.is_file());
        let chat_template = ChatTemplateFile::locate(dir)?;
        let image_processor = ImageProcessorFile::locate(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
            tokenizer_config,
            chat_template,
            image_processor,
        })
    }

    /// `config.json` parsed (for the model's `Config`).
    pub fn config_json(&self) -> Result<Value> {
        read_json(&self.config)
    }
}
