//! Qwen2-VL (`Qwen2VLForConditionalGeneration`, transformers
//! `models/qwen2_vl/modeling_qwen2_vl.py` 5.25.0) on candle.
//!
//! Layout as candle's `qwen3_vl`: [`config`] (HF `config.json`) and
//! [`rope`] (the M-RoPE position ids of a prompt with images).

pub mod config;
pub mod rope;

pub use config::{Config, ConfigError, ConfigFileError, TextConfig, VisionConfig};
pub use rope::{get_rope_index, RopeError, RopeIndex};
