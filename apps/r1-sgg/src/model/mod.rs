//! The models R1-SGG trains.
//!
//! - [`qwen2_vl`]: Qwen2-VL as transformers implements it, trainable, loaded
//!   from and saved to Hugging Face checkpoints ([`crate::hf`]);
//! - [`tiny_vlm`]: the demo's small vision-language model (trained from
//!   scratch on the synthetic scenes in minutes on a CPU) and
//!   [`tiny_tokenizer`], its closed-vocabulary tokenizer;
//! - [`init`]: seeded weight initialization (and zero placeholders for a
//!   checkpoint to fill).
//!
//! **Why two models.** The demo's model is not a small configuration of
//! [`qwen2_vl`]. Its measured recall (the demo's table in the crate's
//! README, five sweeps and three seeds) rests on two things Qwen2-VL does not
//! have: the box-coordinate token rows that share a smooth cosine component
//! ([`tiny_vlm::NumberTokens`]), and `[B, 3, S, S]` images with a one-token
//! prompt. The training loops drive either through one interface
//! ([`crate::train::policy::Policy`]); a Qwen2-VL configuration of the
//! demo's size trained on the same data (`sft --model`) can now be compared
//! with it, and replace it if its recall holds.

pub mod init;
pub mod qwen2_vl;
pub mod tiny_tokenizer;
pub mod tiny_vlm;

pub use init::SeededVars;
pub use tiny_vlm::{KvCache, NumberTokens, PixelStem, Vlm, VlmConfig};
