//! GRPO: completions sampled per image, scored by the graph rewards,
//! group-normalized advantages and the clipped policy loss, through the
//! fused log-probs.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use grpo_kernels::candle::{policy_loss, PolicyLossTensors};
use grpo_kernels::{
    group_advantages, AdvantageMode, Aggregation, PolicyLossConfig, PolicyLossStats, Rewards as RewardValues,
    SamplingConfig,
};

use super::batch::{completion_logprobs, image_batch, token_batch};
use super::optim::AdamW;
use super::rollout::generate;
use super::{clipped_step, pick, progress, Hooks, Learner, FORM, MAX_GRAD_NORM};
use crate::data::format::parse_answer;
use crate::data::Sample;
use crate::model::Vlm;
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
    /// Completions per image (`G`).
    pub group: usize,
    pub max_new: usize,
    /// Optimizer steps on each batch of completions (`mu`); above 1 the
    /// ratio to the sampling policy moves and clipping comes into play.
    pub inner_steps: usize,
    pub lr: f64,
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
        group: 8,
        max_new: 160,
        inner_steps: 1,
        lr: 1e-4,
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

/// A frozen copy of `model` (for the KL term's reference log-probs).
fn frozen_copy(model: &Vlm, vars: &VarMap) -> Result<Vlm> {
    let copy = VarMap::new();
    let frozen = Vlm::new(
        model.config(),
        candle_nn::VarBuilder::from_varmap(&copy, DType::F32, model.device()),
    )?;
    let source = vars.data().lock().expect("variables lock");
    for (name, var) in copy.data().lock().expect("variables lock").iter() {
        match source.get(name) {
            Some(v) => var.set(&v.as_tensor().copy()?)?,
            None => candle_core::bail!("reference model: no variable {name} in the policy"),
        }
    }
    drop(source);
    Ok(frozen)
}

/// GRPO on `train`, steps `start..steps` with `opt`; each step's mean
/// rewards, loss statistics, completion length and time go to `hooks`.
pub fn grpo(
    learner: Learner<'_>,
    cfg: &GrpoConfig,
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
    let reference = if cfg.loss.beta > 0.0 {
        Some(frozen_copy(model, vars)?)
    } else {
        None
    };
    let bar = progress(cfg.steps as u64, "GRPO");
    bar.set_position(start as u64);
    let mut rng = Rng::new(cfg.seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for step in start..cfg.steps {
        let t0 = Instant::now();
        // A linear warmup over the first 10% of steps: Adam's first updates
        // move every weight by about the full learning rate, whatever the
        // (noisy) gradient's size.
        opt.set_learning_rate(cfg.lr * ((step + 1) as f64 / (cfg.steps / 10).max(1) as f64).min(1.0));
        let batch: Vec<&Sample> = (0..cfg.prompts).map(|_| pick(&mut rng, train)).collect();
        let sampling = SamplingConfig {
            step: step as u64,
            ..cfg.sampling
        };
        let completions = generate(model, &batch, cfg.group, cfg.max_new, &sampling)?;
        let rollout_seconds = t0.elapsed().as_secs_f64();
        let generated: usize = completions.iter().map(Vec::len).sum();

        // RewardBreakdown, then advantages within each image's group.
        let sim: &dyn LabelSimilarity = match cfg.similarity {
            Some(table) => table,
            None => &ExactMatch,
        };
        let scored: Vec<RewardBreakdown> = completions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let parsed = parse_answer(&tok.decode(c), FORM);
                score(&parsed, &batch[i / cfg.group].graph, &cfg.rewards, sim)
            })
            .collect();
        let totals: Vec<f32> = scored.iter().map(|r| r.total() as f32).collect();
        let adv = group_advantages(&RewardValues::new(&totals, cfg.group), cfg.advantages)
            .map_err(candle_core::Error::wrap)?;

        // The policy gradient through the fused log-probs (of the logits at
        // the sampling temperature, as TRL computes them), `inner_steps`
        // times against the sampling policy's (detached) log-probs.
        let repeated: Vec<&Sample> = batch
            .iter()
            .flat_map(|s| std::iter::repeat_n(*s, cfg.group))
            .collect();
        let images = image_batch(&repeated, model.config().image_size as u32, &device)?;
        let (tokens, mask) = token_batch(&completions, &device)?;
        let policy_mask = policy_mask(&completions, cfg.masked_tokens.as_ref(), &device)?;
        let adv_t = Tensor::new(adv.advantages.as_slice(), &device)?;
        let old_logp = if cfg.inner_steps > 1 {
            Some(
                completion_logprobs(model, &images, &tokens, &mask, cfg.sampling.temperature)?
                    .0
                    .detach(),
            )
        } else {
            None
        };
        let ref_logp = match &reference {
            Some(r) => Some(
                completion_logprobs(r, &images, &tokens, &mask, cfg.sampling.temperature)?
                    .0
                    .detach(),
            ),
            None => None,
        };
        let mut stats = PolicyLossStats::default();
        for _ in 0..cfg.inner_steps.max(1) {
            let (logp, target_mask) =
                completion_logprobs(model, &images, &tokens, &mask, cfg.sampling.temperature)?;
            let out = policy_loss(
                &logp,
                &PolicyLossTensors {
                    old_logp: old_logp.as_ref(),
                    ref_logp: ref_logp.as_ref(),
                    advantages: &adv_t,
                    mask: Some(policy_mask.as_ref().unwrap_or(&target_mask)),
                    cu_seqlens: None,
                },
                &cfg.loss,
            )?;
            if !clipped_step(opt, vars, &out.loss, MAX_GRAD_NORM)? {
                bar.println(format!(
                    "GRPO step {step}: non-finite loss or gradient, step skipped"
                ));
                break;
            }
            stats = out.stats;
        }

        let n = scored.len() as f64;
        let mean = |f: fn(&RewardBreakdown) -> f64| scored.iter().map(f).sum::<f64>() / n;
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
        let (tokens, _) = token_batch(&rows, &cpu).unwrap();
        assert_eq!(mask.dims(), &[2, tokens.dim(1).unwrap() - 1]);
    }
}
