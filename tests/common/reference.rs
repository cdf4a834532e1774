//! Independent f64 references, written from the definitions, shared by the
//! suites that check an op through different front ends.

/// `(logp, entropy, lse)` of each row in f64, straight from the definitions.
pub fn logprob_rows(logits: &[f64], targets: &[usize], vocab: usize, t: f64) -> Vec<(f64, f64, f64)> {
    logits
        .chunks(vocab)
        .zip(targets)
        .map(|(row, &y)| {
            let x: Vec<f64> = row.iter().map(|z| z / t).collect();
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let h = -x
                .iter()
                .map(|v| {
                    let p = (v - lse).exp();
                    if p > 0.0 {
                        p * (v - lse)
                    } else {
                        0.0
                    }
                })
                .sum::<f64>();
            (x[y] - lse, h, lse)
        })
        .collect()
}

/// A KL estimate from `d = ref_logp - logp` in f64 (`LowVarK3` without
/// its clamps).
pub fn kl_ref(est: grpo_kernels::KlEstimator, d: f64) -> f64 {
    use grpo_kernels::KlEstimator;
    match est {
        KlEstimator::K1 => -d,
        KlEstimator::K2 => d * d / 2.0,
        KlEstimator::K3 | KlEstimator::LowVarK3 => d.exp_m1() - d,
    }
}
