//! One SFT step of Qwen2-VL on candle: the fixture's tiny model
//! (`fixtures/qwen2_vl/untied`, 0.3M weights) on its reference batch (two
//! image + chat samples, 157 tokens, 220 patches), forward through the fused
//! log-probs of the answer tokens, backward, and an AdamW update; plain and
//! with every block checkpointed. Besides criterion's times, it prints the
//! step's peak heap (bytes allocated at once above what was live before the
//! step), counted by this binary's allocator.
//!
//! ```text
//! cargo bench -p r1-sgg --bench qwen2_vl_sft
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::ParamsAdamW;
use criterion::{criterion_group, criterion_main, Criterion};
use grpo_kernels::{FusedLinearConfig, LogProbConfig};
use r1_sgg::hf::pretrained::Pretrained;
use r1_sgg::model::qwen2_vl::{Checkpointing, Inputs};
use r1_sgg::train::optim::AdamW;

/// The system allocator, counting the bytes live now and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwards the caller's valid layout to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: `p` came from `alloc` above with this layout.
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The fixture's reference batch and its answer-token mask `[B, T - 1]`.
fn batch() -> (Inputs, Tensor) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen2_vl");
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("reference_untied.safetensors"), &Device::Cpu)
            .expect("the fixture");
    let grids = r["image_grid_thw"]
        .to_vec2::<i64>()
        .expect("grids")
        .into_iter()
        .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
        .collect();
    let labels = &r["labels"];
    let t = labels.dim(1).expect("labels [B, T]");
    let mask = labels
        .narrow(1, 1, t - 1)
        .and_then(|l| l.ne(-100f64))
        .expect("mask");
    let input = Inputs {
        input_ids: r["input_ids"].to_dtype(DType::U32).expect("ids"),
        attention_mask: Some(r["attention_mask"].clone()),
        pixel_values: Some(r["pixel_values"].clone()),
        image_grid_thw: grids,
        position_ids: None,
    };
    (input, mask)
}

fn sft_step(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen2_vl/untied");
    let (input, mask) = batch();
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            ignore_index: None,
            ..LogProbConfig::default()
        },
        ..FusedLinearConfig::default()
    };
    let mut group = c.benchmark_group("qwen2_vl_sft_step_cpu");
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
        let mut qwen = Pretrained::load(&dir, DType::F32, &Device::Cpu).expect("the fixture model");
        qwen.model.set_checkpointing(checkpointing);
        let params = ParamsAdamW {
            lr: 1e-5,
            ..Default::default()
        };
        let mut opt = AdamW::new(&qwen.vars, params, |_| true, false).expect("an optimizer");
        let mut step = || {
            let lp = qwen
                .model
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
            let grads = qwen.model.backward(&loss).expect("gradients");
            opt.step(&grads).expect("an update");
        };
        step();
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        step();
        let peak = PEAK.load(Ordering::Relaxed) - before;
        println!(
            "qwen2_vl_sft_step_cpu/{name}: peak heap above the step's start {:.2} MB",
            peak as f64 / 1e6
        );
        group.bench_function(name, |b| b.iter(&mut step));
    }
    group.finish();
}

criterion_group!(benches, sft_step);
criterion_main!(benches);
