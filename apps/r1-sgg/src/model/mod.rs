//! The models R1-SGG trains.
//!
//! - [`qwen2_vl`]: Qwen2-VL as transformers implements it, trainable, loaded
//!   from and saved to Hugging Face checkpoints ([`crate::hf`]);
//! - [`tiny_vlm`]: the demo's small vision-language model (trained from
//!   scratch on the synthetic scenes in minutes on a CPU) and
//!   [`tiny_tokenizer`], its closed-vocabulary tokenizer;
//! - [`init`]: seeded weight initialization.

pub mod init;
pub mod qwen2_vl;
pub mod tiny_tokenizer;
pub mod tiny_vlm;

pub use init::SeededVars;
pub use tiny_vlm::{KvCache, NumberTokens, PixelStem, Vlm, VlmConfig};
