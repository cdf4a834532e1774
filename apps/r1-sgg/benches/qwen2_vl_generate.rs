//! GRPO rollouts of Qwen2-VL on the CPU: generated tokens per second of
//! [`QwenPolicy::generate_with`] on the fixture's tiny model
//! (`fixtures/qwen2_vl/untied`, f32), R1-SGG's GRPO prompt (think system
//! prompt, open vocabulary) on synthetic images, `G` completions per prompt
//! sampled at temperature 1.0, top-k 50, top-p 0.9 (R1-SGG's), up to
//! `MAX_NEW` tokens; with the prompt's cache shared by its completions and,
//! for comparison, with every completion running its own prompt and image
//! (what transformers' `generate(num_return_sequences=G)` does). A printed
//! measurement (the best and the median of the runs), not a criterion
//! bench: one rollout takes seconds.
//!
//! ```text
//! cargo bench -p r1-sgg --bench qwen2_vl_generate
//! PROMPTS=4 GROUP=8 MAX_NEW=128 RUNS=3 INPUTS=/tmp/prompts.safetensors cargo bench -p r1-sgg --bench qwen2_vl_generate
//! python apps/r1-sgg/scripts/qwen2_vl_generate_torch.py --model apps/r1-sgg/fixtures/qwen2_vl/untied \
//!     --inputs /tmp/prompts.safetensors --group 8 --max-new 128
//! ```
//!
//! With `INPUTS`, the left-padded prompt batch (input ids, attention mask,
//! pixel values, grids) is written there for the transformers script, which
//! generates from the very same inputs.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use grpo_kernels::SamplingConfig;
use r1_sgg::data::prompt::{PromptStyle, SystemPrompt};
use r1_sgg::data::synthetic::{generate_split, Split};
use r1_sgg::data::Sample;
use r1_sgg::model::qwen2_vl::Checkpointing;
use r1_sgg::train::policy::{QwenOptions, QwenPolicy};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (prompts, group, max_new, runs) = (
        env("PROMPTS", 4),
        env("GROUP", 8),
        env("MAX_NEW", 128),
        env("RUNS", 3),
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen2_vl/untied");
    let options = QwenOptions {
        dtype: DType::F32,
        prompt: PromptStyle {
            system: SystemPrompt::Think,
            vocabulary: None,
        },
        max_pixels: Some(512 * 28 * 28),
        freeze_vision: false,
        checkpointing: Checkpointing::default(),
    };
    let q = QwenPolicy::load(&dir, &Device::Cpu, options).expect("the fixture model");
    let data = generate_split(Split::Shifted, prompts, 0);
    let samples: Vec<&Sample> = data.iter().collect();
    let inputs = q.prompt_inputs(&samples).expect("prompts");
    let (b, t) = inputs.input_ids.dims2().expect("[B, T]");
    println!(
        "fixture Qwen2-VL (f32, CPU, {} threads): {b} prompts of up to {t} tokens ({} image patches), G = {group}, up to {max_new} new tokens, T 1.0, top-k 50, top-p 0.9",
        rayon::current_num_threads(),
        inputs.image_grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum::<usize>(),
    );
    if let Ok(path) = std::env::var("INPUTS") {
        let grids: Vec<i64> = inputs
            .image_grid_thw
            .iter()
            .flatten()
            .map(|&v| v as i64)
            .collect();
        let n = inputs.image_grid_thw.len();
        let tensors = [
            ("input_ids", inputs.input_ids.to_dtype(DType::I64).expect("ids")),
            (
                "attention_mask",
                inputs
                    .attention_mask
                    .as_ref()
                    .expect("a mask")
                    .to_dtype(DType::I64)
                    .expect("mask"),
            ),
            ("pixel_values", inputs.pixel_values.clone().expect("pixels")),
            (
                "image_grid_thw",
                Tensor::from_vec(grids, (n, 3), &Device::Cpu).expect("grids"),
            ),
        ];
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path).expect("the inputs file");
        println!("inputs written to {path}");
    }
    for (name, share) in [
        ("shared prompt cache", true),
        ("each completion its own prompt", false),
    ] {
        let mut rates = Vec::new();
        for run in 0..runs {
            let sampling = SamplingConfig {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.9,
                seed: 7,
                step: run as u64,
                ..SamplingConfig::default()
            };
            let t0 = Instant::now();
            let out = q
                .generate_with(&samples, group, max_new, &sampling, share)
                .expect("rollouts");
            let seconds = t0.elapsed().as_secs_f64();
            let tokens: usize = out.iter().map(Vec::len).sum();
            rates.push(tokens as f64 / seconds);
            println!("  {name}, run {run}: {tokens} tokens in {seconds:.2} s");
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "qwen2_vl_generate/{name}: best {:.0} tokens/s, median {:.0} tokens/s",
            rates[rates.len() - 1],
            rates[rates.len() / 2]
        );
    }
}
