//! One GRPO step of Qwen2-VL as R1-SGG takes it, on candle with this
//! crate's kernels: `G` completions of each prompt sampled from the shared
//! prompt cache (temperature 1.0, top-k 50, top-p 0.9: R1-SGG's), then the
//! update on them: for each prompt's `G` completions (one micro-batch, as
//! R1-SGG's per-device 8) the vision tower once, the teacher-forced
//! log-probs of the completion tokens through the fused LM-head op, the
//! BNPO policy loss (beta 0, epsilon 0.2, one inner step: ratio 1), the
//! backward with every block checkpointed; one AdamW step (f32 moments,
//! f32 master weights of bf16 weights) over the accumulated gradients.
//! Completions run to `MAX_NEW` tokens (no stop token: random weights
//! rarely emit one, and a fixed length makes the two sides comparable).
//!
//! Prints generated tokens per second of the rollout and the update's
//! seconds (best and median of `RUNS`), and writes the completions and
//! advantages to `QWEN2VL_BENCH_ROLLOUTS` when set, so that
//! `scripts/qwen2_vl_grpo_torch.py` runs transformers' `generate` with the
//! same settings and TRL's GRPO loss path on the very same tensors. Peak
//! GPU memory: `bench/gpu/run.sh qwen2vl-grpo` samples it with nvidia-smi.
//!
//! ```text
//! python apps/r1-sgg/scripts/qwen2_vl_bench_batch.py --config apps/r1-sgg/fixtures/qwen2_vl/untied/config.json \
//!     --out /tmp/prompts.safetensors --samples 2 --tokens 96 --image-side 56
//! QWEN2VL_BENCH_CONFIG=fixtures/qwen2_vl/untied/config.json QWEN2VL_BENCH_BATCH=/tmp/prompts.safetensors \
//!     QWEN2VL_BENCH_GROUP=4 QWEN2VL_BENCH_MAX_NEW=16 QWEN2VL_BENCH_ROLLOUTS=/tmp/rollouts.safetensors \
//!     cargo bench -p r1-sgg --bench qwen2_vl_grpo
//! ```
//!
//! Settings (`QWEN2VL_BENCH_*`): `CONFIG` (a config.json, random weights;
//! else the fixture's tiny checkpoint), `BATCH` (the prompts: the batch
//! file's rows, all of the same length; its labels are ignored), `DEVICE`
//! (`cuda`), `DTYPE` (`bf16`), `GROUP` (8), `MAX_NEW` (256), `RUNS` (3),
//! `ROLLOUTS`.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{ParamsAdamW, VarMap};
use grpo_kernels::candle::{fused_linear_logprobs, policy_loss, PolicyLossTensors};
use grpo_kernels::{
    group_advantages, AdvantageMode, Aggregation, FusedLinearConfig, LogProbConfig, PolicyLossConfig,
    Rewards, SamplingConfig,
};
use r1_sgg::model::qwen2_vl::{Checkpointing, Inputs, Qwen2Vl};
use r1_sgg::train::optim::AdamW;
use r1_sgg::train::policy::qwen_rollout;
use r1_sgg::util::rng::Rng;

#[path = "common/qwen2_vl.rs"]
mod common;
use common::{batch_file, number, read_batch, setting};

/// Best and median of `xs`.
fn best_median(mut xs: Vec<f64>, higher_is_better: bool) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    let best = if higher_is_better { xs[xs.len() - 1] } else { xs[0] };
    (best, xs[xs.len() / 2])
}

/// Adds `grads` into `sum`, variable by variable.
fn accumulate(sum: &mut Option<GradStore>, mut grads: GradStore, vars: &VarMap) {
    let Some(total) = sum else {
        *sum = Some(grads);
        return;
    };
    for var in vars.all_vars() {
        if let Some(g) = grads.remove(var.as_tensor()) {
            let s = match total.remove(var.as_tensor()) {
                Some(s) => (s + g).expect("a sum of gradients"),
                None => g,
            };
            total.insert(var.as_tensor(), s);
        }
    }
}

/// The update of one GRPO step on `completions` (`group` per prompt of
/// `prompts`), one micro-batch per prompt; returns the loss.
#[allow(clippy::too_many_arguments)]
fn update(
    model: &Qwen2Vl,
    vars: &VarMap,
    opt: &mut AdamW,
    prompts: &Inputs,
    completions: &Tensor,
    advantages: &[f32],
    group: usize,
    device: &Device,
) -> f32 {
    let (b, p) = prompts.input_ids.dims2().expect("[B, P]");
    let c = completions.dim(1).expect("[B * G, C]");
    let pixels = prompts.pixel_values.as_ref().expect("pixels");
    let chunks = if device.is_cuda() {
        FusedLinearConfig::gpu()
    } else {
        FusedLinearConfig::default()
    };
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            ignore_index: None,
            temperature: 1.0,
            ..LogProbConfig::default()
        },
        ..chunks
    };
    let loss_cfg = PolicyLossConfig {
        eps_low: 0.2,
        eps_high: 0.2,
        beta: 0.0,
        aggregation: Aggregation::TokenMean { normalizer: None },
        ..PolicyLossConfig::default()
    };
    let mask = prompts
        .attention_mask
        .as_ref()
        .expect("a mask")
        .to_dtype(DType::U8)
        .expect("mask");
    let (mut sum, mut total) = (None, 0f32);
    let mut patch = 0;
    for r in 0..b {
        let grid = prompts.image_grid_thw[r];
        let n = grid[0] * grid[1] * grid[2];
        let px = pixels.narrow(0, patch, n).expect("this prompt's patches");
        patch += n;
        let rows = |t: &Tensor| {
            t.narrow(0, r, 1)
                .and_then(|t| t.repeat((group, 1)))
                .expect("rows")
        };
        let comp = completions.narrow(0, r * group, group).expect("completions");
        let ids = Tensor::cat(&[rows(&prompts.input_ids), comp.clone()], 1).expect("ids");
        let ones = Tensor::ones((group, c), DType::U8, device).expect("ones");
        let row_mask = Tensor::cat(&[rows(&mask), ones.clone()], 1).expect("mask");
        let input = Inputs {
            input_ids: ids,
            attention_mask: Some(row_mask),
            pixel_values: None,
            image_grid_thw: vec![grid; group],
            position_ids: None,
        };
        // The vision tower once for the prompt, its rows repeated for the group.
        let vision = model.vision_embeds(&px, &[grid]).expect("vision");
        let vision = vision.repeat((group, 1)).expect("vision rows");
        let hidden = model
            .hidden_states_with_image_embeds(&input, &vision)
            .expect("hidden states");
        let lp = fused_linear_logprobs(
            &hidden.narrow(1, p - 1, c).expect("completion positions"),
            &model.lm_head_weight(),
            &comp,
            Some(&ones),
            &cfg,
        )
        .expect("log-probs");
        let adv = Tensor::new(&advantages[r * group..(r + 1) * group], device).expect("advantages");
        let out = policy_loss(
            &lp.logp,
            &PolicyLossTensors {
                old_logp: None,
                ref_logp: None,
                advantages: &adv,
                mask: Some(&ones),
                cu_seqlens: None,
                pg_weights: None,
            },
            &loss_cfg,
        )
        .expect("the policy loss");
        let loss = (out.loss / b as f64).expect("scaled");
        total += out.stats.loss / b as f32;
        accumulate(&mut sum, model.backward(&loss).expect("gradients"), vars);
    }
    opt.step(&sum.expect("gradients")).expect("an update");
    device.synchronize().expect("the device finishes the step");
    total
}

fn main() {
    let (device, dtype) = (common::device(), common::dtype());
    let (group, max_new, runs) = (number("GROUP", 8), number("MAX_NEW", 256), number("RUNS", 3));
    let (mut model, vars) = common::model(dtype, &device);
    model.set_checkpointing(Checkpointing {
        text: true,
        vision: true,
    });
    let (prompts, _) = read_batch(&batch_file(), dtype, &device);
    let (b, p) = prompts.input_ids.dims2().expect("[B, P]");
    let params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
    println!(
        "Qwen2-VL {} ({params} weights, {dtype:?}, {device:?}): {b} prompts of {p} tokens, G = {group}, \
         {max_new} new tokens, T 1.0, top-k 50, top-p 0.9",
        setting("CONFIG").unwrap_or_else(|| "fixture untied".into()),
    );

    // Rollouts.
    let mut rates = Vec::new();
    let mut completions = Vec::new();
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
        completions = qwen_rollout(&model, &prompts, group, max_new, &sampling, &[]).expect("rollouts");
        device.synchronize().expect("the device finishes");
        let seconds = t0.elapsed().as_secs_f64();
        let tokens: usize = completions.iter().map(Vec::len).sum();
        rates.push(tokens as f64 / seconds);
        println!("  rollout run {run}: {tokens} tokens in {seconds:.2} s");
    }
    let (best, median) = best_median(rates, true);
    println!("qwen2_vl_grpo/rollout: best {best:.0} tokens/s, median {median:.0} tokens/s");

    // Rewards drawn at random (a random model's answers score nothing),
    // normalized per group as R1-SGG does: (r - mean) / (std + 1e-4).
    let mut rng = Rng::new(3);
    let rewards: Vec<f32> = (0..b * group).map(|_| rng.uniform() * 10.0).collect();
    let advantages = group_advantages(&Rewards::new(&rewards, group), AdvantageMode::default())
        .expect("advantages")
        .advantages;
    let c = completions[0].len();
    let flat: Vec<u32> = completions.iter().flatten().copied().collect();
    let completions = Tensor::from_vec(flat, (b * group, c), &device).expect("completions");
    if let Some(path) = setting("ROLLOUTS") {
        let tensors = [
            ("completions", completions.to_dtype(DType::I64).expect("ids")),
            (
                "advantages",
                Tensor::new(advantages.as_slice(), &device).expect("advantages"),
            ),
        ];
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path).expect("the rollouts file");
        println!("rollouts written to {path}");
    }

    // The update.
    let params = ParamsAdamW {
        lr: 6e-7,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(&vars, params, |_| true, dtype != DType::F32).expect("an optimizer");
    let mut seconds = Vec::new();
    for run in 0..runs.max(2) {
        let t0 = Instant::now();
        let loss = update(
            &model,
            &vars,
            &mut opt,
            &prompts,
            &completions,
            &advantages,
            group,
            &device,
        );
        let s = t0.elapsed().as_secs_f64();
        println!("  update run {run}: loss {loss:.6}, {s:.3} s");
        // The first step also allocates the optimizer's states.
        if run > 0 {
            seconds.push(s);
        }
    }
    let (best, median) = best_median(seconds, false);
    println!("qwen2_vl_grpo/update: best {best:.3} s, median {median:.3} s");
}
