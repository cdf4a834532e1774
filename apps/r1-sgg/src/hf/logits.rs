//! The `logits` tool: a checkpoint's logits for one image and prompt, with
//! every input that produced them, in a safetensors file that
//! `scripts/compare_logits.py` feeds to transformers. This is how a user checks
//! a downloaded, converted or trained model against the reference
//! implementation.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::pretrained::Pretrained;
use super::tokenizer::{Content, Message, Part};
use crate::model::qwen2_vl::Inputs;
use crate::util::fs::write_atomically;

/// Runs the model of `model_dir` on one user turn (`image`, then `prompt`)
/// rendered by its chat template with the generation prompt, and writes to
/// `out`: `input_ids` `[1, T]` and `image_grid_thw` `[1, 3]` (I64),
/// `pixel_values` `[N, C*T*P*P]`, `position_ids` `[3, 1, T]` (I64) and
/// `logits` `[1, T, V]` (F32), with the rendered text in the metadata.
pub fn write_logits(
    model_dir: &Path,
    image: &Path,
    prompt: &str,
    out: &Path,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    let qwen = Pretrained::load(model_dir, dtype, device)?;
    let messages = [Message {
        role: "user".into(),
        content: Content::Parts(vec![Part::Image, Part::Text { text: prompt.into() }]),
    }];
    let picture = qwen.processor.image_processor.load_image(image)?;
    let processed = qwen.processor.process(&messages, &[picture], true)?;
    let t = processed.input_ids.len();
    let input = Inputs {
        input_ids: Tensor::from_slice(&processed.input_ids, (1, t), device)?,
        attention_mask: None,
        pixel_values: Some(processed.images.pixel_values_tensor(device)?.to_dtype(dtype)?),
        image_grid_thw: processed.images.grid_thw.clone(),
        position_ids: None,
    };
    let positions = qwen.model.rope_index(&input)?.to_tensor(&Device::Cpu)?;
    let logits = qwen
        .model
        .logits(&input)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let grid: Vec<i64> = processed.images.grid_thw[0].iter().map(|&g| g as i64).collect();
    let ids: Vec<i64> = processed.input_ids.iter().map(|&id| id as i64).collect();
    let cpu = Device::Cpu;
    let tensors: HashMap<String, Tensor> = [
        ("input_ids", Tensor::from_vec(ids, (1, t), &cpu)?),
        ("image_grid_thw", Tensor::from_vec(grid, (1, 3), &cpu)?),
        ("pixel_values", processed.images.pixel_values_tensor(&cpu)?),
        ("position_ids", positions),
        ("logits", logits.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let metadata: HashMap<String, String> = [
        ("model", model_dir.display().to_string()),
        ("image", image.display().to_string()),
        ("text", processed.text.clone()),
        ("dtype", format!("{dtype:?}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors::tensor::serialize(&tensors, Some(metadata)).context("serializing the logits")?;
    write_atomically(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    let next = logits.squeeze(0)?.get(t - 1)?.argmax(0)?.to_scalar::<u32>()?;
    println!(
        "{} tokens ({} image tokens, grid {:?}), logits [1, {t}, {}] written to {}; greedy next token {next} {:?}",
        t,
        qwen.processor.image_processor.num_image_tokens(processed.images.grid_thw[0]),
        processed.images.grid_thw[0],
        logits.dim(2)?,
        out.display(),
        qwen.processor.tokenizer.decode(&[next], false)?,
    );
    Ok(())
}
