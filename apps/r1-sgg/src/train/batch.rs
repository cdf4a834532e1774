//! A batch as tensors: images, token rows with their mask, and the
//! log-probs of each next token from the fused LM-head op.

use candle_core::{Device, Result, Tensor};
use grpo_kernels::candle::fused_linear_logprobs;
use grpo_kernels::{FusedLinearConfig, LogProbConfig};

use crate::data::Sample;
use crate::model::tiny_tokenizer::{PAD, TASK};
use crate::model::Vlm;

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
