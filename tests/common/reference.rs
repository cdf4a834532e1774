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
