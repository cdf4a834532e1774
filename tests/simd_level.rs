//! What is reproducible: every op of a GRPO step that does not call a
//! matrix-product library gives the same bits on 1, 2 or 3 threads, and with
//! AVX-512 allowed or forced off (the AVX2 copies); the portable level
//! (`set_simd_level`, `GRPO_KERNELS_SIMD`) routes to the copies without fused
//! multiply-adds. One test, since the cap is process-wide.

mod common;

use common::Rng;
use grpo_kernels::{
    active_simd_level, group_advantages, kl_divergence, kl_divergence_backward, policy_loss,
    policy_loss_backward, sample, set_simd_level, simd_level, token_logprobs, token_logprobs_backward,
    Advantage, AdvantageMode, KlEstimator, KlInputs, LogProbConfig, LogProbGrads, LogitRows,
    PolicyLossConfig, PolicyLossInputs, Rewards, SampleInputs, SamplingConfig, SeqLayout, SimdLevel,
};

/// Every output of a GRPO step's CPU ops on fixed random inputs, as bits.
fn outputs(seqs: usize, len: usize) -> Vec<(&'static str, Vec<u32>)> {
    let (vocab, group) = (1283, 3);
    let rows = seqs * len;
    let mut rng = Rng::new(11);
    let logits: Vec<f32> = (0..rows * vocab).map(|_| (rng.normal() * 4.0) as f32).collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let cfg = SamplingConfig {
        top_k: 50,
        top_p: 0.9,
        seed: 3,
        ..SamplingConfig::default()
    };
    let drawn = sample(&SampleInputs::new(&logits, vocab), &cfg).unwrap();
    let rewards: Vec<f32> = (0..seqs).map(|_| rng.uniform() as f32).collect();
    let adv = group_advantages(&Rewards::new(&rewards, group), AdvantageMode::default()).unwrap();
    let lp_cfg = LogProbConfig {
        entropy: true,
        ..LogProbConfig::default()
    };
    let rows_in = LogitRows::new(&logits, &drawn.tokens, vocab);
    let lp = token_logprobs(&rows_in, &lp_cfg).unwrap();
    let old: Vec<f32> = lp.logp.iter().map(|&l| l + 0.1 * rng.normal() as f32).collect();
    let layout = SeqLayout::Padded {
        batch: seqs,
        seq_len: len,
    };
    let inputs = PolicyLossInputs::new(&lp.logp, Advantage::per_sequence(&adv.advantages), layout)
        .with_old(&old)
        .with_ref(&old);
    let loss_cfg = PolicyLossConfig::default();
    let loss = policy_loss(&inputs, &loss_cfg).unwrap();
    let dlogp = policy_loss_backward(&inputs, &loss_cfg, 1.0, None).unwrap();
    let grads = LogProbGrads {
        logp: &dlogp[..],
        entropy: None,
        lse: None,
    };
    let dlogits = token_logprobs_backward(&rows_in, &lp_cfg, &lp.saved(), &grads).unwrap();
    let kl = KlInputs::new(&lp.logp, &old);
    let mut out = vec![
        ("sample tokens", drawn.tokens.clone()),
        ("sample logp", bits(&drawn.logp)),
        ("advantages", bits(&adv.advantages)),
        ("logp", bits(&lp.logp)),
        ("entropy", bits(lp.entropy.as_deref().unwrap())),
        ("loss", vec![loss.loss().to_bits()]),
        ("dlogp", bits(&dlogp)),
        ("dlogits", bits(&dlogits)),
    ];
    for est in [
        KlEstimator::K1,
        KlEstimator::K2,
        KlEstimator::K3,
        KlEstimator::LowVarK3,
        KlEstimator::Abs,
        KlEstimator::K1StraightThrough,
        KlEstimator::LowVarK3StraightThrough,
        KlEstimator::AbsStraightThrough,
    ] {
        out.push(("kl", bits(&kl_divergence(&kl, est).unwrap())));
        out.push((
            "kl backward",
            bits(&kl_divergence_backward(&kl, est, &dlogp).unwrap()),
        ));
    }
    out
}

#[test]
fn threads_and_avx512_change_nothing_and_portable_is_unfused() {
    set_simd_level(SimdLevel::Native);
    // Large enough that every op splits its rows across threads.
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| outputs(96, 64))
    };
    let one = on(1);
    for threads in [2, 3] {
        for ((name, a), (_, b)) in one.iter().zip(&on(threads)) {
            assert!(a == b, "{name}: 1 and {threads} threads disagree");
        }
    }

    let native = outputs(6, 7);
    set_simd_level(SimdLevel::Avx2);
    assert_eq!(simd_level(), SimdLevel::Avx2);
    assert!(active_simd_level() <= SimdLevel::Avx2, "AVX-512 copies still run");
    let avx2 = outputs(6, 7);
    for ((name, a), (_, b)) in native.iter().zip(&avx2) {
        assert!(a == b, "{name}: AVX-512 and AVX2 disagree");
    }

    set_simd_level(SimdLevel::Portable);
    assert_eq!(active_simd_level(), SimdLevel::Portable);
    let portable = outputs(6, 7);
    // The portable KL is the unfused formula, bit for bit.
    let d = [-3.7f32, -0.25, 1e-3, 0.6, 2.9];
    let logp = [0f32; 5];
    let k3 = kl_divergence(&KlInputs::new(&logp, &d), KlEstimator::K3).unwrap();
    for (v, &di) in k3.iter().zip(&d) {
        // (`value` uses the portable copy's multiply-add at this level.)
        assert_eq!(*v, KlEstimator::K3.value(di));
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // Unfused products round differently somewhere: the cap is honored.
        assert!(native.iter().zip(&portable).any(|((_, a), (_, b))| a != b));
    }
    set_simd_level(SimdLevel::Native);
}
