//! Sampling completions: the image and prompt run once into a KV cache,
//! then one token per step for every completion through the crate's fused
//! sampler, until EOS or the length limit.

use candle_core::{DType, Result, Tensor};
use grpo_kernels::candle::sample;
use grpo_kernels::SamplingConfig;

use super::batch::image_batch;
use crate::data::Sample;
use crate::model::tiny_tokenizer::{EOS, TASK};
use crate::model::Vlm;

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
