//! Sampling completions: a model's prompt runs once into a KV cache
//! ([`Decoder`]), then every row gets one token per step from the crate's
//! fused sampler ([`sample`]: temperature, top-k, top-p, Philox keyed by the
//! seed and the step), until a stop token or the length limit.

use candle_core::{DType, Result, Tensor};
use grpo_kernels::candle::sample;
use grpo_kernels::SamplingConfig;

/// A batch being decoded: the model with its KV cache after the prompt.
pub trait Decoder {
    /// Appends one token per row (`tokens` `[rows]` U32) and returns the
    /// next-token logits `[rows, V]`.
    fn step(&mut self, tokens: &Tensor) -> Result<Tensor>;

    /// Keeps only the rows `rows` (indices of the current rows, in order),
    /// so that finished rows cost nothing more; returns false when this
    /// decoder keeps every row instead (finished rows then go on decoding
    /// and their tokens are ignored).
    fn keep_rows(&mut self, rows: &[usize]) -> Result<bool>;
}

/// The sampler's settings for decoding step `step` of a generation keyed by
/// `sampling.step` (the training step): each decoding step draws from its own
/// part of the Philox stream.
pub fn step_sampling(sampling: &SamplingConfig, step: usize) -> SamplingConfig {
    SamplingConfig {
        step: sampling.step.wrapping_mul(1 << 16).wrapping_add(step as u64),
        ..*sampling
    }
}

/// Samples up to `max_new` tokens per row, starting from the prompt's
/// next-token `logits` `[B, V]`: each row's tokens up to and including the
/// first of `stop`. Rows that stop are dropped from the batch when the
/// decoder allows it ([`Decoder::keep_rows`]): the fused sampler then sees
/// only the live rows, so which random numbers a row draws depends on which
/// rows finished before it (the same for the same seed and inputs).
pub fn sample_completions(
    decoder: &mut dyn Decoder,
    mut logits: Tensor,
    max_new: usize,
    sampling: &SamplingConfig,
    stop: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let b = logits.dim(0)?;
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    // The original row of each row the decoder holds.
    let mut live: Vec<usize> = (0..b).collect();
    for step in 0..max_new {
        let (mut tokens, _) = sample(&logits.to_dtype(DType::F32)?, &step_sampling(sampling, step))?;
        let ids = tokens.to_vec1::<u32>()?;
        for (&row, &id) in live.iter().zip(&ids) {
            if !done[row] {
                out[row].push(id);
                done[row] = stop.contains(&id);
            }
        }
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        if live.iter().any(|&row| done[row]) {
            let keep: Vec<usize> = (0..live.len()).filter(|&j| !done[live[j]]).collect();
            if decoder.keep_rows(&keep)? {
                let index = Tensor::from_vec(
                    keep.iter().map(|&j| j as u32).collect::<Vec<_>>(),
                    keep.len(),
                    tokens.device(),
                )?;
                tokens = tokens.index_select(&index, 0)?;
                live = keep.iter().map(|&j| live[j]).collect();
            }
        }
        logits = decoder.step(&tokens)?;
    }
    Ok(out)
}
