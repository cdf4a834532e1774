//! Qwen2-VL's `config.json`, read in both layouts transformers uses, and
//! written in the Hub's.
//!
//! - The Hub's FLAT layout (Qwen/Qwen2-VL-2B-Instruct, 7B, and what
//!   transformers 4.4x-4.5x wrote): text keys at the top level, `rope_theta`
//!   beside `rope_scaling: {"type": "mrope" | "default", "mrope_section": [..]}`,
//!   and a `vision_config` that may hold as little as
//!   `{"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}`.
//! - transformers 5.x's NESTED layout: `text_config` (with `rope_parameters:
//!   {"rope_type": "default", "mrope_section": [..], "rope_theta": ..}`) and
//!   `vision_config` (with `rope_parameters: {"rope_type": "axial", ..}`).
//!
//! Missing vision fields take `Qwen2VLVisionConfig`'s defaults (the 7B's
//! tower, which every Qwen2-VL size shares). transformers' TEXT defaults are
//! the 72B's (hidden 8192, 80 layers), so a missing text field that shapes
//! the model is an error here, never a silent default. Layout rules follow
//! `configuration_qwen2_vl.py` (transformers 5.25.0): text keys are read
//! from `text_config` when it is present, else from the top level; a
//! `rope_scaling` dict wins over `rope_parameters`; `tie_word_embeddings`
//! holds if either the top level or `text_config` sets it.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Qwen2-VL's special token ids (`configuration_qwen2_vl.py`'s defaults).
pub const IMAGE_TOKEN_ID: u32 = 151_655;
/// See [`IMAGE_TOKEN_ID`].
pub const VIDEO_TOKEN_ID: u32 = 151_656;
/// See [`IMAGE_TOKEN_ID`].
pub const VISION_START_TOKEN_ID: u32 = 151_652;
/// See [`IMAGE_TOKEN_ID`].
pub const VISION_END_TOKEN_ID: u32 = 151_653;

/// A whole Qwen2-VL configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The language model.
    pub text: TextConfig,
    /// The vision tower and its merger.
    pub vision: VisionConfig,
    /// `<|image_pad|>`: one per merged image patch in the prompt.
    pub image_token_id: u32,
    /// `<|video_pad|>` (videos are not supported; the id is kept to reject them).
    pub video_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
    /// The LM head is the token embedding (`lm_head.weight` absent).
    pub tie_word_embeddings: bool,
    /// `bos_token_id`, if the file names one.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (one id or a list in the file; empty when absent).
    pub eos_token_id: Vec<u32>,
    /// `torch_dtype` / `dtype` as written (`"bfloat16"`, `"float32"`), if any.
    pub dtype: Option<String>,
}

/// The Qwen2 decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Model width `H`.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads; `head_dim = hidden_size / num_attention_heads`.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// M-RoPE: how many of the `head_dim / 2` frequencies follow the
    /// temporal, height and width position (cycling t, h, w if longer).
    pub mrope_section: Vec<usize>,
    /// Metadata only: the positions are computed on the fly, never tabled.
    pub max_position_embeddings: usize,
}

/// The vision tower (`Qwen2VLVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: usize,
    /// Tower width `E`.
    pub embed_dim: usize,
    /// The merger's output width (must equal the text `hidden_size`).
    pub hidden_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP width is `embed_dim * mlp_ratio`.
    pub mlp_ratio: usize,
    /// Image channels.
    pub in_channels: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Side of the window of patches the merger joins into one token.
    pub spatial_merge_size: usize,
    /// Frames per patch (an image is repeated this many times).
    pub temporal_patch_size: usize,
    /// Base of the 2-D rotary embedding.
    pub rope_theta: f64,
}

impl Default for VisionConfig {
    /// `Qwen2VLVisionConfig`'s defaults (transformers 5.25.0).
    fn default() -> Self {
        Self {
            depth: 32,
            embed_dim: 1280,
            hidden_size: 3584,
            num_heads: 16,
            mlp_ratio: 4,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            rope_theta: 10_000.0,
        }
    }
}

impl TextConfig {
    /// `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl VisionConfig {
    /// `embed_dim / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Values per patch: `in_channels * temporal_patch_size * patch_size^2`
    /// (1176 for Qwen2-VL).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one token: `spatial_merge_size^2`.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

/// What is wrong with a configuration; every variant names the field (dotted
/// as in the file, e.g. `text_config.hidden_size` or `vision_config.depth`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not JSON, or not a JSON object.
    #[error("not a JSON object: {0}")]
    Json(String),
    /// A field the model's shape depends on is absent.
    #[error(
        "missing required field `{0}` (transformers' defaults for it are the 72B's, so it must be given)"
    )]
    Missing(String),
    /// A field has the wrong JSON type.
    #[error("field `{field}`: expected {expected}, found {found}")]
    Type {
        /// The field.
        field: String,
        /// What the field must hold.
        expected: &'static str,
        /// What it holds.
        found: String,
    },
    /// A field's value is out of range, inconsistent with another, or not supported.
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
}

/// A `config.json` that could not be read or is not a valid Qwen2-VL config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's content is not a valid config.
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        source: ConfigError,
    },
}

type Result<T> = std::result::Result<T, ConfigError>;

/// One JSON object of the config and its dotted name in the file (empty at the top level).
#[derive(Clone)]
struct Obj<'a> {
    map: &'a Map<String, Value>,
    at: String,
}

impl<'a> Obj<'a> {
    fn field(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.at)
        }
    }

    fn type_error(&self, key: &str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::Type {
            field: self.field(key),
            expected,
            found: v.to_string(),
        }
    }

    /// The value of `key`; JSON `null` counts as absent (as in transformers).
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn object(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj {
                map,
                at: self.field(key),
            })),
            Some(v) => Err(self.type_error(key, "an object", v)),
        }
    }

    /// A non-negative integer; an integral float (`4.0`) is accepted, as Python writes some.
    fn usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let n = v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        });
        match n.and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(self.type_error(key, "a non-negative integer", v)),
        }
    }

    fn u32(&self, key: &str) -> Result<Option<u32>> {
        self.usize(key)?
            .map(|n| u32::try_from(n).map_err(|_| self.invalid(key, format!("{n} does not fit a token id"))))
            .transpose()
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_f64()
            .map(Some)
            .ok_or_else(|| self.type_error(key, "a number", v))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| self.type_error(key, "true or false", v))
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_str()
            .map(Some)
            .ok_or_else(|| self.type_error(key, "a string", v))
    }

    fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let err = || self.type_error(key, "a list of non-negative integers", v);
        let items = v.as_array().ok_or_else(err)?;
        items
            .iter()
            .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(err))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// One id or a list of ids.
    fn u32_list(&self, key: &str) -> Result<Vec<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let err = || self.type_error(key, "a token id or a list of them", v);
        let ids = match v {
            Value::Array(items) => items.iter().map(Value::as_u64).collect::<Option<Vec<_>>>(),
            v => v.as_u64().map(|n| vec![n]),
        };
        ids.ok_or_else(err)?
            .into_iter()
            .map(|n| u32::try_from(n).map_err(|_| err()))
            .collect()
    }

    fn required<T>(&self, key: &str, v: Option<T>) -> Result<T> {
        v.ok_or_else(|| ConfigError::Missing(self.field(key)))
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            field: self.field(key),
            reason: reason.into(),
        }
    }

    /// Fails unless `key` is absent or one of `allowed`.
    fn one_of(&self, key: &str, allowed: &[&str]) -> Result<()> {
        match self.str(key)? {
            Some(s) if !allowed.contains(&s) => Err(self.invalid(
                key,
                format!("`{s}` is not supported (expected one of {allowed:?})"),
            )),
            _ => Ok(()),
        }
    }
}

impl Config {
    /// Reads `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> std::result::Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|source| ConfigFileError::Invalid {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_json(&value)
    }

    /// Reads a parsed `config.json` in the flat or the nested layout (see the module doc).
    pub fn from_json(value: &Value) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(ConfigError::Json(format!("the top level is {value}")));
        };
        let top = Obj {
            map,
            at: String::new(),
        };
        top.one_of("model_type", &["qwen2_vl"])?;
        let nested = top.object("text_config")?;
        let text_obj = nested.clone().unwrap_or_else(|| top.clone());
        let text = text_config(&text_obj)?;
        let vision = match top.object("vision_config")? {
            Some(v) => vision_config(&v)?,
            None => VisionConfig::default(),
        };
        if vision.hidden_size != text.hidden_size {
            return Err(ConfigError::Invalid {
                field: "vision_config.hidden_size".into(),
                reason: format!(
                    "the merger's output width {} must equal the text hidden_size {}",
                    vision.hidden_size, text.hidden_size
                ),
            });
        }
        let tied_inside = match &nested {
            Some(t) => t.bool("tie_word_embeddings")?.unwrap_or(false),
            None => false,
        };
        Ok(Self {
            text,
            vision,
            image_token_id: top.u32("image_token_id")?.unwrap_or(IMAGE_TOKEN_ID),
            video_token_id: top.u32("video_token_id")?.unwrap_or(VIDEO_TOKEN_ID),
            vision_start_token_id: top.u32("vision_start_token_id")?.unwrap_or(VISION_START_TOKEN_ID),
            vision_end_token_id: top.u32("vision_end_token_id")?.unwrap_or(VISION_END_TOKEN_ID),
            tie_word_embeddings: top.bool("tie_word_embeddings")?.unwrap_or(false) || tied_inside,
            // 5.x keeps these in text_config; flat files at the top level.
            bos_token_id: match text_obj.u32("bos_token_id")? {
                Some(id) => Some(id),
                None => top.u32("bos_token_id")?,
            },
            eos_token_id: match text_obj.u32_list("eos_token_id")? {
                ids if ids.is_empty() => top.u32_list("eos_token_id")?,
                ids => ids,
            },
            dtype: match top.str("torch_dtype")? {
                Some(s) => Some(s.to_string()),
                None => top.str("dtype")?.map(str::to_string),
            },
        })
    }

    /// The Hub's FLAT `config.json` (text keys at the top level,
    /// `rope_scaling: {"type": "mrope", ..}`, every vision field written out,
    /// with both the `in_channels` and the Hub's `in_chans` spelling), for
    /// transformers 4.4x-4.5x and 5.x alike. Checked by hand on the
    /// fixture's two models with this file as their `config.json`:
    /// transformers 5.25 (`qwen2_vl_fixture.py --check-saved`) gives logits
    /// identical to the reference, 4.50.3 (R1-SGG's pin) within 5e-6.
    pub fn to_hub_json(&self) -> Value {
        let (t, v) = (&self.text, &self.vision);
        let mut out = json!({
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": "silu",
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": t.mrope_section},
            "max_position_embeddings": t.max_position_embeddings,
            "use_sliding_window": false,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_config": {
                "model_type": "qwen2_vl",
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "hidden_size": v.hidden_size,
                "hidden_act": "quick_gelu",
                "mlp_ratio": v.mlp_ratio,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "in_chans": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "rope_theta": v.rope_theta,
            },
        });
        let obj = out
            .as_object_mut()
            .expect("json! of an object literal is an object");
        if let Some(id) = self.bos_token_id {
            obj.insert("bos_token_id".into(), json!(id));
        }
        match self.eos_token_id.as_slice() {
            [] => {}
            [id] => {
                obj.insert("eos_token_id".into(), json!(id));
            }
            ids => {
                obj.insert("eos_token_id".into(), json!(ids));
            }
        }
        if let Some(d) = &self.dtype {
            obj.insert("torch_dtype".into(), json!(d));
        }
        out
    }
}

fn positive(obj: &Obj, key: &str, v: usize) -> Result<usize> {
    if v == 0 {
        return Err(obj.invalid(key, "must be positive"));
    }
    Ok(v)
}

fn text_config(t: &Obj) -> Result<TextConfig> {
    t.one_of("model_type", &["qwen2_vl", "qwen2_vl_text"])?;
    t.one_of("hidden_act", &["silu"])?;
    if t.bool("use_sliding_window")? == Some(true) {
        return Err(t.invalid("use_sliding_window", "sliding-window attention is not supported"));
    }
    if t.f64("attention_dropout")?.is_some_and(|p| p != 0.0) {
        return Err(t.invalid("attention_dropout", "attention dropout is not supported"));
    }
    let req = |key: &str| -> Result<usize> { positive(t, key, t.required(key, t.usize(key)?)?) };
    let rope = text_rope(t)?;
    let cfg = TextConfig {
        vocab_size: req("vocab_size")?,
        hidden_size: req("hidden_size")?,
        intermediate_size: req("intermediate_size")?,
        num_hidden_layers: req("num_hidden_layers")?,
        num_attention_heads: req("num_attention_heads")?,
        num_key_value_heads: req("num_key_value_heads")?,
        rms_norm_eps: t.required("rms_norm_eps", t.f64("rms_norm_eps")?)?,
        rope_theta: rope.theta,
        mrope_section: rope.section,
        // The 2B's and the 7B's value (and transformers' default).
        max_position_embeddings: t.usize("max_position_embeddings")?.unwrap_or(32_768),
    };
    if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(t.invalid(
            "num_attention_heads",
            format!(
                "{} does not divide hidden_size {}",
                cfg.num_attention_heads, cfg.hidden_size
            ),
        ));
    }
    if !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
        return Err(t.invalid(
            "num_key_value_heads",
            format!(
                "{} does not divide num_attention_heads {}",
                cfg.num_key_value_heads, cfg.num_attention_heads
            ),
        ));
    }
    if !cfg.rms_norm_eps.is_finite() || cfg.rms_norm_eps < 0.0 {
        return Err(t.invalid(
            "rms_norm_eps",
            format!("{} is not a non-negative number", cfg.rms_norm_eps),
        ));
    }
    let (half, sum) = (cfg.head_dim() / 2, cfg.mrope_section.iter().sum::<usize>());
    if !cfg.head_dim().is_multiple_of(2) || sum != half {
        return Err(ConfigError::Invalid {
            field: rope.section_field,
            reason: format!(
                "{:?} sums to {sum}, but head_dim {} needs {half} (head_dim / 2)",
                cfg.mrope_section,
                cfg.head_dim()
            ),
        });
    }
    Ok(cfg)
}

/// The text rotary embedding's parameters, and where the section was read.
struct TextRope {
    theta: f64,
    section: Vec<usize>,
    section_field: String,
}

/// Reads `rope_scaling` (flat; wins when both are present, as in transformers)
/// or `rope_parameters` (5.x), and `rope_theta` from inside it or beside it.
fn text_rope(t: &Obj) -> Result<TextRope> {
    let params = match t.object("rope_scaling")? {
        Some(p) => p,
        None => match t.object("rope_parameters")? {
            Some(p) => p,
            None => {
                let key = if t.at.is_empty() {
                    "rope_scaling"
                } else {
                    "rope_parameters"
                };
                return Err(ConfigError::Missing(t.field(&format!("{key}.mrope_section"))));
            }
        },
    };
    let kind_key = if params.get("rope_type").is_some() {
        "rope_type"
    } else {
        "type"
    };
    params.one_of(kind_key, &["mrope", "default"])?;
    let section = params.required("mrope_section", params.usize_list("mrope_section")?)?;
    let theta = match params.f64("rope_theta")? {
        Some(th) => th,
        None => t.required("rope_theta", t.f64("rope_theta")?)?,
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(t.invalid("rope_theta", format!("{theta} is not a positive number")));
    }
    Ok(TextRope {
        theta,
        section,
        section_field: params.field("mrope_section"),
    })
}

fn vision_config(v: &Obj) -> Result<VisionConfig> {
    v.one_of("model_type", &["qwen2_vl", "qwen2_vl_vision"])?;
    v.one_of("hidden_act", &["quick_gelu"])?;
    let d = VisionConfig::default();
    let get =
        |key: &str, default: usize| -> Result<usize> { positive(v, key, v.usize(key)?.unwrap_or(default)) };
    let in_channels = match v.usize("in_channels")? {
        Some(n) => n,
        None => v.usize("in_chans")?.unwrap_or(d.in_channels),
    };
    let rope_theta = match v.object("rope_parameters")? {
        Some(p) => {
            p.one_of("rope_type", &["axial"])?;
            p.f64("rope_theta")?
        }
        None => v.f64("rope_theta")?,
    }
    .unwrap_or(d.rope_theta);
    let cfg = VisionConfig {
        depth: get("depth", d.depth)?,
        embed_dim: get("embed_dim", d.embed_dim)?,
        hidden_size: get("hidden_size", d.hidden_size)?,
        num_heads: get("num_heads", d.num_heads)?,
        mlp_ratio: get("mlp_ratio", d.mlp_ratio)?,
        in_channels: positive(v, "in_channels", in_channels)?,
        patch_size: get("patch_size", d.patch_size)?,
        spatial_merge_size: get("spatial_merge_size", d.spatial_merge_size)?,
        temporal_patch_size: get("temporal_patch_size", d.temporal_patch_size)?,
        rope_theta,
    };
    // The 2-D rotary embedding gives each of h and w head_dim / 4 frequencies.
    if !cfg.embed_dim.is_multiple_of(cfg.num_heads) || !cfg.head_dim().is_multiple_of(4) {
        return Err(v.invalid(
            "num_heads",
            format!(
                "embed_dim {} / num_heads {} must be a whole multiple of 4",
                cfg.embed_dim, cfg.num_heads
            ),
        ));
    }
    if !(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0) {
        return Err(v.invalid("rope_theta", "must be a positive number"));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen/Qwen2-VL-2B-Instruct's config.json (the minimal vision_config
    /// variant, as in QWEN2VL.md §1).
    const HUB_2B: &str = r#"{
      "architectures": ["Qwen2VLForConditionalGeneration"],
      "attention_dropout": 0.0,
      "bos_token_id": 151643,
      "eos_token_id": 151645,
      "vision_start_token_id": 151652,
      "vision_end_token_id": 151653,
      "vision_token_id": 151654,
      "image_token_id": 151655,
      "video_token_id": 151656,
      "hidden_act": "silu",
      "hidden_size": 1536,
      "initializer_range": 0.02,
      "intermediate_size": 8960,
      "max_position_embeddings": 32768,
      "max_window_layers": 28,
      "model_type": "qwen2_vl",
      "num_attention_heads": 12,
      "num_hidden_layers": 28,
      "num_key_value_heads": 2,
      "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0,
      "sliding_window": 32768,
      "tie_word_embeddings": true,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.45.0.dev0",
      "use_cache": true,
      "use_sliding_window": false,
      "vision_config": {"hidden_size": 1536, "in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
      "vocab_size": 151936
    }"#;

    /// Qwen/Qwen2-VL-7B-Instruct's (no vision hidden_size: the default 3584).
    const HUB_7B: &str = r#"{
      "architectures": ["Qwen2VLForConditionalGeneration"],
      "attention_dropout": 0.0,
      "bos_token_id": 151643,
      "eos_token_id": 151645,
      "vision_start_token_id": 151652,
      "vision_end_token_id": 151653,
      "vision_token_id": 151654,
      "image_token_id": 151655,
      "video_token_id": 151656,
      "hidden_act": "silu",
      "hidden_size": 3584,
      "initializer_range": 0.02,
      "intermediate_size": 18944,
      "max_position_embeddings": 32768,
      "max_window_layers": 28,
      "model_type": "qwen2_vl",
      "num_attention_heads": 28,
      "num_hidden_layers": 28,
      "num_key_value_heads": 4,
      "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0,
      "sliding_window": 32768,
      "tie_word_embeddings": false,
      "torch_dtype": "bfloat16",
      "use_cache": true,
      "use_sliding_window": false,
      "vision_config": {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
      "vocab_size": 152064
    }"#;

    /// What transformers 5.x `save_pretrained` writes (the tiny fixture model's shape).
    const NESTED_5X: &str = r#"{
      "architectures": ["Qwen2VLForConditionalGeneration"],
      "model_type": "qwen2_vl",
      "dtype": "float32",
      "image_token_id": 1012,
      "video_token_id": 1013,
      "vision_start_token_id": 1009,
      "vision_end_token_id": 1010,
      "tie_word_embeddings": false,
      "text_config": {
        "model_type": "qwen2_vl_text",
        "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "rms_norm_eps": 1e-06, "max_position_embeddings": 4096,
        "use_sliding_window": false, "sliding_window": null, "attention_dropout": 0.0,
        "bos_token_id": 1000, "eos_token_id": 1002, "pad_token_id": null,
        "layer_types": ["full_attention", "full_attention"],
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}
      },
      "vision_config": {
        "model_type": "qwen2_vl_vision", "depth": 2, "embed_dim": 32, "hidden_size": 64,
        "hidden_act": "quick_gelu", "mlp_ratio": 4, "num_heads": 4, "in_channels": 3,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "initializer_range": 0.02, "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}
      }
    }"#;

    fn parse(s: &str) -> Config {
        Config::from_json_str(s).unwrap()
    }

    fn edit(s: &str, f: impl FnOnce(&mut Value)) -> Result<Config> {
        let mut v: Value = serde_json::from_str(s).unwrap();
        f(&mut v);
        Config::from_json(&v)
    }

    fn field_of(e: ConfigError) -> String {
        match e {
            ConfigError::Missing(f) => f,
            ConfigError::Type { field, .. } | ConfigError::Invalid { field, .. } => field,
            ConfigError::Json(s) => panic!("expected a field error, got Json({s})"),
        }
    }

    #[test]
    fn hub_2b_minimal_vision_config() {
        let c = parse(HUB_2B);
        let t = &c.text;
        assert_eq!(
            (
                t.vocab_size,
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers
            ),
            (151_936, 1536, 8960, 28)
        );
        assert_eq!(
            (t.num_attention_heads, t.num_key_value_heads, t.head_dim()),
            (12, 2, 128)
        );
        assert_eq!((t.rms_norm_eps, t.rope_theta), (1e-6, 1e6));
        assert_eq!(t.mrope_section, vec![16, 24, 24]);
        assert!(c.tie_word_embeddings);
        assert_eq!(
            c.vision,
            VisionConfig {
                hidden_size: 1536,
                ..VisionConfig::default()
            }
        );
        assert_eq!((c.vision.patch_dim(), c.vision.head_dim()), (1176, 80));
        assert_eq!(
            (
                c.image_token_id,
                c.vision_start_token_id,
                c.vision_end_token_id,
                c.video_token_id
            ),
            (151_655, 151_652, 151_653, 151_656)
        );
        assert_eq!(
            (c.bos_token_id, c.eos_token_id.clone()),
            (Some(151_643), vec![151_645])
        );
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn hub_7b_takes_the_default_vision_width() {
        let c = parse(HUB_7B);
        assert_eq!(
            (c.text.hidden_size, c.text.num_key_value_heads, c.text.vocab_size),
            (3584, 4, 152_064)
        );
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.vision, VisionConfig::default());
    }

    #[test]
    fn full_vision_config_with_hub_spellings() {
        // transformers 4.41-era copies (e.g. lightonai/MonoQwen2-VL-v0.1) write every field.
        let c = edit(HUB_2B, |v| {
            v["vision_config"] = json!({"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                "in_chans": 3, "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
                "spatial_patch_size": 14, "temporal_patch_size": 2, "model_type": "qwen2_vl"});
        })
        .unwrap();
        assert_eq!(c, parse(HUB_2B));
        // `in_channels` wins over the `in_chans` alias when both are present.
        let c = edit(HUB_2B, |v| {
            v["vision_config"]["in_chans"] = json!(1);
            v["vision_config"]["in_channels"] = json!(3);
        })
        .unwrap();
        assert_eq!(c.vision.in_channels, 3);
        let c = edit(HUB_2B, |v| v["vision_config"]["in_chans"] = json!(1)).unwrap();
        assert_eq!(c.vision.in_channels, 1);
    }

    #[test]
    fn nested_5x_layout() {
        let c = parse(NESTED_5X);
        let t = &c.text;
        assert_eq!(
            (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.head_dim()),
            (1024, 64, 2, 16)
        );
        assert_eq!(
            (t.mrope_section.clone(), t.rope_theta, t.max_position_embeddings),
            (vec![2, 3, 3], 1e6, 4096)
        );
        let v = &c.vision;
        assert_eq!(
            (v.depth, v.embed_dim, v.hidden_size, v.num_heads, v.head_dim()),
            (2, 32, 64, 4, 8)
        );
        assert_eq!((c.image_token_id, c.vision_start_token_id), (1012, 1009));
        assert_eq!((c.bos_token_id, c.eos_token_id.clone()), (Some(1000), vec![1002]));
        assert_eq!(c.dtype.as_deref(), Some("float32"));
        assert!(!c.tie_word_embeddings);
        // Pre-v5 nested saves kept the tie flag inside text_config.
        let c = edit(NESTED_5X, |v| {
            v["text_config"]["tie_word_embeddings"] = json!(true)
        })
        .unwrap();
        assert!(c.tie_word_embeddings);
        // rope_scaling (type mrope) inside text_config, rope_theta beside it.
        let c = edit(NESTED_5X, |v| {
            let t = v["text_config"].as_object_mut().unwrap();
            t.remove("rope_parameters");
            t.insert(
                "rope_scaling".into(),
                json!({"type": "mrope", "mrope_section": [2, 3, 3]}),
            );
            t.insert("rope_theta".into(), json!(5e5));
        })
        .unwrap();
        assert_eq!((c.text.rope_theta, c.text.mrope_section), (5e5, vec![2, 3, 3]));
    }

    #[test]
    fn nested_text_config_wins_over_top_level_keys() {
        let c = edit(NESTED_5X, |v| v["hidden_size"] = json!(4096)).unwrap();
        assert_eq!(c.text.hidden_size, 64);
    }

    #[test]
    fn round_trip_through_the_hub_layout() {
        for s in [HUB_2B, HUB_7B, NESTED_5X] {
            let c = parse(s);
            let hub = c.to_hub_json();
            assert!(hub.get("text_config").is_none(), "flat layout");
            assert_eq!(hub["rope_scaling"]["type"], "mrope");
            assert_eq!(hub["vision_config"]["depth"], json!(c.vision.depth));
            assert_eq!(Config::from_json(&hub).unwrap(), c);
        }
    }

    #[test]
    fn missing_text_fields_name_the_field() {
        for key in [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
        ] {
            let e = edit(HUB_2B, |v| {
                v.as_object_mut().unwrap().remove(key);
            })
            .unwrap_err();
            assert!(matches!(&e, ConfigError::Missing(f) if f == key), "{key}: {e}");
        }
        let e = edit(NESTED_5X, |v| {
            v["text_config"].as_object_mut().unwrap().remove("hidden_size");
        })
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::Missing(f) if f == "text_config.hidden_size"),
            "{e}"
        );
        let e = edit(HUB_2B, |v| {
            v.as_object_mut().unwrap().remove("rope_scaling");
        })
        .unwrap_err();
        assert_eq!(field_of(e), "rope_scaling.mrope_section");
        let e = edit(NESTED_5X, |v| {
            v["text_config"]["rope_parameters"]
                .as_object_mut()
                .unwrap()
                .remove("rope_theta");
        })
        .unwrap_err();
        assert_eq!(field_of(e), "text_config.rope_theta");
    }

    /// A change to a config's JSON.
    type Edit = Box<dyn FnOnce(&mut Value)>;

    #[test]
    fn bad_values_name_the_field() {
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|v| v["model_type"] = json!("qwen2_5_vl")), "model_type"),
            (
                Box::new(|v| v["vision_config"]["model_type"] = json!("qwen2_5_vl")),
                "vision_config.model_type",
            ),
            (Box::new(|v| v["hidden_size"] = json!("1536")), "hidden_size"),
            (
                Box::new(|v| v["num_hidden_layers"] = json!(-1)),
                "num_hidden_layers",
            ),
            (
                Box::new(|v| v["num_attention_heads"] = json!(0)),
                "num_attention_heads",
            ),
            (
                Box::new(|v| v["num_attention_heads"] = json!(7)),
                "num_attention_heads",
            ),
            (
                Box::new(|v| v["num_key_value_heads"] = json!(5)),
                "num_key_value_heads",
            ),
            (
                Box::new(|v| v["rope_scaling"]["mrope_section"] = json!([16, 24, 23])),
                "rope_scaling.mrope_section",
            ),
            (
                Box::new(|v| v["rope_scaling"]["mrope_section"] = json!("16,24,24")),
                "rope_scaling.mrope_section",
            ),
            (
                Box::new(|v| v["rope_scaling"]["type"] = json!("yarn")),
                "rope_scaling.type",
            ),
            (Box::new(|v| v["hidden_act"] = json!("gelu")), "hidden_act"),
            (
                Box::new(|v| v["use_sliding_window"] = json!(true)),
                "use_sliding_window",
            ),
            (
                Box::new(|v| v["tie_word_embeddings"] = json!("yes")),
                "tie_word_embeddings",
            ),
            (
                Box::new(|v| v["image_token_id"] = json!(1u64 << 40)),
                "image_token_id",
            ),
            (
                Box::new(|v| v["vision_config"]["hidden_size"] = json!(3584)),
                "vision_config.hidden_size",
            ),
            (
                Box::new(|v| v["vision_config"]["num_heads"] = json!(12)),
                "vision_config.num_heads",
            ),
            (
                Box::new(|v| v["vision_config"]["depth"] = json!(2.5)),
                "vision_config.depth",
            ),
            (
                Box::new(|v| v["vision_config"]["hidden_act"] = json!("gelu")),
                "vision_config.hidden_act",
            ),
            (Box::new(|v| v["vision_config"] = json!([1, 2])), "vision_config"),
        ];
        for (f, field) in cases {
            let e = edit(HUB_2B, f).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
            assert_eq!(field_of(e), field);
        }
        assert!(matches!(Config::from_json_str("{"), Err(ConfigError::Json(_))));
        assert!(matches!(Config::from_json_str("[]"), Err(ConfigError::Json(_))));
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("qwen2vl-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, HUB_2B.replace("\"hidden_size\": 1536,\n", "")).unwrap();
        let e = Config::from_file(&path).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("config.json") && msg.contains("`hidden_size`"),
            "{msg}"
        );
        assert!(matches!(
            e,
            ConfigFileError::Invalid {
                source: ConfigError::Missing(_),
                ..
            }
        ));
        let e = Config::from_file(&dir.join("absent.json")).unwrap_err();
        assert!(matches!(e, ConfigFileError::Read { .. }), "{e}");
        std::fs::write(&path, HUB_2B).unwrap();
        assert_eq!(Config::from_file(&path).unwrap(), parse(HUB_2B));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
