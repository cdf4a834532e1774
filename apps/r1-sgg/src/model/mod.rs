//! The models R1-SGG trains.
//!
//! - [`tiny_vlm`]: the demo's small vision-language model (trained from
//!   scratch on the synthetic scenes in minutes on a CPU) and
//!   [`tiny_tokenizer`], its closed-vocabulary tokenizer;
//! - [`init`]: seeded weight initialization.

pub mod init;
pub mod tiny_tokenizer;
pub mod tiny_vlm;

pub use init::SeededVars;
pub use tiny_vlm::{KvCache, NumberTokens, PixelStem, Vlm, VlmConfig};
