//! The one interface through which SFT, GRPO, rollouts and evaluation drive
//! a model: [`Policy`]. Two models implement it: the demo's tiny VLM
//! ([`TinyPolicy`], trained from scratch on the synthetic scenes) and a
//! Hugging Face Qwen2-VL checkpoint ([`QwenPolicy`], R1-SGG's model, with its
//! chat template, processor and R1-SGG's prompts).

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor};
use candle_nn::VarMap;
use grpo_kernels::SamplingConfig;

use crate::data::format::AnswerForm;
use crate::data::scene::SceneGraph;
use crate::data::Sample;

mod qwen;
mod tiny;

pub use qwen::{rollout as qwen_rollout, QwenOptions, QwenPolicy, TRAINER_STATE};
pub use tiny::TinyPolicy;

/// Which target tokens the SFT loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossOn {
    /// The answer's tokens (through the end-of-turn token): the usual choice
    /// (TRL's `assistant_only_loss`).
    Answer,
    /// Every token of the chat but padding and the vision markers and image
    /// pads, the prompt included: R1-SGG's SFT (`src/sft_sgg.py`, its
    /// collator sets only pad and ids 151652, 151653, 151655 to -100).
    All,
}

/// What the training loops, rollouts and evaluation need from a model.
///
/// A batch is given as samples (image and scene graph) and token rows; each
/// model builds its own prompt for a sample (the demo's image and task
/// token; Qwen2-VL's chat with R1-SGG's prompts through its template and
/// processor).
pub trait Policy {
    /// Where the model runs.
    fn device(&self) -> &Device;

    /// Every weight, by name.
    fn vars(&self) -> &VarMap;

    /// Whether the weight `name` is trained (false for a frozen part).
    fn is_trainable(&self, name: &str) -> bool;

    /// The answer form the model is prompted for (the format reward's).
    fn answer_form(&self) -> AnswerForm;

    /// The SFT target of `graph` as the tokens the model should generate,
    /// through its end token.
    fn answer_tokens(&self, graph: &SceneGraph) -> Result<Vec<u32>>;

    /// The text of generated tokens (special tokens dropped).
    fn decode(&self, ids: &[u32]) -> Result<String>;

    /// Teacher-forced log-probs of `completions[i]` after the prompt of
    /// `samples[i]` under the logits divided by `temperature`, from the
    /// fused LM-head op, differentiable in the weights: `(logp, mask)`.
    /// With [`LossOn::Answer`] both are `[B, C]`, column `j` the `j`-th
    /// completion token (`C` the longest completion; the mask U8 is 1 on
    /// real tokens): the layout of GRPO's policy loss. With [`LossOn::All`]
    /// they cover every target of the chat (prompt included) and the mask
    /// picks the ones R1-SGG trains on. Consecutive repeats of a sample
    /// (GRPO's group) may share its image's encoding.
    fn logprobs(
        &self,
        samples: &[&Sample],
        completions: &[Vec<u32>],
        on: LossOn,
        temperature: f32,
    ) -> Result<(Tensor, Tensor)>;

    /// `group` completions of each sample (rows `i * group ..`), sampled by
    /// the fused sampler with `sampling` (its `step` keys the generation),
    /// each up to and including its end token or `max_new` tokens long.
    fn generate(
        &self,
        samples: &[&Sample],
        group: usize,
        max_new: usize,
        sampling: &SamplingConfig,
    ) -> Result<Vec<Vec<u32>>>;

    /// The gradients of `loss` for every weight (checkpointed blocks
    /// included: their weight gradients are collected from the side store
    /// that candle's `backward` does not see).
    fn backward(&self, loss: &Tensor) -> Result<GradStore>;

    /// A frozen copy of the model GRPO started from, for the KL term's
    /// reference log-probs.
    fn reference(&self) -> Result<Box<dyn Policy>>;
}
