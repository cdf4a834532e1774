//! R1-SGG ("Compile Scene Graphs with Reinforcement Learning", Chen et al.,
//! 2025) on candle with grpo-kernels: a vision-language model learns to
//! write an image's scene graph (objects with boxes, relation triplets) as
//! JSON, by supervised fine-tuning and then GRPO with the graph rewards.
//!
//! ```text
//! cargo run --release -p r1-sgg -- demo
//! cargo run --release -p r1-sgg -- --help
//! ```
//!
//! `demo` runs everything on synthetic scenes (shapes and their spatial
//! relations; no download): SFT, evaluation, GRPO, evaluation on the
//! validation, test and shifted splits, and writes to `runs/demo/` the
//! checkpoints (weights and optimizer state, `model.json`,
//! `tokenizer.json`), metrics (`sft.jsonl`, `grpo.jsonl`, `eval.jsonl`),
//! charts (PNG), pictures of
//! predictions and a summary. `data` writes the synthetic dataset to disk
//! in R1-SGG's layout; `sft`, `grpo` and `eval` run one stage, on the
//! synthetic data or on real data in R1-SGG's layouts: the parquet shards
//! its authors publish or a JSONL export (`--data train-*.parquet`,
//! `--data train.jsonl`; see `data::source`). Ctrl-C saves a
//! checkpoint and stops; `--resume` continues an interrupted stage. With
//! `--features cuda` and `--device cuda` the same code trains on a
//! GPU, and the crate's ops run as CUDA kernels.

pub mod cli;
pub mod data;
pub mod eval;
pub mod hf;
pub mod model;
pub mod report;
pub mod reward;
pub mod train;
pub mod util;
