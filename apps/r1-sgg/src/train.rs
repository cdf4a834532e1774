//! R1-SGG's two stages on candle, with this crate's ops doing the GRPO math:
//!
//! - **SFT**: teacher-forced cross-entropy on the serialized scene graph,
//!   the token log-probs computed straight from the last hidden states and
//!   the LM head by [`fused_linear_logprobs`] (no `[B, T, V]` logits).
//! - **GRPO**: `G` completions per image sampled with a KV cache and the
//!   fused sampler ([`sample`]: temperature, top-k, top-p, Philox keyed by
//!   seed and step), scored by the graph rewards (format, node, edge),
//!   group-normalized advantages ([`group_advantages`]), and the clipped
//!   policy loss ([`policy_loss`]) back through the fused log-probs.
//! - **Evaluation**: greedy decoding, failure rate, triplet recall and mean
//!   recall over predicates.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{ParamsAdamW, VarMap};
use grpo_kernels::candle::{fused_linear_logprobs, policy_loss, sample, PolicyLossTensors};
use grpo_kernels::{
    group_advantages, AdvantageMode, Aggregation, FusedLinearConfig, LogProbConfig, PolicyLossConfig,
    PolicyLossStats, Rewards as RewardValues, SamplingConfig,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::AdamW;
use crate::data::Sample;
use crate::format::{answer_text, augment, parse_answer, AnswerForm};
use crate::model::Vlm;
use crate::reward::{score, EvalSummary, Evaluator, ExactMatch, RewardConfig, Rewards};
use crate::tokenizer::{Tokenizer, EOS, PAD, TASK};

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

/// Images `[B, 3, S, S]` in `[0, 1]`, resized to the model's input size.
pub fn image_batch(samples: &[&Sample], size: u32, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(samples.len() * 3 * (size * size) as usize);
    for s in samples {
        let img = if s.image.dimensions() == (size, size) {
            s.image.clone()
        } else {
            s.resized(size, size).image
        };
        for c in 0..3 {
            data.extend(img.pixels().map(|p| p.0[c] as f32 / 255.0));
        }
    }
    Tensor::from_vec(data, (samples.len(), 3, size as usize, size as usize), device)
}

/// `[TASK] + completion` rows, right-padded: `(tokens [B, T] u32, mask
/// [B, T] u8)`, the mask 1 on real tokens.
pub fn token_batch(rows: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
    let t = 1 + rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut tokens, mut mask) = (
        Vec::with_capacity(rows.len() * t),
        Vec::with_capacity(rows.len() * t),
    );
    for r in rows {
        tokens.push(TASK);
        tokens.extend_from_slice(r);
        tokens.extend(std::iter::repeat_n(PAD, t - 1 - r.len()));
        mask.extend(std::iter::repeat_n(1u8, 1 + r.len()));
        mask.extend(std::iter::repeat_n(0u8, t - 1 - r.len()));
    }
    Ok((
        Tensor::from_vec(tokens, (rows.len(), t), device)?,
        Tensor::from_vec(mask, (rows.len(), t), device)?,
    ))
}

/// Log-probs `[B, T - 1]` of each next token under the logits divided by
/// `temperature` (masked positions give 0), differentiable in the model,
/// from the fused LM-head op (CPU or CUDA).
pub fn completion_logprobs(
    model: &Vlm,
    images: &Tensor,
    tokens: &Tensor,
    mask: &Tensor,
    temperature: f32,
) -> Result<(Tensor, Tensor)> {
    let t = tokens.dim(1)?;
    let hidden = model.hidden_states(images, tokens, mask)?;
    let hidden = hidden.narrow(1, 0, t - 1)?;
    let targets = tokens.narrow(1, 1, t - 1)?.contiguous()?;
    let target_mask = mask.narrow(1, 1, t - 1)?.contiguous()?;
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            ignore_index: None,
            temperature,
            ..LogProbConfig::default()
        },
        ..FusedLinearConfig::default()
    };
    let out = fused_linear_logprobs(
        &hidden,
        &model.lm_head_weight()?,
        &targets,
        Some(&target_mask),
        &cfg,
    )?;
    Ok((out.logp, target_mask))
}

/// Gradients are rescaled to at most this global L2 norm (TRL's default).
const MAX_GRAD_NORM: f64 = 1.0;

/// One optimizer step on `loss` with the gradients clipped to a global L2
/// norm of `max_norm`; a non-finite loss or gradient skips the step (and
/// returns false) rather than writing NaN into the weights.
fn clipped_step(opt: &mut AdamW, vars: &VarMap, loss: &Tensor, max_norm: f64) -> Result<bool> {
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
    let mut rng = crate::scene::Rng::new(cfg.seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
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
                let mut ids = tok.encode(&answer_text(&graph, None));
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

/// A uniformly chosen sample.
fn pick<'a>(rng: &mut crate::scene::Rng, samples: &'a [Sample]) -> &'a Sample {
    &samples[(rng.next_u64() % samples.len() as u64) as usize]
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

/// Completions for `samples`, `per_image` each: token ids up to and
/// including EOS (or `max_new` tokens), and the sampler's log-probs.
pub fn generate(
    model: &Vlm,
    samples: &[&Sample],
    per_image: usize,
    max_new: usize,
    sampling: &SamplingConfig,
) -> Result<Vec<Vec<u32>>> {
    let device = model.device().clone();
    let repeated: Vec<&Sample> = samples
        .iter()
        .flat_map(|s| std::iter::repeat_n(*s, per_image))
        .collect();
    let b = repeated.len();
    let images = image_batch(&repeated, model.config().image_size as u32, &device)?;
    let prompt = Tensor::full(TASK, (b, 1), &device)?;
    let (mut cache, mut logits) = model.prefill(&images, &prompt)?;
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for step in 0..max_new {
        let cfg = SamplingConfig {
            step: sampling.step.wrapping_mul(1 << 16).wrapping_add(step as u64),
            ..*sampling
        };
        let (tokens, _) = sample(&logits.to_dtype(DType::F32)?, &cfg)?;
        let ids = tokens.to_vec1::<u32>()?;
        for (i, &id) in ids.iter().enumerate() {
            if !done[i] {
                out[i].push(id);
                done[i] = id == EOS;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        logits = model.decode_step(&mut cache, &tokens)?;
    }
    Ok(out)
}

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
    let mut rng = crate::scene::Rng::new(cfg.seed ^ (start as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
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

        // Rewards, then advantages within each image's group.
        let scored: Vec<Rewards> = completions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let parsed = parse_answer(&tok.decode(c), FORM);
                score(&parsed, &batch[i / cfg.group].graph, &cfg.rewards, &ExactMatch)
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
        let mean = |f: fn(&Rewards) -> f64| scored.iter().map(f).sum::<f64>() / n;
        let (total, format, edge) = (mean(Rewards::total), mean(|r| r.format), mean(|r| r.edge));
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

/// Predictions of greedy decoding on `samples`, `batch` images at a time.
pub fn predict(
    model: &Vlm,
    tok: &Tokenizer,
    samples: &[Sample],
    batch: usize,
    max_new: usize,
) -> Result<Vec<String>> {
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..SamplingConfig::default()
    };
    let bar = progress(samples.len() as u64, "eval");
    let mut texts = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(batch) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        for c in generate(model, &refs, 1, max_new, &greedy)? {
            texts.push(tok.decode(&c));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(texts)
}

/// Failure rate, recall and mean recall of `texts` against `samples`.
pub fn evaluate(texts: &[String], samples: &[Sample]) -> EvalSummary {
    let mut eval = Evaluator::default();
    for (text, s) in texts.iter().zip(samples) {
        eval.add_parsed(&parse_answer(text, FORM), &s.graph);
    }
    eval.summary()
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
        masked_tokens: None,
    }
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

    #[test]
    fn the_schedule_warms_up_then_decays_to_a_tenth() {
        let steps = 200;
        assert!(schedule(0, steps) < schedule(5, steps));
        assert!((schedule(9, steps) - 1.0).abs() < 1e-12);
        assert!(schedule(100, steps) < 1.0 && schedule(100, steps) > 0.1);
        assert!((schedule(steps - 1, steps) - 0.1).abs() < 1e-3);
    }
}
