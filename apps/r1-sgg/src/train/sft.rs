//! Supervised fine-tuning: teacher-forced cross-entropy on the serialized
//! scene graph, from the fused log-probs, with gradient accumulation.

use std::time::Instant;

use candle_core::{DType, Result};

use super::optim::AdamW;
use super::policy::LossOn;
use super::{clipped_step, progress, Accumulated, Hooks, Learner, Schedule};
use crate::data::format::augment;
use crate::data::Sample;
use crate::util::rng::Rng;

/// How SFT answers are varied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Augment {
    /// Objects and relations as the data lists them.
    None,
    /// Every answer's objects and relations shuffled, the objects
    /// renumbered (the demo's `--shuffle`).
    Always,
    /// R1-SGG's (`src/sft_sgg.py` `Collator`): from a sample's second visit
    /// on, with probability 0.5, its objects shuffled and renumbered, the
    /// relations renamed in their order. A sample's visits are its epoch
    /// when the training set is streamed in epochs (so they survive
    /// `--resume`), else counted in this process (as R1-SGG's collator does).
    R1Sgg,
}

/// Settings of the SFT stage.
#[derive(Debug, Clone)]
pub struct SftConfig {
    pub steps: usize,
    /// Samples per optimizer step.
    pub batch: usize,
    /// Micro-batches per step (`batch` divided evenly): each runs forward
    /// and backward alone and their gradients add up.
    pub accumulate: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    /// Gradients are clipped to this global L2 norm.
    pub max_grad_norm: f64,
    pub seed: u64,
    pub augment: Augment,
    /// Train on the objects alone (empty relationship lists): the starting
    /// point of the R1-SGG-Zero setting, a model that has never seen a
    /// relation before GRPO.
    pub objects_only: bool,
    /// Which tokens the loss covers.
    pub loss_on: LossOn,
}

/// Supervised fine-tuning on `train` (drawn `batch` samples a step,
/// positioned for step `start`; answers optionally augmented, see
/// [`Augment`]), steps `start..steps` with `opt` (fresh, or restored from a
/// checkpoint); each step's `{"loss", "tokens", "lr", "seconds"}` (answer
/// tokens trained on, the step's wall time) goes to `hooks`.
///
/// The loss of a micro-batch is the mean over its target tokens; with
/// accumulation, the step's loss is the mean of its micro-batches' (what
/// R1-SGG's data-parallel SFT optimizes: each device's token mean, averaged
/// over devices).
pub fn sft(
    learner: Learner<'_>,
    cfg: &SftConfig,
    opt: &mut AdamW,
    start: usize,
    hooks: &mut dyn Hooks,
) -> Result<()> {
    let Learner { policy, train } = learner;
    if cfg.accumulate == 0 || !cfg.batch.is_multiple_of(cfg.accumulate) {
        candle_core::bail!(
            "SFT: a batch of {} does not split into {} micro-batches",
            cfg.batch,
            cfg.accumulate
        );
    }
    let micro = cfg.batch / cfg.accumulate;
    let bar = progress(cfg.steps as u64, "SFT");
    bar.set_position(start as u64);
    let mut rng = Rng::new(cfg.seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    train.begin(start, cfg.batch);
    for step in start..cfg.steps {
        let t0 = Instant::now();
        let lr = cfg.lr * cfg.schedule.factor(step, cfg.steps);
        opt.set_learning_rate(lr);
        let drawn = train
            .draw(cfg.batch, &mut rng)
            .map_err(candle_core::Error::wrap)?;
        let batch: Vec<&Sample> = drawn.iter().map(|d| &d.sample).collect();
        let mut answers = Vec::with_capacity(batch.len());
        for d in &drawn {
            let (s, seed) = (&d.sample, rng.next_u64());
            let mut graph = match cfg.augment {
                Augment::None => s.graph.clone(),
                Augment::Always => augment(&s.graph, seed, true),
                // A coin of its own, not the shuffle's stream.
                Augment::R1Sgg if d.visit > 0 && Rng::new(!seed).next_u64() & 1 == 1 => {
                    augment(&s.graph, seed, false)
                }
                Augment::R1Sgg => s.graph.clone(),
            };
            if cfg.objects_only {
                graph.relations.clear();
            }
            answers.push(policy.answer_tokens(&graph)?);
        }
        let mut acc = Accumulated::default();
        let mut loss_value = 0.0f32;
        for (samples, completions) in batch.chunks(micro).zip(answers.chunks(micro)) {
            let (logp, target_mask) = policy.logprobs(samples, completions, cfg.loss_on, 1.0)?;
            let count = target_mask.to_dtype(DType::F32)?.sum_all()?;
            let mut loss = logp.sum_all()?.neg()?.div(&count)?;
            if cfg.accumulate > 1 {
                loss = (loss / cfg.accumulate as f64)?;
            }
            let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            loss_value += value;
            acc.add(opt, policy.backward(&loss)?, f64::from(value))?;
        }
        if !clipped_step(opt, acc, cfg.max_grad_norm)? {
            bar.println(format!(
                "SFT step {step}: non-finite loss or gradient, step skipped"
            ));
        }
        bar.set_message(format!("loss {loss_value:.3}"));
        bar.inc(1);
        let record = serde_json::json!({
            "loss": loss_value,
            "tokens": answers.iter().map(Vec::len).sum::<usize>(),
            "lr": lr,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        if !hooks.after_step("sft", step, record, opt)? {
            break;
        }
    }
    bar.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedules_have_their_shapes() {
        let steps = 200;
        let cosine = |s| Schedule::WarmupCosine.factor(s, steps);
        assert!(cosine(0) < cosine(5));
        assert!((cosine(9) - 1.0).abs() < 1e-12);
        assert!(cosine(100) < 1.0 && cosine(100) > 0.1);
        assert!((cosine(steps - 1) - 0.1).abs() < 1e-3);
        // transformers' linear schedule, warmup_ratio 0.05: 10 warmup steps from 0.
        let linear = |s| Schedule::WarmupLinear { warmup: 0.05 }.factor(s, steps);
        assert_eq!((linear(0), linear(5), linear(10)), (0.0, 0.5, 1.0));
        assert!((linear(105) - 0.5).abs() < 1e-12);
        assert!((linear(199) - 1.0 / 190.0).abs() < 1e-12);
        // No warmup (R1-SGG's GRPO): decays from the first step.
        assert_eq!(Schedule::WarmupLinear { warmup: 0.0 }.factor(0, 4), 1.0);
        let constant = |s| Schedule::WarmupConstant { warmup: 0.1 }.factor(s, steps);
        assert_eq!((constant(0), constant(19), constant(150)), (0.05, 1.0, 1.0));
    }
}
