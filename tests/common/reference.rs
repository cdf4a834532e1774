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

/// A KL estimate from `d = ref_logp - logp` in f64, without `LowVarK3`'s
/// clamps (straight-through estimators: their value's estimator).
pub fn kl_ref(est: grpo_kernels::KlEstimator, d: f64) -> f64 {
    use grpo_kernels::KlEstimator;
    match est {
        KlEstimator::K1 | KlEstimator::K1StraightThrough => -d,
        KlEstimator::K2 => d * d / 2.0,
        KlEstimator::K3 | KlEstimator::LowVarK3 | KlEstimator::LowVarK3StraightThrough => d.exp_m1() - d,
        KlEstimator::Abs | KlEstimator::AbsStraightThrough => d.abs(),
    }
}

/// The estimator whose value's derivative is `est`'s gradient: `K2` for
/// the straight-through ones (verl's `k2 - sg(k2) + sg(value)`), `est`
/// itself otherwise.
pub fn kl_grad_source(est: grpo_kernels::KlEstimator) -> grpo_kernels::KlEstimator {
    if est.is_straight_through() {
        grpo_kernels::KlEstimator::K2
    } else {
        est
    }
}

/// A KL estimate from `d = ref_logp - logp` in f64, `LowVarK3`'s clamps
/// included, from Schulman's definitions and verl's `kl_penalty_forward`.
pub fn kl_value_ref(est: grpo_kernels::KlEstimator, d: f64) -> f64 {
    use grpo_kernels::KlEstimator;
    match est {
        KlEstimator::LowVarK3 | KlEstimator::LowVarK3StraightThrough => {
            kl_ref(est, d.clamp(-20.0, 20.0)).clamp(-10.0, 10.0)
        }
        _ => kl_ref(est, d),
    }
}

/// `d estimate / d logp` in f64, analytic: `1`, `-d`, `1 - e^d`, 0 where a
/// `LowVarK3` clamp is active, `-sign(d)` (0 at 0, torch's), and `-d` for
/// the straight-through estimators.
pub fn kl_grad_ref(est: grpo_kernels::KlEstimator, d: f64) -> f64 {
    use grpo_kernels::KlEstimator;
    match kl_grad_source(est) {
        KlEstimator::K1 => 1.0,
        KlEstimator::K2 => -d,
        KlEstimator::K3 => -d.exp_m1(),
        KlEstimator::LowVarK3 if d.abs() <= 20.0 && d.exp_m1() - d <= 10.0 => -d.exp_m1(),
        KlEstimator::LowVarK3 => 0.0,
        _ if d == 0.0 => 0.0,
        _ => -d.signum(),
    }
}
