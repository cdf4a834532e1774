//! GRPO: completions sampled per image, scored by the graph rewards,
//! group-normalized advantages and the clipped policy loss, through the
//! fused log-probs.

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use grpo_kernels::candle::{policy_loss, PolicyLossTensors};
use grpo_kernels::{
    group_advantages, AdvantageMode, Aggregation, PolicyLossConfig, PolicyLossStats, Rewards as RewardValues,
    SamplingConfig,
};

use super::optim::AdamW;
use super::policy::LossOn;
use super::{clipped_step, progress, Accumulated, Hooks, Learner, Schedule, FORM, MAX_GRAD_NORM};
use crate::data::format::parse_answer;
use crate::data::Sample;
use crate::reward::{score, ExactMatch, LabelSimilarity, RewardBreakdown, RewardConfig, SpacyTable};
use crate::util::rng::Rng;

/// How the policy loss is normalized, as the GRPO papers and TRL's
/// `loss_type` name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossVariant {
    /// DeepSeekMath's GRPO: each completion's token mean, averaged over
    /// completions; std-normalized advantages.
    Grpo,
    /// BNPO: the token mean over the whole batch.
    Bnpo,
    /// Dr. GRPO (Liu et al., 2025): token sums over a constant (the longest
    /// completion allowed), advantages not divided by the std.
    DrGrpo,
    /// DAPO (Yu et al., 2025): the token mean over the batch and a higher
    /// upper clip (`eps_high` 0.28).
    Dapo,
}

impl LossVariant {
    /// The aggregation, advantage mode and clip range of the variant.
    fn settings(self, max_new: usize) -> (Aggregation, AdvantageMode, f32) {
        let token_mean = Aggregation::TokenMean { normalizer: None };
        match self {
            LossVariant::Grpo => (Aggregation::SeqMeanTokenMean, AdvantageMode::default(), 0.2),
            LossVariant::Bnpo => (token_mean, AdvantageMode::default(), 0.2),
            LossVariant::DrGrpo => (
                Aggregation::SeqMeanTokenSumNorm {
                    constant: max_new as f32,
                },
                AdvantageMode::GroupMean,
                0.2,
            ),
            LossVariant::Dapo => (token_mean, AdvantageMode::default(), 0.28),
        }
    }
}

/// Settings of the GRPO stage (R1-SGG's, scaled to the example).
#[derive(Debug, Clone)]
pub struct GrpoConfig {
    pub steps: usize,
    /// Images per step.
    pub prompts: usize,
    /// Micro-batches per step (`prompts` divided evenly): each runs
    /// forward and backward alone, and their gradients add up.
    pub accumulate: usize,
    /// Prompts whose completions are generated in one batch (`prompts` of
    /// a step in chunks of this many; at least 1).
    pub rollout_prompts: usize,
    /// Completions per image (`G`).
    pub group: usize,
    pub max_new: usize,
    /// Optimizer steps on each batch of completions (`mu`); above 1 the
    /// ratio to the sampling policy moves and clipping comes into play.
    pub inner_steps: usize,
    pub lr: f64,
    pub schedule: Schedule,
    /// Gradients are clipped to this global L2 norm.
    pub max_grad_norm: f64,
    pub seed: u64,
    pub sampling: SamplingConfig,
    pub advantages: AdvantageMode,
    /// `beta > 0` adds the KL to the starting model (kept frozen).
    pub loss: PolicyLossConfig,
    pub rewards: RewardConfig,
    /// How the rewards compare labels: spaCy's similarity over a vocabulary
    /// (R1-SGG's; the CLI picks the data's), or exact match when `None`.
    pub similarity: Option<&'static SpacyTable>,
    /// Token ids left out of the policy loss (their log-probs get no
    /// gradient), e.g. the box coordinates.
    pub masked_tokens: Option<std::ops::Range<u32>>,
}

impl GrpoConfig {
    /// Applies a loss variant's aggregation, advantages and clip range.
    pub fn with_variant(mut self, variant: LossVariant) -> Self {
        let (aggregation, advantages, eps_high) = variant.settings(self.max_new);
        self.loss.aggregation = aggregation;
        self.loss.eps_high = eps_high;
        self.advantages = advantages;
        self
    }
}

/// GRPO's defaults for the example: R1-SGG's settings (G = 8, beta = 0,
/// eps = 0.2, temperature 1, top-k 50, top-p 0.9, one inner step),
/// scaled-down batch.
pub fn grpo_defaults(steps: usize, seed: u64) -> GrpoConfig {
    GrpoConfig {
        steps,
        prompts: 4,
        accumulate: 1,
        rollout_prompts: 4,
        group: 8,
        max_new: 160,
        inner_steps: 1,
        lr: 1e-4,
        // A linear warmup over the first 10% of steps: Adam's first updates
        // move every weight by about the full learning rate, whatever the
        // (noisy) gradient's size.
        schedule: Schedule::WarmupConstant { warmup: 0.1 },
        max_grad_norm: MAX_GRAD_NORM,
        seed,
        sampling: SamplingConfig {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            seed,
            ..SamplingConfig::default()
        },
        advantages: AdvantageMode::default(),
        loss: PolicyLossConfig {
            eps_low: 0.2,
            eps_high: 0.2,
            beta: 0.0,
            aggregation: Aggregation::SeqMeanTokenMean,
            ..PolicyLossConfig::default()
        },
        rewards: RewardConfig {
            form: FORM,
            ..RewardConfig::default()
        },
        similarity: None,
        masked_tokens: None,
    }
}

/// One micro-batch's completions, scored, with what its policy loss needs.
struct Rollout<'s> {
    /// Each prompt `group` times in a row.
    samples: Vec<&'s Sample>,
    completions: Vec<Vec<u32>>,
    scored: Vec<RewardBreakdown>,
    advantages: Tensor,
    policy_mask: Option<Tensor>,
    old_logp: Option<Tensor>,
    ref_logp: Option<Tensor>,
}

/// GRPO on `train` (drawn `prompts` samples a step, positioned for step
/// `start`), steps `start..steps` with `opt`; each step's mean
/// rewards, loss statistics, completion length and time go to `hooks`.
///
/// A step draws `prompts` images and samples `group` completions of each,
/// `rollout_prompts` images per generation batch (the sampler keyed by the
/// step and the batch). It scores them and normalizes the rewards within
/// each image's group; then, `inner_steps` times, the policy loss of each
/// of `accumulate` micro-batches runs forward and backward, and one
/// optimizer step takes the mean of their gradients (each micro-batch's
/// loss divided by `accumulate`, as TRL's gradient accumulation and
/// data-parallel averaging do).
pub fn grpo(
    learner: Learner<'_>,
    cfg: &GrpoConfig,
    opt: &mut AdamW,
    start: usize,
    hooks: &mut dyn Hooks,
) -> Result<()> {
    let Learner { policy, train } = learner;
    if cfg.accumulate == 0 || !cfg.prompts.is_multiple_of(cfg.accumulate) {
        candle_core::bail!(
            "GRPO: {} prompts per step do not split into {} micro-batches",
            cfg.prompts,
            cfg.accumulate
        );
    }
    if cfg.rollout_prompts == 0 {
        candle_core::bail!("GRPO: rollouts of 0 prompts");
    }
    let micro = cfg.prompts / cfg.accumulate;
    let device = policy.device().clone();
    let reference = if cfg.loss.beta > 0.0 {
        Some(policy.reference()?)
    } else {
        None
    };
    let sim: &dyn LabelSimilarity = match cfg.similarity {
        Some(table) => table,
        None => &ExactMatch,
    };
    let bar = progress(cfg.steps as u64, "GRPO");
    bar.set_position(start as u64);
    let mut rng = Rng::new(cfg.seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    train.begin(start, cfg.prompts);
    for step in start..cfg.steps {
        let t0 = Instant::now();
        let lr = cfg.lr * cfg.schedule.factor(step, cfg.steps);
        opt.set_learning_rate(lr);
        let drawn = train
            .draw(cfg.prompts, &mut rng)
            .map_err(candle_core::Error::wrap)?;
        let batch: Vec<&Sample> = drawn.iter().map(|d| &d.sample).collect();

        // Completions of the whole step, sampled by the policy before this
        // step's update, `rollout_prompts` prompts at a time (the sampler
        // keyed by the step and the chunk).
        let chunks = batch.len().div_ceil(cfg.rollout_prompts);
        let mut all = Vec::with_capacity(batch.len() * cfg.group);
        for (k, prompts) in batch.chunks(cfg.rollout_prompts).enumerate() {
            let sampling = SamplingConfig {
                step: (step * chunks + k) as u64,
                ..cfg.sampling
            };
            all.extend(policy.generate(prompts, cfg.group, cfg.max_new, &sampling)?);
        }
        // Each micro-batch's rewards and advantages.
        let mut rollouts = Vec::with_capacity(cfg.accumulate);
        for (prompts, completions) in batch.chunks(micro).zip(all.chunks(micro * cfg.group)) {
            let completions = completions.to_vec();
            let samples: Vec<&Sample> = prompts
                .iter()
                .flat_map(|s| std::iter::repeat_n(*s, cfg.group))
                .collect();
            let mut scored = Vec::with_capacity(completions.len());
            for (c, s) in completions.iter().zip(&samples) {
                let parsed = parse_answer(&policy.decode(c)?, cfg.rewards.form);
                scored.push(score(&parsed, &s.graph, &cfg.rewards, sim));
            }
            let totals: Vec<f32> = scored.iter().map(|r| r.total() as f32).collect();
            let adv = group_advantages(&RewardValues::new(&totals, cfg.group), cfg.advantages)
                .map_err(candle_core::Error::wrap)?;
            // Log-probs of the logits at the sampling temperature, as TRL
            // computes them; the sampling policy's (detached) only when the
            // ratio can move (several inner steps).
            let temperature = cfg.sampling.temperature;
            let old_logp = if cfg.inner_steps > 1 {
                Some(
                    policy
                        .logprobs(&samples, &completions, LossOn::Answer, temperature)?
                        .0
                        .detach(),
                )
            } else {
                None
            };
            let ref_logp = match &reference {
                Some(r) => Some(
                    r.logprobs(&samples, &completions, LossOn::Answer, temperature)?
                        .0
                        .detach(),
                ),
                None => None,
            };
            rollouts.push(Rollout {
                policy_mask: policy_mask(&completions, cfg.masked_tokens.as_ref(), &device)?,
                advantages: Tensor::new(adv.advantages.as_slice(), &device)?,
                samples,
                completions,
                scored,
                old_logp,
                ref_logp,
            });
        }
        let rollout_seconds = t0.elapsed().as_secs_f64();

        // The policy gradient, `inner_steps` times against the sampling
        // policy's log-probs.
        let mut stats = PolicyLossStats::default();
        for _ in 0..cfg.inner_steps.max(1) {
            let mut acc = Accumulated::default();
            let mut parts = Vec::with_capacity(rollouts.len());
            for r in &rollouts {
                let (logp, target_mask) = policy.logprobs(
                    &r.samples,
                    &r.completions,
                    LossOn::Answer,
                    cfg.sampling.temperature,
                )?;
                let out = policy_loss(
                    &logp,
                    &PolicyLossTensors {
                        old_logp: r.old_logp.as_ref(),
                        ref_logp: r.ref_logp.as_ref(),
                        advantages: &r.advantages,
                        mask: Some(r.policy_mask.as_ref().unwrap_or(&target_mask)),
                        cu_seqlens: None,
                        pg_weights: None,
                    },
                    &cfg.loss,
                )?;
                let loss = if cfg.accumulate > 1 {
                    (out.loss / cfg.accumulate as f64)?
                } else {
                    out.loss
                };
                acc.add(opt, policy.backward(&loss)?, f64::from(out.stats.loss))?;
                parts.push(out.stats);
            }
            if !clipped_step(opt, acc, cfg.max_grad_norm)? {
                bar.println(format!(
                    "GRPO step {step}: non-finite loss or gradient, step skipped"
                ));
                break;
            }
            stats = mean_stats(&parts);
        }

        let scored: Vec<&RewardBreakdown> = rollouts.iter().flat_map(|r| &r.scored).collect();
        let generated: usize = rollouts.iter().flat_map(|r| &r.completions).map(Vec::len).sum();
        let n = scored.len() as f64;
        let mean = |f: fn(&RewardBreakdown) -> f64| scored.iter().map(|r| f(r)).sum::<f64>() / n;
        let (total, format, edge) = (mean(RewardBreakdown::total), mean(|r| r.format), mean(|r| r.edge));
        let record = serde_json::json!({
            "reward": total,
            "format": format,
            "node_acc": mean(|r| r.node_acc),
            "node_box": mean(|r| r.node_box),
            "edge": edge,
            "loss": stats.loss,
            "clip_low": stats.clip_frac_low,
            "clip_high": stats.clip_frac_high,
            "ratio_mean": stats.ratio_mean,
            "ratio_max": stats.ratio_max,
            "kl": stats.kl_mean,
            "tokens": stats.tokens,
            "length": generated as f64 / n,
            "generated": generated,
            "lr": lr,
            "rollout_seconds": rollout_seconds,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        bar.set_message(format!(
            "reward {total:.2} (format {format:.2}, edge {edge:.2}), clip {:.3}",
            stats.clip_frac_low + stats.clip_frac_high
        ));
        bar.inc(1);
        if !hooks.after_step("grpo", step, record, opt)? {
            break;
        }
    }
    bar.finish();
    Ok(())
}

/// The step's statistics from its micro-batches': means (the loss as
/// optimized: the mean of the micro-batches'), the largest ratio, the
/// tokens summed. One micro-batch's are returned as they are.
fn mean_stats(parts: &[PolicyLossStats]) -> PolicyLossStats {
    if let [one] = parts {
        return *one;
    }
    let n = parts.len().max(1) as f32;
    let mean = |f: fn(&PolicyLossStats) -> f32| parts.iter().map(f).sum::<f32>() / n;
    PolicyLossStats {
        loss: mean(|s| s.loss),
        clip_frac_low: mean(|s| s.clip_frac_low),
        clip_frac_high: mean(|s| s.clip_frac_high),
        dual_clip_frac: mean(|s| s.dual_clip_frac),
        ratio_mean: mean(|s| s.ratio_mean),
        ratio_max: parts.iter().map(|s| s.ratio_max).fold(f32::MIN, f32::max),
        kl_mean: mean(|s| s.kl_mean),
        tokens: parts.iter().map(|s| s.tokens).sum(),
        clip_frac_low_seq: mean(|s| s.clip_frac_low_seq),
        clip_frac_high_seq: mean(|s| s.clip_frac_high_seq),
        clip_frac_low_seq_min: parts
            .iter()
            .map(|s| s.clip_frac_low_seq_min)
            .fold(f32::MAX, f32::min),
        clip_frac_high_seq_max: parts
            .iter()
            .map(|s| s.clip_frac_high_seq_max)
            .fold(f32::MIN, f32::max),
        seqs: parts.iter().map(|s| s.seqs).sum(),
    }
}

/// The policy loss's mask `[B, T - 1]` over the targets of
/// [`token_batch`]`(rows)` without the tokens in `masked` (`None` when
/// nothing is masked: the targets' own mask serves).
fn policy_mask(
    rows: &[Vec<u32>],
    masked: Option<&std::ops::Range<u32>>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let Some(masked) = masked else {
        return Ok(None);
    };
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut mask = Vec::with_capacity(rows.len() * t);
    for r in rows {
        mask.extend(r.iter().map(|id| u8::from(!masked.contains(id))));
        mask.extend(std::iter::repeat_n(0u8, t - r.len()));
    }
    Ok(Some(Tensor::from_vec(mask, (rows.len(), t), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_variants_set_their_normalization() {
        let base = grpo_defaults(10, 0);
        let grpo = base.clone().with_variant(LossVariant::Grpo);
        assert_eq!(grpo.loss.aggregation, Aggregation::SeqMeanTokenMean);
        assert_eq!(grpo.advantages, AdvantageMode::default());
        assert_eq!((grpo.loss.eps_low, grpo.loss.eps_high), (0.2, 0.2));
        let bnpo = base.clone().with_variant(LossVariant::Bnpo);
        assert_eq!(bnpo.loss.aggregation, Aggregation::TokenMean { normalizer: None });
        let dr = base.clone().with_variant(LossVariant::DrGrpo);
        assert_eq!(
            dr.loss.aggregation,
            Aggregation::SeqMeanTokenSumNorm {
                constant: base.max_new as f32
            }
        );
        assert_eq!(dr.advantages, AdvantageMode::GroupMean);
        let dapo = base.with_variant(LossVariant::Dapo);
        assert_eq!(dapo.loss.aggregation, Aggregation::TokenMean { normalizer: None });
        assert_eq!((dapo.loss.eps_low, dapo.loss.eps_high), (0.2, 0.28));
    }

    #[test]
    fn the_policy_mask_drops_masked_tokens_and_padding() {
        let rows = vec![vec![5u32, 10, 11, 7], vec![12, 3]];
        let cpu = Device::Cpu;
        assert!(policy_mask(&rows, None, &cpu).unwrap().is_none());
        let mask = policy_mask(&rows, Some(&(10..13)), &cpu).unwrap().unwrap();
        assert_eq!(
            mask.to_vec2::<u8>().unwrap(),
            vec![vec![1, 0, 0, 1], vec![0, 1, 0, 0]]
        );
        // The same shape as the targets' mask of the batch.
        let (tokens, _) = crate::train::batch::token_batch(&rows, &cpu).unwrap();
        assert_eq!(mask.dims(), &[2, tokens.dim(1).unwrap() - 1]);
    }
}
