//! R1-SGG's two stages on candle, with this crate's ops doing the GRPO math:
//!
//! - **SFT**: teacher-forced cross-entropy on the serialized scene graph,
//!   the token log-probs computed straight from the last hidden states and
//!   the LM head by [`fused_linear_logprobs`](grpo_kernels::candle::fused_linear_logprobs) (no `[B, T, V]` logits).
//! - **GRPO**: `G` completions per image sampled with a KV cache and the
//!   fused sampler ([`sample`](grpo_kernels::candle::sample): temperature, top-k, top-p, Philox keyed by
//!   seed and step), scored by the graph rewards (format, node, edge),
//!   group-normalized advantages ([`group_advantages`](grpo_kernels::group_advantages)), and the clipped
//!   policy loss ([`policy_loss`](grpo_kernels::candle::policy_loss())) back through the fused log-probs.
//!
//! [`sft`], [`grpo`], [`rollout`] (sampling completions with a KV cache),
//! [`batch`] (images and token rows as tensors, the fused log-probs),
//! [`optim`] (AdamW with saveable moments), [`checkpoint`] (resumable
//! files) and [`session`] (one invocation's model, data and hooks).

use candle_core::{DType, Result, Tensor};
use candle_nn::{ParamsAdamW, VarMap};
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::format::AnswerForm;
use crate::data::Sample;
use crate::model::tiny_tokenizer::Tokenizer;
use crate::model::Vlm;
use crate::util::rng::Rng;
use optim::AdamW;

pub mod batch;
pub mod checkpoint;
pub mod grpo;
pub mod optim;
pub mod rollout;
pub mod session;
pub mod sft;

/// The answer form the example trains and scores: `<answer>` JSON, no think block.
pub const FORM: AnswerForm = AnswerForm::Relaxed;

/// A progress bar with the example's style.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>5} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Gradients are rescaled to at most this global L2 norm (TRL's default).
pub(crate) const MAX_GRAD_NORM: f64 = 1.0;

/// One optimizer step on `loss` with the gradients clipped to a global L2
/// norm of `max_norm`; a non-finite loss or gradient skips the step (and
/// returns false) rather than writing NaN into the weights.
pub(crate) fn clipped_step(opt: &mut AdamW, vars: &VarMap, loss: &Tensor, max_norm: f64) -> Result<bool> {
    let mut grads = loss.backward()?;
    let mut sq = 0.0f64;
    for v in vars.all_vars() {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if !norm.is_finite() || !loss.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
        return Ok(false);
    }
    if norm > max_norm {
        let scale = max_norm / norm;
        for v in vars.all_vars() {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    opt.step(&grads)?;
    Ok(true)
}

/// AdamW over every variable, without weight decay (its moments are saved
/// in checkpoints, so a resumed run continues where it stopped).
pub fn adamw(vars: &VarMap, lr: f64) -> Result<AdamW> {
    AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
}

/// What both training stages work on: the model, its variables, the
/// tokenizer and the training samples.
#[derive(Clone, Copy)]
pub struct Learner<'a> {
    pub model: &'a Vlm,
    pub vars: &'a VarMap,
    pub tok: &'a Tokenizer,
    pub train: &'a [Sample],
}

/// What the training loops report after each optimizer step, and how the
/// caller (the CLI: metrics file, checkpoints, Ctrl-C, periodic evaluation)
/// tells them to stop.
pub trait Hooks {
    /// Called after step `step` of `stage` with its log line; `Ok(false)`
    /// stops the loop (the caller has saved what it needs).
    fn after_step(
        &mut self,
        stage: &str,
        step: usize,
        record: serde_json::Value,
        opt: &AdamW,
    ) -> Result<bool>;
}

/// A uniformly chosen sample.
pub(crate) fn pick<'a>(rng: &mut Rng, samples: &'a [Sample]) -> &'a Sample {
    &samples[(rng.next_u64() % samples.len() as u64) as usize]
}
