//! One GRPO loss step with the crate's CPU ops, on random data: sample
//! completions' tokens, score them, normalize advantages per group, take
//! token log-probs of the logits, the clipped policy loss, and its gradient
//! all the way back to the logits.
//!
//! `cargo run --release --example quickstart`

use grpo_kernels::{
    group_advantages, policy_loss, policy_loss_backward, sample, token_logprobs, token_logprobs_backward,
    Advantage, AdvantageMode, LogProbConfig, LogProbGrads, LogitRows, PolicyLossConfig, PolicyLossInputs,
    Rewards, SampleInputs, SamplingConfig, SeqLayout,
};

fn main() -> Result<(), grpo_kernels::Error> {
    // 2 prompts x 4 completions of 48 tokens over a 5,000-token vocabulary.
    let (prompts, group, len, vocab) = (2, 4, 48, 5_000);
    let (seqs, rows) = (prompts * group, prompts * group * len);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let logits: Vec<f32> = (0..rows * vocab).map(|_| 6.0 * noise()).collect();

    // The completions' tokens, drawn from the logits (temperature 1, top-p 0.9).
    let cfg = SamplingConfig {
        top_p: 0.9,
        seed: 7,
        ..SamplingConfig::default()
    };
    let drawn = sample(&SampleInputs::new(&logits, vocab), &cfg)?;

    // One reward per completion; advantages normalized within each prompt's group.
    let rewards: Vec<f32> = (0..seqs).map(|_| (noise() + 0.5) * 10.0).collect();
    let adv = group_advantages(&Rewards::new(&rewards, group), AdvantageMode::default())?;

    // Token log-probs (with entropy) of the drawn tokens, then the loss.
    let lp_cfg = LogProbConfig {
        entropy: true,
        ..LogProbConfig::default()
    };
    let rows_in = LogitRows::new(&logits, &drawn.tokens, vocab);
    let lp = token_logprobs(&rows_in, &lp_cfg)?;
    let old: Vec<f32> = lp.logp.iter().map(|&l| l + 0.05 * noise()).collect();
    let layout = SeqLayout::Padded {
        batch: seqs,
        seq_len: len,
    };
    let inputs =
        PolicyLossInputs::new(&lp.logp, Advantage::per_sequence(&adv.advantages), layout).with_old(&old);
    let loss_cfg = PolicyLossConfig {
        beta: 0.0,
        ..PolicyLossConfig::default()
    };
    let loss = policy_loss(&inputs, &loss_cfg)?;

    // Backward: dloss/dlogp, then dloss/dlogits.
    let dlogp = policy_loss_backward(&inputs, &loss_cfg, 1.0, None)?;
    let grads = LogProbGrads {
        logp: &dlogp[..],
        entropy: None,
        lse: None,
    };
    let dlogits = token_logprobs_backward(&rows_in, &lp_cfg, &lp.saved(), &grads)?;
    let norm = dlogits.iter().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();

    let stats = loss.stats();
    let mean_entropy = lp
        .entropy
        .as_ref()
        .map_or(0.0, |h| h.iter().sum::<f32>() / rows as f32);
    println!("{seqs} completions x {len} tokens, vocabulary {vocab}");
    println!("loss                 {:+.6}", stats.loss);
    println!("|dloss/dlogits|      {norm:.6}");
    println!("clip fraction low    {:.4}", stats.clip_frac_low);
    println!("clip fraction high   {:.4}", stats.clip_frac_high);
    println!(
        "mean ratio           {:.4} (max {:.4})",
        stats.ratio_mean, stats.ratio_max
    );
    println!("mean entropy         {mean_entropy:.4} nats");
    println!("advantages, group 0  {:?}", &adv.advantages[..group]);
    Ok(())
}
