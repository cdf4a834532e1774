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
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use grpo_kernels::candle::{fused_linear_logprobs, policy_loss, sample, token_logprobs, PolicyLossTensors};
use grpo_kernels::{
    group_advantages, AdvantageMode, Aggregation, FusedLinearConfig, LogProbConfig, PolicyLossConfig,
    PolicyLossStats, Rewards as RewardValues, SamplingConfig,
};
use indicatif::{ProgressBar, ProgressStyle};

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

/// Log-probs `[B, T - 1]` of each next token (masked positions give 0),
/// differentiable in the model, from the fused LM-head op (on the CPU).
pub fn completion_logprobs(
    model: &Vlm,
    images: &Tensor,
    tokens: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let t = tokens.dim(1)?;
    let hidden = model.hidden_states(images, tokens, mask)?;
    let hidden = hidden.narrow(1, 0, t - 1)?;
    let targets = tokens.narrow(1, 1, t - 1)?.contiguous()?;
    let target_mask = mask.narrow(1, 1, t - 1)?.contiguous()?;
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            ignore_index: None,
            ..LogProbConfig::default()
        },
        ..FusedLinearConfig::default()
    };
    let out = if hidden.device().is_cpu() {
        fused_linear_logprobs(
            &hidden,
            model.lm_head_weight(),
            &targets,
            Some(&target_mask),
            &cfg,
        )?
    } else {
        // The fused op has no CUDA launch wrapper yet: logits, then the
        // CUDA token log-prob kernel.
        let logits = hidden
            .contiguous()?
            .broadcast_matmul(&model.lm_head_weight().t()?)?;
        token_logprobs(&logits, &targets, Some(&target_mask), &cfg.logprob)?
    };
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

/// AdamW over every variable, without weight decay.
fn adamw(vars: &VarMap, lr: f64) -> Result<AdamW> {
    AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
}

/// Settings of the SFT stage.
#[derive(Debug, Clone)]
pub struct SftConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

/// One line of the SFT log.
#[derive(Debug, Clone, Copy)]
pub struct SftLog {
    pub step: usize,
    pub loss: f32,
}

/// Supervised fine-tuning on `train` (answers augmented by shuffling and
/// renumbering objects, as R1-SGG does); returns the loss curve.
pub fn sft(
    model: &Vlm,
    vars: &VarMap,
    tok: &Tokenizer,
    train: &[Sample],
    cfg: &SftConfig,
) -> Result<Vec<SftLog>> {
    let device = model.device().clone();
    let mut opt = adamw(vars, cfg.lr)?;
    let bar = progress(cfg.steps as u64, "SFT");
    let mut log = Vec::with_capacity(cfg.steps);
    let mut rng = crate::scene::Rng::new(cfg.seed);
    for step in 0..cfg.steps {
        // Warm up over the first 5% of steps, then cosine decay to 10%.
        opt.set_learning_rate(cfg.lr * schedule(step, cfg.steps));
        let batch: Vec<&Sample> = (0..cfg.batch).map(|_| pick(&mut rng, train)).collect();
        let answers: Vec<Vec<u32>> = batch
            .iter()
            .map(|s| {
                let mut ids = tok.encode(&answer_text(&augment(&s.graph, rng.next_u64()), None));
                ids.push(EOS);
                ids
            })
            .collect();
        let images = image_batch(&batch, model.config().image_size as u32, &device)?;
        let (tokens, mask) = token_batch(&answers, &device)?;
        let (logp, target_mask) = completion_logprobs(model, &images, &tokens, &mask)?;
        let count = target_mask.to_dtype(DType::F32)?.sum_all()?;
        let loss = logp.sum_all()?.neg()?.div(&count)?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !clipped_step(&mut opt, vars, &loss, MAX_GRAD_NORM)? {
            bar.println(format!(
                "SFT step {step}: non-finite loss or gradient, step skipped"
            ));
        }
        let loss = loss_value;
        log.push(SftLog { step, loss });
        bar.set_message(format!("loss {loss:.3}"));
        bar.inc(1);
    }
    bar.finish();
    Ok(log)
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

/// Settings of the GRPO stage (R1-SGG's, scaled to the example).
#[derive(Debug, Clone)]
pub struct GrpoConfig {
    pub steps: usize,
    /// Images per step.
    pub prompts: usize,
    /// Completions per image (`G`).
    pub group: usize,
    pub max_new: usize,
    pub lr: f64,
    pub seed: u64,
    pub sampling: SamplingConfig,
    pub loss: PolicyLossConfig,
    pub rewards: RewardConfig,
}

/// One line of the GRPO log.
#[derive(Debug, Clone, Copy)]
pub struct GrpoLog {
    pub step: usize,
    /// Mean of each reward component and the total over the step's completions.
    pub rewards: Rewards,
    pub total: f64,
    pub stats: PolicyLossStats,
    /// Mean completion length in tokens.
    pub length: f64,
    pub seconds: f64,
}

/// GRPO on `train`; returns the per-step log.
pub fn grpo(
    model: &Vlm,
    vars: &VarMap,
    tok: &Tokenizer,
    train: &[Sample],
    cfg: &GrpoConfig,
) -> Result<Vec<GrpoLog>> {
    let device = model.device().clone();
    let mut opt = adamw(vars, cfg.lr)?;
    let bar = progress(cfg.steps as u64, "GRPO");
    let mut rng = crate::scene::Rng::new(cfg.seed);
    let mut log = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let t0 = Instant::now();
        let batch: Vec<&Sample> = (0..cfg.prompts).map(|_| pick(&mut rng, train)).collect();
        let sampling = SamplingConfig {
            step: step as u64,
            ..cfg.sampling
        };
        let completions = generate(model, &batch, cfg.group, cfg.max_new, &sampling)?;

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
        let adv = group_advantages(&RewardValues::new(&totals, cfg.group), AdvantageMode::default())
            .map_err(candle_core::Error::wrap)?;

        // Policy gradient through the fused log-probs.
        let repeated: Vec<&Sample> = batch
            .iter()
            .flat_map(|s| std::iter::repeat_n(*s, cfg.group))
            .collect();
        let images = image_batch(&repeated, model.config().image_size as u32, &device)?;
        let (tokens, mask) = token_batch(&completions, &device)?;
        let (logp, target_mask) = completion_logprobs(model, &images, &tokens, &mask)?;
        let adv_t = Tensor::new(adv.advantages.as_slice(), &device)?;
        let out = policy_loss(
            &logp,
            &PolicyLossTensors {
                old_logp: None,
                ref_logp: None,
                advantages: &adv_t,
                mask: Some(&target_mask),
                cu_seqlens: None,
            },
            &cfg.loss,
        )?;
        if !clipped_step(&mut opt, vars, &out.loss, MAX_GRAD_NORM)? {
            bar.println(format!(
                "GRPO step {step}: non-finite loss or gradient, step skipped"
            ));
        }

        let n = scored.len() as f64;
        let mean = |f: fn(&Rewards) -> f64| scored.iter().map(f).sum::<f64>() / n;
        let entry = GrpoLog {
            step,
            rewards: Rewards {
                format: mean(|r| r.format),
                node_acc: mean(|r| r.node_acc),
                node_box: mean(|r| r.node_box),
                edge: mean(|r| r.edge),
            },
            total: mean(Rewards::total),
            stats: out.stats,
            length: completions.iter().map(Vec::len).sum::<usize>() as f64 / n,
            seconds: t0.elapsed().as_secs_f64(),
        };
        bar.set_message(format!(
            "reward {:.2} (format {:.2}, edge {:.2}), clip {:.3}",
            entry.total, entry.rewards.format, entry.rewards.edge, entry.stats.clip_frac_high
        ));
        bar.inc(1);
        log.push(entry);
    }
    bar.finish();
    Ok(log)
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
/// eps = 0.2, temperature 1, top-k 50, top-p 0.9), scaled-down batch.
pub fn grpo_defaults(steps: usize, seed: u64) -> GrpoConfig {
    GrpoConfig {
        steps,
        prompts: 4,
        group: 8,
        max_new: 160,
        lr: 2e-4,
        seed,
        sampling: SamplingConfig {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            seed,
            ..SamplingConfig::default()
        },
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
    }
}
