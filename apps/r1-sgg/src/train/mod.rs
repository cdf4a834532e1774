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

use candle_core::backprop::GradStore;
use candle_core::{DType, Result};
use candle_nn::ParamsAdamW;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::format::AnswerForm;
use crate::data::stream::TrainSet;
use optim::AdamW;
use policy::Policy;

pub mod batch;
pub mod checkpoint;
pub mod grpo;
pub mod optim;
pub mod policy;
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

/// The gradients of one optimizer step, summed over its micro-batches
/// (gradient accumulation): only the optimized variables' are kept.
#[derive(Default)]
pub(crate) struct Accumulated {
    grads: Option<GradStore>,
    finite: bool,
}

impl Accumulated {
    /// Adds one micro-batch's gradients, from a loss whose value was `loss`.
    pub(crate) fn add(&mut self, opt: &AdamW, mut grads: GradStore, loss: f64) -> Result<()> {
        let finite = loss.is_finite() && (self.grads.is_none() || self.finite);
        self.finite = finite;
        match &mut self.grads {
            None => self.grads = Some(grads),
            Some(sum) => {
                for var in opt.vars() {
                    if let Some(g) = grads.remove(var.as_tensor()) {
                        let total = match sum.remove(var.as_tensor()) {
                            Some(s) => (s + g)?,
                            None => g,
                        };
                        sum.insert(var.as_tensor(), total);
                    }
                }
            }
        }
        Ok(())
    }
}

/// One optimizer step with the accumulated gradients, clipped to a global
/// L2 norm of `max_norm` over the optimized variables; a non-finite loss or
/// gradient skips the step (and returns false) rather than writing NaN into
/// the weights.
pub(crate) fn clipped_step(opt: &mut AdamW, acc: Accumulated, max_norm: f64) -> Result<bool> {
    let Some(mut grads) = acc.grads else {
        return Ok(false);
    };
    let mut sq = 0.0f64;
    for var in opt.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if !norm.is_finite() || !acc.finite {
        return Ok(false);
    }
    if norm > max_norm {
        let scale = max_norm / norm;
        for var in opt.vars() {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    opt.step(&grads)?;
    Ok(true)
}

/// AdamW over the trainable variables of `policy`, without weight decay,
/// with f32 master weights of the non-f32 ones when `master_weights` (its
/// moments and master weights are saved in checkpoints, so a resumed run
/// continues where it stopped).
pub fn adamw(policy: &dyn Policy, lr: f64, master_weights: bool) -> Result<AdamW> {
    AdamW::new(
        policy.vars(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
        |name| policy.is_trainable(name),
        master_weights,
    )
}

/// The learning rate's shape over a stage, as a factor of the peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Linear warmup over the first 5% of steps, then cosine decay to 10%
    /// (the demo's SFT).
    WarmupCosine,
    /// Linear warmup over the first `warmup` fraction of steps (at least
    /// one step when above 0), then constant (the demo's GRPO, 10%).
    WarmupConstant {
        /// Fraction of the steps.
        warmup: f64,
    },
    /// Linear warmup over the first `warmup` fraction of steps, then linear
    /// decay to 0: transformers' default `linear` schedule with
    /// `warmup_ratio` (R1-SGG's SFT: 0.05; GRPO: 0).
    WarmupLinear {
        /// Fraction of the steps.
        warmup: f64,
    },
}

impl Schedule {
    /// The factor at step `step` of `steps`.
    pub fn factor(self, step: usize, steps: usize) -> f64 {
        match self {
            Schedule::WarmupCosine => {
                let warmup = (steps / 20).max(1);
                if step < warmup {
                    (step + 1) as f64 / warmup as f64
                } else {
                    let t = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
                    0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
            Schedule::WarmupConstant { warmup } => {
                let warmup = ((steps as f64 * warmup) as usize).max(1);
                ((step + 1) as f64 / warmup as f64).min(1.0)
            }
            Schedule::WarmupLinear { warmup } => {
                // transformers' get_linear_schedule_with_warmup, with
                // warmup steps = ceil(ratio * steps).
                let warmup = (steps as f64 * warmup).ceil() as usize;
                if step < warmup {
                    step as f64 / warmup as f64
                } else {
                    ((steps - step) as f64 / (steps - warmup).max(1) as f64).max(0.0)
                }
            }
        }
    }
}

/// What both training stages work on: the model and the training set,
/// drawn from a batch at a time.
#[derive(Clone, Copy)]
pub struct Learner<'a> {
    pub policy: &'a dyn Policy,
    pub train: &'a TrainSet,
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
