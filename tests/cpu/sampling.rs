//! Token sampling on the CPU: the Philox stream against the published
//! known-answer vectors, the draw against an independent f64 Gumbel-max
//! implementation (token for token), the sampled distribution against the
//! exact filtered distribution (chi-square), determinism, awkward sizes and
//! dtypes, and every bad input.

use crate::common::{assert_close, widen, Rng};
use grpo_kernels::{philox4x32_10, sample, Error, Float, RowStream, SampleInputs, Samples, SamplingConfig};
use half::{bf16, f16};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// The stream

#[test]
fn philox_matches_random123_known_answers() {
    // Random123 kat_vectors, "philox4x32 10": counter, key, expected output.
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        ([0; 4], [0; 2], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (counter, key, want) in kat {
        assert_eq!(
            philox4x32_10(counter, key),
            want,
            "counter {counter:x?} key {key:x?}"
        );
    }
}

/// The uniform of `(seed, row, step, j)`, composed here from the documented
/// layout: lane `j % 4` of the counter `[j / 4, row, step lo, step hi]`
/// under the key `[seed lo, seed hi]`, top 23 bits plus one half.
fn stream_uniform(seed: u64, row: u32, step: u64, j: u32) -> f64 {
    let counter = [j / 4, row, step as u32, (step >> 32) as u32];
    let word = philox4x32_10(counter, [seed as u32, (seed >> 32) as u32])[(j % 4) as usize];
    ((word >> 9) as f64 + 0.5) / (1u64 << 23) as f64
}

fn stream_gumbel(seed: u64, row: u32, step: u64, j: u32) -> f64 {
    -(-stream_uniform(seed, row, step, j).ln()).ln()
}

#[test]
fn stream_follows_the_documented_counter_layout() {
    let cases = [
        (0u64, 0u32, 0u64),
        (42, 3, 7),
        (0xdead_beef_0000_0001, 65_535, 1 << 40),
        (u64::MAX, u32::MAX, u64::MAX),
    ];
    for (seed, row, step) in cases {
        let s = RowStream::new(seed, row, step);
        for j in [0u32, 1, 2, 3, 4, 5, 151_935, u32::MAX] {
            let u = s.uniform(j);
            assert_eq!(
                u as f64,
                stream_uniform(seed, row, step, j),
                "seed {seed} row {row} step {step} j {j}"
            );
            assert!(u > 0.0 && u < 1.0);
            let g = stream_gumbel(seed, row, step, j);
            assert!(
                (s.gumbel(j) as f64 - g).abs() < 4e-6 * g.abs().max(1.0),
                "gumbel {j}"
            );
        }
    }
    // The counter words are the same for any row/step split of the bits.
    assert_ne!(
        RowStream::new(1, 0, 0).bits(0),
        RowStream::new(1 + (1 << 32), 0, 0).bits(0)
    );
    assert_ne!(
        RowStream::new(1, 0, 0).bits(0),
        RowStream::new(1, 0, 1 << 32).bits(0)
    );
}

// ---------------------------------------------------------------------------
// The reference: HF's warpers in f64 on a full sort, then Gumbel-max. Its
// top-p keeps a tie group whole, the crate's documented rule, where HF
// cuts the group in `torch.sort`'s order: `top_p_against_hugging_face`
// (src/ops/sampling.rs) checks the rule against transformers itself.

/// One row's filtered distribution, straight from the definitions.
struct Filtered {
    /// Scaled logits `z / T` (T = 1 when greedy).
    x: Vec<f64>,
    /// Kept by every filter.
    kept: Vec<bool>,
    /// `log softmax(x)` before filtering.
    logp: Vec<f64>,
    /// The probability of each token under the filtered distribution.
    probs: Vec<f64>,
    /// Each token's distance to its top-p or min-p decision, relative to the
    /// mass it is compared with (infinite if no such decision): below
    /// rounding, the op and the reference may decide differently.
    margin: Vec<f64>,
}

fn filter(z: &[f64], cfg: &SamplingConfig) -> Filtered {
    let v = z.len();
    let t = if cfg.temperature == 0.0 {
        1.0
    } else {
        cfg.temperature as f64
    };
    let x: Vec<f64> = z.iter().map(|z| z / t).collect();
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = x.iter().map(|x| (x - m).exp()).collect();
    let lse = m + w.iter().sum::<f64>().ln();
    let logp = x.iter().map(|x| x - lse).collect();

    // TopKLogitsWarper: remove scores < the k-th largest.
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap());
    let tau_k = if cfg.top_k > 0 && cfg.top_k < v {
        x[order[cfg.top_k - 1]]
    } else {
        f64::NEG_INFINITY
    };
    let mut kept: Vec<bool> = x.iter().map(|&x| x >= tau_k).collect();
    let mut margin = vec![f64::INFINITY; v];

    // TopPLogitsWarper over the top-k survivors, with ties kept whole: keep
    // iff the mass strictly above is < p of their total. Walk the sorted
    // survivors a group of equal values at a time.
    if cfg.top_p < 1.0 {
        let p = cfg.top_p as f64;
        let order: Vec<usize> = order.into_iter().filter(|&j| kept[j]).collect();
        let total: f64 = order.iter().map(|&j| w[j]).sum();
        let mut above = 0.0;
        for group in order.chunk_by(|&a, &b| x[a] == x[b]) {
            for &j in group {
                margin[j] = (above - p * total).abs() / total;
                kept[j] = above < p * total;
            }
            above += group.iter().map(|&j| w[j]).sum::<f64>();
        }
    }
    // MinPLogitsWarper: remove probs < min_p * max prob.
    if cfg.min_p > 0.0 {
        for j in 0..v {
            margin[j] = margin[j].min((w[j] - cfg.min_p as f64).abs());
            kept[j] &= w[j] >= cfg.min_p as f64;
        }
    }
    let z_kept: f64 = (0..v).filter(|&j| kept[j]).map(|j| w[j]).sum();
    let probs = (0..v)
        .map(|j| if kept[j] { w[j] / z_kept } else { 0.0 })
        .collect();
    Filtered {
        x,
        kept,
        logp,
        probs,
        margin,
    }
}

/// The reference draw, or `None` when rounding could change it: when the
/// winner is a token whose filter decision is within `tol` of flipping, or
/// the best two keys (among tokens kept, or possibly kept) are within `tol`.
/// Greedy has no rounding: the op compares the stored logits themselves.
fn reference_draw(f: &Filtered, cfg: &SamplingConfig, row: u32, tol: f64) -> Option<usize> {
    if cfg.temperature == 0.0 {
        let m = f.x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        return f.x.iter().position(|&x| x == m);
    }
    let uncertain = |j: usize| f.margin[j] < tol;
    let mut keys: Vec<(f64, usize)> = (0..f.x.len())
        .filter(|&j| f.kept[j] || uncertain(j))
        .map(|j| (f.x[j] + stream_gumbel(cfg.seed, row, cfg.step, j as u32), j))
        .collect();
    keys.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    let gap = if keys.len() > 1 {
        keys[0].0 - keys[1].0
    } else {
        f64::INFINITY
    };
    let winner = keys[0].1;
    (gap >= tol && !uncertain(winner)).then_some(winner)
}

fn run<T: Float>(logits: &[T], vocab: usize, cfg: &SamplingConfig) -> Samples {
    sample(&SampleInputs::new(logits, vocab), cfg).unwrap()
}

/// Samples `[rows, vocab]` logits and checks every row against the
/// reference: the same token and the same log-prob. Rows within rounding of
/// a decision are counted, not compared; returns their number.
fn check_rows<T: Float>(logits: &[T], vocab: usize, cfg: &SamplingConfig) -> usize {
    let out = run(logits, vocab, cfg);
    let z = widen(logits);
    let mut ambiguous = 0;
    for (row, zs) in z.chunks(vocab).enumerate() {
        let f = filter(zs, cfg);
        // The op's z * (1/T), exp and ln in f32 are off by about 1e-7 |x|
        // and a few 1e-7 relative.
        let max_x =
            f.x.iter()
                .filter(|x| x.is_finite())
                .fold(0.0f64, |a, x| a.max(x.abs()));
        let tol = 1e-5 + 1e-6 * max_x;
        let got = out.tokens[row] as usize;
        let what = format!("{:?} V={vocab} row {row} {cfg:?}", T::DTYPE);
        match reference_draw(&f, cfg, row as u32, tol) {
            Some(token) => assert_eq!(got, token, "{what}"),
            None => ambiguous += 1,
        }
        let allowed = f.kept[got] || f.margin[got] < tol || cfg.temperature == 0.0;
        assert!(allowed, "{what}: token {got} was filtered out");
        // log p = x - lse, both rounded to f32 near the largest |x|: a few
        // of its ulps (2.8e-5 at |x| = 206, t = 0.12).
        let logp_atol = 2e-5 + 4.0 * f32::EPSILON as f64 * max_x;
        assert_close(
            &format!("logp {what}"),
            &out.logp[row..row + 1],
            &[f.logp[got]],
            logp_atol,
            2e-6,
        );
    }
    ambiguous
}

fn cfg(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_k,
        top_p,
        min_p,
        seed: 0x5eed,
        step: 3,
    }
}

/// The filter settings every size and dtype is run with.
fn configs() -> Vec<SamplingConfig> {
    vec![
        cfg(1.0, 0, 1.0, 0.0),
        cfg(0.7, 0, 1.0, 0.0),
        cfg(0.0, 0, 1.0, 0.0),
        cfg(1.0, 50, 0.9, 0.0),
        cfg(1.0, 0, 0.9, 0.0),
        cfg(0.6, 5, 1.0, 0.0),
        cfg(1.3, 0, 1.0, 0.1),
        cfg(0.9, 20, 0.9, 0.05),
        cfg(1.0, 1, 1.0, 0.0),
        cfg(5.0, 3000, 0.999, 0.0),
    ]
}

// ---------------------------------------------------------------------------
// The draw against the reference

#[test]
fn draws_match_the_reference_on_awkward_sizes_and_dtypes() {
    let shapes = [
        (1, 1),
        (33, 1),
        (33, 7),
        (5, 61),
        (33, 257),
        (4, 4099),
        (3, 32_000),
    ];
    let mut ambiguous = 0;
    let mut rows = 0;
    for (i, &(b, v)) in shapes.iter().enumerate() {
        let mut rng = Rng::new(10 + i as u64);
        let z32: Vec<f32> = rng.normals(b * v, 3.0);
        let zb: Vec<bf16> = rng.normals(b * v, 3.0);
        let zh: Vec<f16> = rng.normals(b * v, 3.0);
        for c in configs() {
            ambiguous += check_rows(&z32, v, &c) + check_rows(&zb, v, &c) + check_rows(&zh, v, &c);
            rows += 3 * b;
        }
    }
    assert!(
        ambiguous * 100 < rows,
        "{ambiguous} of {rows} rows too close to call"
    );
}

#[test]
fn draws_match_the_reference_at_qwen_vocab() {
    let v = 151_936;
    let mut rng = Rng::new(77);
    let zb: Vec<bf16> = rng.normals(3 * v, 4.0);
    let z32: Vec<f32> = rng.normals(2 * v, 2.0);
    let mut ambiguous = 0;
    for c in [
        cfg(1.0, 0, 1.0, 0.0),
        cfg(0.0, 0, 1.0, 0.0),
        cfg(1.0, 50, 0.9, 0.0),
        cfg(1.0, 0, 0.9, 0.0),
        cfg(0.8, 0, 1.0, 0.05),
        cfg(0.7, 1000, 1.0, 0.0),
    ] {
        ambiguous += check_rows(&zb, v, &c) + check_rows(&z32, v, &c);
    }
    assert!(ambiguous <= 1, "{ambiguous} rows too close to call");
}

#[test]
fn wide_and_narrow_spreads() {
    // Scaled logits spanning hundreds of nats (the histogram's catch-all
    // bucket) or a fraction of one (thousands of tokens per bucket).
    let mut rng = Rng::new(5);
    let v = 3001;
    let z: Vec<f32> = rng.normals(4 * v, 3.0);
    let mut ambiguous = 0;
    for c in [
        cfg(0.02, 0, 0.9999, 0.0),
        cfg(0.02, 2999, 0.99, 0.0),
        cfg(60.0, 0, 0.5, 0.0),
        cfg(60.0, 1500, 0.7, 0.0),
        cfg(60.0, 0, 1.0, 0.99),
    ] {
        ambiguous += check_rows(&z, v, &c);
    }
    assert!(ambiguous <= 2, "{ambiguous} rows too close to call");
}

#[test]
fn top_p_over_a_top_k_set_too_large_to_sort() {
    // k above the sorted limit: top-p's histogram counts only the top-k set.
    // A flat row (T = 8) puts a tenth of the draws in the top-k set's last
    // tenth of mass, which a top-p over the whole row would keep too.
    let mut rng = Rng::new(8);
    let v = 20_011;
    let z: Vec<bf16> = rng.normals(64 * v, 3.0);
    let ambiguous = check_rows(&z, v, &cfg(8.0, 5000, 0.9, 0.0));
    assert!(ambiguous <= 1, "{ambiguous} rows too close to call");
}

// ---------------------------------------------------------------------------
// The distribution

/// `ln Gamma(x)`, x > 0: Lanczos (g = 7, 9 terms), about 15 digits.
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let a = C[0] + (1..9).map(|i| C[i] / (x + i as f64)).sum::<f64>();
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularized upper incomplete gamma `Q(a, x)`: the series for `P` below
/// `a + 1`, Lentz's continued fraction above.
fn gamma_q(a: f64, x: f64) -> f64 {
    let front = (-x + a * x.ln() - ln_gamma(a)).exp();
    if x < a + 1.0 {
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        while term.abs() > sum.abs() * 1e-16 {
            n += 1.0;
            term *= x / n;
            sum += term;
        }
        1.0 - sum * front
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            d = if d.abs() < tiny { tiny } else { d };
            c = b + an / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        front * h
    }
}

/// P(chi-square with `df` degrees of freedom > `stat`).
fn chi2_sf(stat: f64, df: usize) -> f64 {
    gamma_q(df as f64 / 2.0, stat / 2.0)
}

#[test]
fn chi_square_tail_matches_closed_forms() {
    // For even df = 2n: Q(n, y) = e^-y sum_{i<n} y^i / i!.
    for (df, stat) in [
        (2usize, 10.0f64),
        (10, 3.0),
        (10, 40.0),
        (60, 55.0),
        (60, 120.0),
        (200, 280.0),
    ] {
        let (n, y) = (df / 2, stat / 2.0);
        let mut term = 1.0;
        let mut sum = 0.0;
        for i in 0..n {
            sum += term;
            term *= y / (i + 1) as f64;
        }
        let want = (-y).exp() * sum;
        let got = chi2_sf(stat, df);
        assert!(
            (got - want).abs() <= 1e-10 * want.max(1e-300) + 1e-15,
            "df {df} stat {stat}: {got} vs {want}"
        );
    }
    // Textbook critical values.
    assert!((chi2_sf(3.841_458_820_694_124, 1) - 0.05).abs() < 1e-9);
    assert!((chi2_sf(18.307_038_053_275_146, 10) - 0.05).abs() < 1e-9);
}

/// Pearson's statistic of `counts` against `probs` (cells with expectation
/// below 5 merged, smallest first) and its p-value.
fn chi_square(counts: &[u64], probs: &[f64], draws: u64) -> (f64, usize, f64) {
    let mut cells: Vec<(f64, u64)> = probs
        .iter()
        .zip(counts)
        .filter(|(&p, _)| p > 0.0)
        .map(|(&p, &c)| (p * draws as f64, c))
        .collect();
    cells.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let mut merged: Vec<(f64, u64)> = Vec::new();
    let mut pool = (0.0, 0);
    for (e, c) in cells {
        pool = (pool.0 + e, pool.1 + c);
        if pool.0 >= 5.0 {
            merged.push(pool);
            pool = (0.0, 0);
        }
    }
    if pool.0 > 0.0 {
        match merged.last_mut() {
            Some(last) => *last = (last.0 + pool.0, last.1 + pool.1),
            None => merged.push(pool),
        }
    }
    let stat: f64 = merged.iter().map(|&(e, c)| (c as f64 - e).powi(2) / e).sum();
    let df = merged.len() - 1;
    (stat, df, if df == 0 { 1.0 } else { chi2_sf(stat, df) })
}

#[test]
fn sampled_frequencies_match_the_filtered_distribution() {
    const DRAWS: u64 = 20_000;
    let cases = [
        (137usize, 2.0, cfg(0.7, 0, 1.0, 0.0)),
        (50, 1.5, cfg(1.0, 5, 1.0, 0.0)),
        (200, 1.5, cfg(1.0, 0, 0.8, 0.0)),
        (97, 1.0, cfg(1.0, 0, 1.0, 0.1)),
        (173, 2.0, cfg(1.0, 20, 0.9, 0.05)),
        (64, 1.0, cfg(1.2, 30, 0.95, 0.0)),
    ];
    for (i, &(v, scale, c)) in cases.iter().enumerate() {
        let mut rng = Rng::new(1000 + i as u64);
        let logits: Vec<f32> = rng.normals(v, scale);
        let f = filter(&widen(&logits), &c);
        let margin = f.margin.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(margin > 1e-4, "case {i}: test data too close to a threshold");
        let mut counts = vec![0u64; v];
        for step in 0..DRAWS {
            let out = run(&logits, v, &SamplingConfig { step, ..c });
            counts[out.tokens[0] as usize] += 1;
        }
        for (j, &n) in counts.iter().enumerate() {
            assert!(
                f.kept[j] || n == 0,
                "case {i}: filtered token {j} drawn {n} times"
            );
        }
        let (stat, df, p) = chi_square(&counts, &f.probs, DRAWS);
        let kept = f.kept.iter().filter(|&&k| k).count();
        assert!(
            p > 1e-4,
            "case {i} ({c:?}, {kept} kept): chi2 = {stat:.1} on {df} df, p = {p:.2e}"
        );
    }
}

// ---------------------------------------------------------------------------
// Determinism and independence

#[test]
fn same_seed_and_step_give_the_same_tokens_and_others_do_not() {
    let (b, v) = (64, 1000);
    let mut rng = Rng::new(3);
    let logits: Vec<bf16> = rng.normals(b * v, 1.0);
    for c in [cfg(1.0, 0, 1.0, 0.0), cfg(1.0, 50, 0.9, 0.0)] {
        let base = run(&logits, v, &c);
        let again = run(&logits, v, &c);
        assert_eq!((&base.tokens, &base.logp), (&again.tokens, &again.logp));
        let differ = |other: &SamplingConfig| {
            let o = run(&logits, v, other);
            base.tokens.iter().zip(&o.tokens).filter(|(a, b)| a != b).count()
        };
        // Flat logits: two independent draws agree rarely.
        for other in [
            SamplingConfig {
                step: c.step + 1,
                ..c
            },
            SamplingConfig {
                step: c.step + (1 << 32),
                ..c
            },
            SamplingConfig {
                seed: c.seed + 1,
                ..c
            },
            SamplingConfig {
                seed: c.seed + (1 << 32),
                ..c
            },
        ] {
            assert!(differ(&other) > b * 3 / 4, "{other:?}");
        }
    }
}

#[test]
fn a_row_does_not_depend_on_the_other_rows() {
    let v = 509;
    let mut rng = Rng::new(8);
    let a: Vec<f32> = rng.normals(33 * v, 2.0);
    // Same rows 0..17, different rows after, and a longer batch.
    let mut b = a[..17 * v].to_vec();
    b.extend(rng.normals::<f32>(40 * v, 2.0));
    for c in configs() {
        let (ta, tb) = (run(&a, v, &c), run(&b, v, &c));
        assert_eq!(ta.tokens[..17], tb.tokens[..17], "{c:?}");
        assert_eq!(ta.logp[..17], tb.logp[..17], "{c:?}");
    }
}

// ---------------------------------------------------------------------------
// Special cases

#[test]
fn greedy_is_the_first_argmax_and_its_logp_is_at_temperature_one() {
    let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5, 3.0];
    let out = run(&logits, 6, &cfg(0.0, 7, 0.1, 0.5));
    assert_eq!(out.tokens, vec![1]);
    let f = filter(&widen(&logits), &cfg(1.0, 0, 1.0, 0.0));
    assert!((out.logp[0] as f64 - f.logp[1]).abs() < 1e-6);
    // And over random rows, in every dtype.
    let mut rng = Rng::new(4);
    let z: Vec<bf16> = rng.normals(33 * 300, 3.0);
    check_rows(&z, 300, &cfg(0.0, 0, 1.0, 0.0));
}

#[test]
fn top_k_one_and_tiny_top_p_are_argmax() {
    let (b, v) = (33, 1021);
    let mut rng = Rng::new(6);
    let z: Vec<f32> = rng.normals(b * v, 2.0);
    let greedy = run(&z, v, &cfg(0.0, 0, 1.0, 0.0));
    for c in [
        cfg(0.8, 1, 1.0, 0.0),
        cfg(1.5, 0, 1e-6, 0.0),
        cfg(1.0, 0, 1.0, 1.0),
    ] {
        for step in 0..5 {
            let out = run(&z, v, &SamplingConfig { step, ..c });
            assert_eq!(out.tokens, greedy.tokens, "{c:?}");
        }
    }
}

/// The set of tokens drawn over `steps` steps of one row.
fn drawn(logits: &[f32], c: SamplingConfig, steps: u64) -> Vec<usize> {
    let mut seen = vec![false; logits.len()];
    for step in 0..steps {
        seen[run(logits, logits.len(), &SamplingConfig { step, ..c }).tokens[0] as usize] = true;
    }
    (0..logits.len()).filter(|&j| seen[j]).collect()
}

#[test]
fn ties_at_a_threshold_are_kept() {
    // top-k 2 with three values tied for second: all four kept.
    let z = [3.0f32, 2.5, 0.0, 2.5, 2.5, 1.0];
    assert_eq!(drawn(&z, cfg(1.0, 2, 1.0, 0.0), 2000), vec![0, 1, 3, 4]);
    // top-p 0.3 with four tied at the top: no mass strictly above any of
    // them, so all four stay, though one would cover 0.3.
    let z = [0.0f32, 2.0, 2.0, 2.0, 2.0, 1.0];
    assert_eq!(drawn(&z, cfg(1.0, 0, 0.3, 0.0), 2000), vec![1, 2, 3, 4]);
    // min-p 1 keeps exactly the tied maxima.
    assert_eq!(drawn(&z, cfg(1.0, 0, 1.0, 1.0), 2000), vec![1, 2, 3, 4]);
}

#[test]
fn top_k_on_a_plateau_keeps_every_tie() {
    // The k-th largest lies on a plateau of some 30000 equal logits: all of
    // them are kept, and they hold most of the mass, so most draws land on
    // them. 40 larger logits sit at random places of each row.
    let v = 30_011;
    let mut rng = Rng::new(9);
    let mut z = vec![0.0f32; 8 * v];
    for row in z.chunks_mut(v) {
        for _ in 0..40 {
            row[(rng.next_u64() % v as u64) as usize] = 1.0;
        }
    }
    let ambiguous = check_rows(&z, v, &cfg(1.0, 50, 1.0, 0.0)) + check_rows(&z, v, &cfg(1.0, 50, 0.5, 0.0));
    assert_eq!(ambiguous, 0);
    let row = &z[..v];
    let on_plateau = drawn(row, cfg(1.0, 50, 1.0, 0.0), 200)
        .iter()
        .filter(|&&j| row[j] == 0.0)
        .count();
    assert!(on_plateau > 100, "{on_plateau} of 200 draws on the plateau");
}

#[test]
fn top_p_renormalizes_over_the_top_k_set() {
    // Six nearly equal logits (one histogram bucket). Over the top 3 (mass
    // about 3), p = 0.5 keeps two: the third has mass 2 > 1.5 above it.
    // Over all six, p = 0.5 would keep three.
    let z = [0.0f32, -0.001, -0.002, -0.003, -0.004, -0.005];
    assert_eq!(drawn(&z, cfg(1.0, 3, 0.5, 0.0), 1000), vec![0, 1]);
    assert_eq!(drawn(&z, cfg(1.0, 0, 0.5, 0.0), 1000), vec![0, 1, 2]);
    assert_eq!(drawn(&z, cfg(1.0, 2, 0.4, 0.0), 1000), vec![0]);
}

#[test]
fn negative_infinity_is_never_drawn() {
    let ninf = f32::NEG_INFINITY;
    let z = [ninf, 0.0, ninf, 0.5, ninf, ninf, -1.0];
    for c in [
        cfg(1.0, 0, 1.0, 0.0),
        cfg(3.0, 5, 1.0, 0.0),
        cfg(1.0, 0, 0.999, 0.0),
        cfg(0.0, 0, 1.0, 0.0),
    ] {
        assert_eq!(
            drawn(&z, c, 3000),
            if c.temperature == 0.0 {
                vec![3]
            } else {
                vec![1, 3, 6]
            }
        );
    }
    let out = run(&z, 7, &cfg(1.0, 0, 1.0, 0.0));
    assert!(out.logp[0].is_finite());
    // One finite logit: always drawn, log-prob 0.
    let out = run(&[ninf, 2.0, ninf], 3, &cfg(1.0, 2, 0.5, 0.3));
    assert_eq!((out.tokens[0], out.logp[0]), (1, 0.0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Any settings: the token is one the filters keep, its log-prob is the
    /// unfiltered log-softmax, and it equals the reference draw.
    #[test]
    fn any_settings_draw_a_kept_token(
        vocab in 1usize..300,
        seed in any::<u64>(),
        scale in 0.01f64..30.0,
        t in prop_oneof![Just(0.0f32), 0.05f32..5.0],
        top_k in 0usize..320,
        top_p in prop_oneof![Just(1.0f32), 1e-3f32..1.0],
        min_p in prop_oneof![Just(0.0f32), 0.0f32..1.0],
        step in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let logits: Vec<f32> = rng.normals(vocab, scale);
        let c = SamplingConfig { temperature: t, top_k, top_p, min_p, seed, step };
        check_rows(&logits, vocab, &c);
    }
}

// ---------------------------------------------------------------------------
// Bad inputs

fn err(logits: &[f32], vocab: usize, c: SamplingConfig) -> Error {
    sample(&SampleInputs::new(logits, vocab), &c).unwrap_err()
}

#[test]
fn bad_inputs_are_typed_errors() {
    let ok = [0.0f32; 6];
    let c = SamplingConfig::default();
    assert!(matches!(err(&ok, 0, c), Error::Empty { what: "vocab", .. }));
    assert!(matches!(err(&[], 3, c), Error::Empty { what: "logits", .. }));
    assert!(matches!(
        err(&ok[..5], 3, c),
        Error::ShapeMismatch {
            what: "logits",
            expected: 6,
            got: 5,
            ..
        }
    ));
    let bad_param = |c: SamplingConfig, name: &str| match err(&ok, 3, c) {
        Error::InvalidParameter { name: n, .. } => assert_eq!(n, name, "{c:?}"),
        e => panic!("{c:?}: {e:?}"),
    };
    for t in [-1.0, -f32::MIN_POSITIVE, f32::NAN, f32::INFINITY] {
        bad_param(SamplingConfig { temperature: t, ..c }, "temperature");
    }
    for p in [0.0, -0.5, 1.0 + f32::EPSILON, f32::NAN, f32::INFINITY] {
        bad_param(SamplingConfig { top_p: p, ..c }, "top_p");
    }
    for p in [-1e-9, 1.5, f32::NAN, f32::NEG_INFINITY] {
        bad_param(SamplingConfig { min_p: p, ..c }, "min_p");
    }
    for greedy in [false, true] {
        let c = SamplingConfig {
            temperature: if greedy { 0.0 } else { 1.0 },
            top_p: 0.9,
            ..c
        };
        for bad in [f32::NAN, f32::INFINITY] {
            let mut logits = ok;
            logits[4] = bad;
            assert!(matches!(
                err(&logits, 3, c),
                Error::NonFinite {
                    what: "logits",
                    index: 1,
                    ..
                }
            ));
        }
        let mut logits = ok;
        logits[3..].fill(f32::NEG_INFINITY);
        assert!(matches!(err(&logits, 3, c), Error::NonFinite { index: 1, .. }));
    }
    // Finite logits whose z / T overflows f32.
    let huge = [1.0f32, 3e38, 0.0];
    assert!(matches!(
        err(
            &huge,
            3,
            SamplingConfig {
                temperature: 0.5,
                ..c
            }
        ),
        Error::NonFinite { index: 0, .. }
    ));
}
