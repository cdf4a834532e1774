//! Supervised fine-tuning: teacher-forced cross-entropy on the serialized
//! scene graph, from the fused log-probs.

use std::time::Instant;

use candle_core::{DType, Result};

use super::batch::{completion_logprobs, image_batch, token_batch};
use super::optim::AdamW;
use super::{clipped_step, pick, progress, Hooks, Learner, MAX_GRAD_NORM};
use crate::data::format::{answer_text_with, augment, BoxRounding};
use crate::data::Sample;
use crate::model::tiny_tokenizer::EOS;
use crate::util::rng::Rng;

/// Settings of the SFT stage.
#[derive(Debug, Clone)]
pub struct SftConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Shuffle and renumber the objects and relations of every answer
    /// (R1-SGG's augmentation; see [`augment`]); else reading order.
    pub shuffle: bool,
    /// Train on the objects alone (empty relationship lists): the starting
    /// point of the R1-SGG-Zero setting, a model that has never seen a
    /// relation before GRPO.
    pub objects_only: bool,
    /// How answer boxes are rounded: truncated, as R1-SGG's SFT target, for
    /// data read in R1-SGG's layout; to the nearest unit for the demo's
    /// synthetic scenes.
    pub rounding: BoxRounding,
}

/// Supervised fine-tuning on `train` (answers optionally augmented by
/// shuffling and renumbering objects, as R1-SGG does), steps `start..steps`
/// with `opt` (fresh, or restored from a checkpoint); each step's
/// `{"loss", "tokens", "seconds"}` (answer tokens trained on, the step's
/// wall time) goes to `hooks`.
pub fn sft(
    learner: Learner<'_>,
    cfg: &SftConfig,
    opt: &mut AdamW,
    start: usize,
    hooks: &mut dyn Hooks,
) -> Result<()> {
    let Learner {
        model,
        vars,
        tok,
        train,
    } = learner;
    let device = model.device().clone();
    let bar = progress(cfg.steps as u64, "SFT");
    bar.set_position(start as u64);
    let mut rng = Rng::new(cfg.seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for step in start..cfg.steps {
        let t0 = Instant::now();
        // Warm up over the first 5% of steps, then cosine decay to 10%.
        opt.set_learning_rate(cfg.lr * schedule(step, cfg.steps));
        let batch: Vec<&Sample> = (0..cfg.batch).map(|_| pick(&mut rng, train)).collect();
        let answers: Vec<Vec<u32>> = batch
            .iter()
            .map(|s| {
                let seed = rng.next_u64();
                let mut graph = if cfg.shuffle {
                    augment(&s.graph, seed)
                } else {
                    s.graph.clone()
                };
                if cfg.objects_only {
                    graph.relations.clear();
                }
                let mut ids = tok.encode(&answer_text_with(&graph, None, cfg.rounding));
                ids.push(EOS);
                ids
            })
            .collect();
        let images = image_batch(&batch, model.config().image_size as u32, &device)?;
        let (tokens, mask) = token_batch(&answers, &device)?;
        let (logp, target_mask) = completion_logprobs(model, &images, &tokens, &mask, 1.0)?;
        let count = target_mask.to_dtype(DType::F32)?.sum_all()?;
        let loss = logp.sum_all()?.neg()?.div(&count)?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !clipped_step(opt, vars, &loss, MAX_GRAD_NORM)? {
            bar.println(format!(
                "SFT step {step}: non-finite loss or gradient, step skipped"
            ));
        }
        bar.set_message(format!("loss {loss_value:.3}"));
        bar.inc(1);
        let record = serde_json::json!({
            "loss": loss_value,
            "tokens": answers.iter().map(Vec::len).sum::<usize>(),
            "seconds": t0.elapsed().as_secs_f64(),
        });
        if !hooks.after_step("sft", step, record, opt)? {
            break;
        }
    }
    bar.finish();
    Ok(())
}

fn schedule(step: usize, steps: usize) -> f64 {
    let warmup = (steps / 20).max(1);
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        let t = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
        0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_a_tenth() {
        let steps = 200;
        assert!(schedule(0, steps) < schedule(5, steps));
        assert!((schedule(9, steps) - 1.0).abs() < 1e-12);
        assert!(schedule(100, steps) < 1.0 && schedule(100, steps) > 0.1);
        assert!((schedule(steps - 1, steps) - 0.1).abs() < 1e-3);
    }
}
