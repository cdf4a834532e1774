//! One SFT step of Qwen2-VL on candle: forward through the fused log-probs of
//! the answer tokens, backward, and an AdamW update; plain and with every
//! block checkpointed. Besides criterion's times it prints the step's peak
//! heap (bytes allocated at once above what was live before the step),
//! counted by this binary's allocator; on CUDA, watch the GPU's memory
//! instead (`bench/gpu/run.sh qwen2vl` samples it).
//!
//! By default: the fixture's tiny model (`fixtures/qwen2_vl/untied`, 0.3M
//! weights, f32, CPU) on its reference batch (two image + chat samples, 157
//! tokens, 220 patches). `scripts/qwen2_vl_sft_torch.py` times the same step
//! in transformers. For the real size:
//!
//! ```text
//! QWEN2VL_BENCH_CONFIG=apps/r1-sgg/fixtures/qwen2_vl/configs/qwen2-vl-2b-instruct.json  # random weights
//! QWEN2VL_BENCH_BATCH=batch.safetensors     # scripts/qwen2_vl_bench_batch.py writes one
//! QWEN2VL_BENCH_DEVICE=cuda QWEN2VL_BENCH_DTYPE=bf16 cargo bench -p r1-sgg --features cuda --bench qwen2_vl_sft
//! ```

use candle_core::{DType, Device, Tensor};
use candle_nn::ParamsAdamW;
use criterion::{criterion_group, criterion_main, Criterion};
use grpo_kernels::{FusedLinearConfig, LogProbConfig};
use r1_sgg::model::qwen2_vl::{Checkpointing, Inputs};
use r1_sgg::train::optim::AdamW;

#[path = "../../../benches/util/peak_heap.rs"]
mod peak_heap;
use peak_heap::{peak_extra, Counting};

#[path = "common/qwen2_vl.rs"]
mod common;
use common::{batch_file, model, read_batch};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The batch file's inputs and its answer-token mask `[B, T - 1]` (labels not -100).
fn batch(path: &std::path::Path, dtype: DType, device: &Device) -> (Inputs, Tensor) {
    let (input, r) = read_batch(path, dtype, device);
    let labels = &r["labels"];
    let t = labels.dim(1).expect("labels [B, T]");
    let mask = labels
        .narrow(1, 1, t - 1)
        .and_then(|l| l.ne(-100f64))
        .expect("mask");
    (input, mask)
}

fn sft_step(c: &mut Criterion) {
    let (device, dtype) = (common::device(), common::dtype());
    let (input, mask) = batch(&batch_file(), dtype, &device);
    // On a GPU, the chunk sizes that keep cuBLAS near its peak.
    let chunks = if device.is_cuda() {
        FusedLinearConfig::gpu()
    } else {
        FusedLinearConfig::default()
    };
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            ignore_index: None,
            ..LogProbConfig::default()
        },
        ..chunks
    };
    let mut group = c.benchmark_group(format!(
        "qwen2_vl_sft_step_{}",
        if device.is_cuda() { "cuda" } else { "cpu" }
    ));
    group.sample_size(10);
    for (name, checkpointing) in [
        ("plain", Checkpointing::default()),
        (
            "checkpointed",
            Checkpointing {
                text: true,
                vision: true,
            },
        ),
    ] {
        let (mut model, vars) = model(dtype, &device);
        model.set_checkpointing(checkpointing);
        let params = ParamsAdamW {
            lr: 1e-5,
            ..Default::default()
        };
        let mut opt = AdamW::new(&vars, params, |_| true, false).expect("an optimizer");
        let mut step = || {
            let lp = model
                .token_logprobs(&input, Some(&mask), &cfg)
                .expect("log-probs");
            let count = mask
                .to_dtype(DType::F32)
                .and_then(|m| m.sum_all())
                .expect("count");
            let loss = lp
                .logp
                .sum_all()
                .and_then(|s| s.neg())
                .and_then(|s| s.broadcast_div(&count))
                .expect("loss");
            let grads = model.backward(&loss).expect("gradients");
            opt.step(&grads).expect("an update");
            device.synchronize().expect("the device finishes the step");
        };
        step();
        let peak = peak_extra(&mut step);
        println!(
            "{name}: peak heap above the step's start {:.2} MB",
            peak as f64 / 1e6
        );
        group.bench_function(name, |b| b.iter(&mut step));
    }
    group.finish();
}

criterion_group!(benches, sft_step);
criterion_main!(benches);
