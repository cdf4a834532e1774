//! The clipped policy loss against a plain f64 reference (loss, per-token
//! terms, every statistic) over every aggregation, importance level and
//! option, padded and packed; the backward against finite differences;
//! properties; and every bad input.

use std::ops::Range;

use crate::common::{assert_close, widen, Rng};
use grpo_kernels::{
    broadcast_to_tokens, policy_loss, policy_loss_backward, Advantage, Aggregation, Error, ImportanceLevel,
    KlEstimator, PolicyLossConfig, PolicyLossInputs, PolicyLossStats, PolicyObjective, SeqLayout,
};
use proptest::prelude::*;

/// A layout the test owns.
#[derive(Debug, Clone)]
enum Lay {
    Padded(usize, usize),
    Packed(Vec<u32>),
}

impl Lay {
    fn packed(lens: &[u32]) -> Self {
        let mut cu = vec![0];
        for &l in lens {
            cu.push(cu.last().unwrap() + l);
        }
        Lay::Packed(cu)
    }
    fn ranges(&self) -> Vec<Range<usize>> {
        match self {
            Lay::Padded(b, t) => (0..*b).map(|s| s * t..(s + 1) * t).collect(),
            Lay::Packed(cu) => cu.windows(2).map(|w| w[0] as usize..w[1] as usize).collect(),
        }
    }
    fn tokens(&self) -> usize {
        self.ranges().last().unwrap().end
    }
    fn layout(&self) -> SeqLayout<'_> {
        match self {
            Lay::Padded(b, t) => SeqLayout::Padded {
                batch: *b,
                seq_len: *t,
            },
            Lay::Packed(cu) => SeqLayout::Packed { cu_seqlens: cu },
        }
    }
}

/// One batch of inputs. Masked-out tokens (and the advantages of sequences
/// with no masked-in token) hold NaN: the op must never read them.
#[derive(Debug, Clone)]
struct Case {
    lay: Lay,
    logp: Vec<f32>,
    old: Option<Vec<f32>>,
    ref_logp: Option<Vec<f32>>,
    adv_seq: Option<Vec<f32>>,
    adv_tok: Option<Vec<f32>>,
    mask: Option<Vec<u8>>,
    pg_weights: Option<Vec<f32>>,
}

impl Case {
    fn inputs(&self) -> PolicyLossInputs<'_> {
        let advantages = match (&self.adv_seq, &self.adv_tok) {
            (Some(a), _) => Advantage::per_sequence(a),
            (None, Some(a)) => Advantage::per_token(a),
            (None, None) => unreachable!(),
        };
        PolicyLossInputs {
            logp: &self.logp,
            old_logp: self.old.as_deref(),
            ref_logp: self.ref_logp.as_deref(),
            advantages,
            mask: self.mask.as_deref(),
            layout: self.lay.layout(),
            pg_weights: self.pg_weights.as_deref(),
        }
    }
    fn active(&self, t: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[t] != 0)
    }
    fn adv(&self, s: usize, t: usize) -> f64 {
        match (&self.adv_seq, &self.adv_tok) {
            (Some(a), _) => a[s] as f64,
            (_, Some(a)) => a[t] as f64,
            _ => unreachable!(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Opts {
    old: bool,
    ref_logp: bool,
    per_seq_adv: bool,
    mask: bool,
    seq_level: bool,
}

/// A log-ratio at least 0.003 away from every boundary the tests use:
/// ln(1 - 0.2), ln(1 + 0.2), ln(1 + 0.28), ln 3 (dual clip) and the clamp 1.
fn safe_log_ratio(rng: &mut Rng) -> f64 {
    let (lo, hi) = [(-2.5, -1.3), (-0.5, -0.3), (-0.15, 0.15), (0.25, 0.5), (1.3, 2.5)][rng.below(5)];
    rng.range(lo, hi)
}

fn make_case(lay: Lay, o: Opts, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let n = lay.tokens();
    let mask: Option<Vec<u8>> = o.mask.then(|| {
        (0..n)
            .map(|_| (rng.uniform() > 0.25) as u8 * (1 + rng.below(3) as u8))
            .collect()
    });
    let active = |t: usize| mask.as_ref().is_none_or(|m| m[t] != 0);
    let logp: Vec<f64> = (0..n).map(|_| -(0.05 + 3.0 * rng.uniform())).collect();
    let mut log_ratio = vec![0.0; n];
    for range in lay.ranges() {
        if o.seq_level {
            // Noise around a chosen sequence mean, so the mean is safe too.
            let target = safe_log_ratio(&mut rng);
            let noise: Vec<f64> = range.clone().map(|_| rng.normal() * 0.3).collect();
            let act: Vec<usize> = range.clone().filter(|&t| active(t)).collect();
            let shift = act.iter().map(|&t| noise[t - range.start]).sum::<f64>() / act.len().max(1) as f64;
            for t in range.clone() {
                log_ratio[t] = noise[t - range.start] - shift + target;
            }
        } else {
            for t in range {
                log_ratio[t] = safe_log_ratio(&mut rng);
            }
        }
    }
    let nan_if_masked = |t: usize, x: f64| if active(t) { x as f32 } else { f32::NAN };
    let ranges = lay.ranges();
    let adv_seq: Vec<f32> = ranges
        .iter()
        .map(|r| {
            let a = rng.normal() as f32;
            if r.clone().any(active) {
                a
            } else {
                f32::NAN
            }
        })
        .collect();
    let adv_tok: Vec<f32> = (0..n).map(|t| nan_if_masked(t, rng.normal())).collect();
    let ref_logp: Vec<f32> = (0..n)
        .map(|t| nan_if_masked(t, logp[t] + rng.range(-1.0, 1.0)))
        .collect();
    Case {
        old: o
            .old
            .then(|| (0..n).map(|t| nan_if_masked(t, logp[t] - log_ratio[t])).collect()),
        logp: (0..n).map(|t| nan_if_masked(t, logp[t])).collect(),
        ref_logp: o.ref_logp.then_some(ref_logp),
        adv_seq: o.per_seq_adv.then_some(adv_seq),
        adv_tok: (!o.per_seq_adv).then_some(adv_tok),
        mask,
        pg_weights: None,
        lay,
    }
}

fn kl_ref(est: KlEstimator, d: f64) -> f64 {
    let k3 = |d: f64| d.exp_m1() - d;
    match est {
        KlEstimator::K1 => -d,
        KlEstimator::K2 => d * d / 2.0,
        KlEstimator::K3 => k3(d),
        KlEstimator::LowVarK3 => k3(d.clamp(-20.0, 20.0)).clamp(-10.0, 10.0),
        other => crate::common::reference::kl_value_ref(other, d),
    }
}

#[derive(Debug)]
struct RefOut {
    loss: f64,
    per_token: Vec<f64>,
    /// clip_low, clip_high, dual_clip, ratio_mean, ratio_max, kl_mean, tokens.
    stats: [f64; 7],
    /// clip_low_seq, clip_high_seq, clip_low_seq_min, clip_high_seq_max, seqs.
    seq_stats: [f64; 5],
}

/// `pg_t` of `cfg`'s objective for the ratio `r` (of the differentiated
/// logp `live`, clamped), the detached ratio `r_det` (CISPO's weight), VESPO's
/// `log w` and the advantage: `(pg, clip_low, clip_high, dual_clip)`.
fn pg_ref(
    cfg: &PolicyLossConfig,
    r: f64,
    r_det: f64,
    log_w: f64,
    live: f64,
    a: f64,
) -> (f64, bool, bool, bool) {
    let (lo, hi) = (1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64);
    match cfg.objective {
        PolicyObjective::Clip { delta } => {
            let capped = delta.map_or(r, |d| r.min(d as f64));
            let mut pg = -(capped * a).min(r.clamp(lo, hi) * a);
            let mut dual = false;
            if let Some(c) = cfg.dual_clip {
                let bound = -(c as f64) * a;
                if a < 0.0 && pg > bound {
                    pg = bound;
                    dual = true;
                }
            }
            (pg, r < lo && a < 0.0, r > hi && a > 0.0, dual)
        }
        PolicyObjective::Cispo { min_ratio, max_ratio } => {
            let (mn, mx) = (min_ratio as f64, max_ratio as f64);
            let w = r_det.clamp(mn, mx);
            (-w * a * live, r_det < mn && a < 0.0, r_det > mx && a > 0.0, false)
        }
        PolicyObjective::Sapo { tau_pos, tau_neg } => {
            let tau = if a > 0.0 { tau_pos } else { tau_neg } as f64;
            let sig = 1.0 / (1.0 + (-tau * (r - 1.0)).exp());
            (-sig * 4.0 / tau * a, false, false, false)
        }
        PolicyObjective::Vespo {
            k_pos,
            lambda_pos,
            k_neg,
            lambda_neg,
        } => {
            let (k, l) = if a >= 0.0 {
                (k_pos, lambda_pos)
            } else {
                (k_neg, lambda_neg)
            };
            let (k, l) = (k as f64, (l as f64).max(1e-4));
            let phi = (l + k * log_w - l * log_w.exp()).exp();
            let phi = if phi.is_finite() { phi } else { 0.0 };
            (-phi * a * live, false, false, false)
        }
    }
}

/// The loss in f64, one sequence and one token at a time. `live` is the
/// differentiated logp; the case's own logp is the detached copy that the
/// sequence ratio and an absent `old_logp` use (so finite differences of
/// `live` see the GSPO-token gradient).
fn reference(case: &Case, cfg: &PolicyLossConfig, live: &[f64]) -> RefOut {
    let det = widen(&case.logp);
    let old = case.old.as_deref().map_or(det.clone(), widen);
    let ranges = case.lay.ranges();
    let nonempty = ranges
        .iter()
        .filter(|r| (*r).clone().any(|t| case.active(t)))
        .count();
    let seqs = if cfg.exclude_empty_seqs {
        nonempty.max(1) as f64
    } else {
        ranges.len() as f64
    };
    let total = (0..live.len()).filter(|&t| case.active(t)).count();
    let clamp = cfg.log_ratio_clamp as f64;
    let mut out = RefOut {
        loss: 0.0,
        per_token: vec![0.0; live.len()],
        stats: [0.0; 7],
        seq_stats: [0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY, seqs],
    };
    let [clip_low, clip_high, dual, ratio_sum, ratio_max, kl_sum, _] = &mut out.stats;
    for (s, range) in ranges.iter().enumerate() {
        let act: Vec<usize> = range.clone().filter(|&t| case.active(t)).collect();
        let len = act.len();
        let seq_log_ratio = act.iter().map(|&t| det[t] - old[t]).sum::<f64>() / len.max(1) as f64;
        let log_w = act
            .iter()
            .map(|&t| (det[t] - old[t]).clamp(-20.0, 20.0))
            .sum::<f64>()
            .clamp(1e-8f64.ln(), 20.0);
        let (mut seq_low, mut seq_high) = (0.0, 0.0);
        let w = match cfg.aggregation {
            Aggregation::TokenMean { normalizer } => {
                1.0 / normalizer.map_or(total.max(1) as f64, |x| x as f64)
            }
            Aggregation::SeqMeanTokenMean => 1.0 / (seqs * len.max(1) as f64),
            Aggregation::SeqMeanTokenSum => 1.0 / seqs,
            Aggregation::SeqMeanTokenSumNorm { constant } => 1.0 / (seqs * constant as f64),
        };
        for &t in &act {
            let raw = match cfg.importance {
                ImportanceLevel::Token => live[t] - old[t],
                ImportanceLevel::Sequence => live[t] - det[t] + seq_log_ratio,
            };
            let r = raw.clamp(-clamp, clamp).exp();
            let raw_det = match cfg.importance {
                ImportanceLevel::Token => det[t] - old[t],
                ImportanceLevel::Sequence => seq_log_ratio,
            };
            let r_det = raw_det.clamp(-clamp, clamp).exp();
            let a = case.adv(s, t);
            let (pg, low, high, dual_clip) = pg_ref(cfg, r, r_det, log_w, live[t], a);
            *clip_low += low as u8 as f64;
            *clip_high += high as u8 as f64;
            *dual += dual_clip as u8 as f64;
            seq_low += low as u8 as f64 / len as f64;
            seq_high += high as u8 as f64 / len as f64;
            let pw = case.pg_weights.as_ref().map_or(1.0, |w| w[t] as f64);
            let kl = case
                .ref_logp
                .as_ref()
                .map_or(0.0, |rf| kl_ref(cfg.kl, rf[t] as f64 - live[t]));
            let kl = if cfg.kl_bias_correction { kl * r } else { kl };
            let l = pw * pg + cfg.beta as f64 * kl;
            out.per_token[t] = l;
            out.loss += w * l;
            *ratio_sum += r;
            *ratio_max = ratio_max.max(r);
            *kl_sum += kl;
        }
        if len > 0 {
            let q = &mut out.seq_stats;
            q[0] += seq_low;
            q[1] += seq_high;
            q[2] = q[2].min(seq_low);
            q[3] = q[3].max(seq_high);
        }
    }
    let q = &mut out.seq_stats;
    q[0] /= ranges.len() as f64;
    q[1] /= ranges.len() as f64;
    for x in &mut q[2..4] {
        if !x.is_finite() {
            *x = 0.0;
        }
    }
    let m = total.max(1) as f64;
    for (i, x) in out.stats.iter_mut().enumerate() {
        if i != 4 {
            *x /= m;
        }
    }
    out.stats[6] = total as f64;
    out
}

fn check_forward(case: &Case, cfg: &PolicyLossConfig, what: &str) {
    let got = policy_loss(&case.inputs(), cfg).unwrap();
    let want = reference(case, cfg, &widen(&case.logp));
    assert_close(&format!("loss {what}"), &[got.loss()], &[want.loss], 1e-6, 1e-5);
    assert_close(
        &format!("per_token {what}"),
        &got.per_token,
        &want.per_token,
        1e-6,
        1e-5,
    );
    let s = got.stats();
    let stats = [
        s.clip_frac_low,
        s.clip_frac_high,
        s.dual_clip_frac,
        s.ratio_mean,
        s.ratio_max,
        s.kl_mean,
        s.tokens,
    ];
    assert_close(&format!("stats {what}"), &stats, &want.stats, 1e-6, 1e-5);
    let seq_stats = [
        s.clip_frac_low_seq,
        s.clip_frac_high_seq,
        s.clip_frac_low_seq_min,
        s.clip_frac_high_seq_max,
        s.seqs,
    ];
    assert_close(
        &format!("seq stats {what}"),
        &seq_stats,
        &want.seq_stats,
        1e-6,
        1e-5,
    );
    for (t, &x) in got.per_token.iter().enumerate() {
        if !case.active(t) {
            assert_eq!(x, 0.0, "masked-out per_token[{t}] {what}");
        }
    }
}

/// Checks the backward against central differences of the f64 reference
/// at `count` token indices (all of them when there are fewer).
fn check_backward(case: &Case, cfg: &PolicyLossConfig, count: usize, seed: u64, what: &str) {
    let mut rng = Rng::new(seed);
    let n = case.logp.len();
    let grad_loss = rng.normal() as f32;
    let grad_per_token: Vec<f32> = rng.normals(n, 1.0);
    let (g, gpt) = (grad_loss as f64, widen(&grad_per_token));
    let got = policy_loss_backward(&case.inputs(), cfg, grad_loss, Some(&grad_per_token)).unwrap();
    let f = |x: &[f64]| {
        let r = reference(case, cfg, x);
        g * r.loss + r.per_token.iter().zip(&gpt).map(|(l, g)| l * g).sum::<f64>()
    };
    let idx: Vec<usize> = if n <= count {
        (0..n).collect()
    } else {
        (0..count).map(|_| rng.below(n)).collect()
    };
    let mut x = widen(&case.logp);
    // Inputs keep 3e-3 from every kink; a larger step keeps the rounding
    // noise of a sum over thousands of tokens small.
    let h = 1e-4;
    let mut want = vec![];
    for &t in &idx {
        if !case.active(t) {
            // NaN inputs there; the reference never reads them.
            want.push(0.0);
            continue;
        }
        let x0 = x[t];
        x[t] = x0 + h;
        let up = f(&x);
        x[t] = x0 - h;
        let down = f(&x);
        x[t] = x0;
        want.push((up - down) / (2.0 * h));
    }
    let got_at: Vec<f32> = idx.iter().map(|&t| got[t]).collect();
    assert_close(&format!("dlogp {what}"), &got_at, &want, 1e-7, 1e-4);
    for (t, &d) in got.iter().enumerate() {
        if !case.active(t) {
            assert_eq!(d, 0.0, "masked-out dlogp[{t}] {what}");
        }
    }
}

const AGGREGATIONS: [Aggregation; 5] = [
    Aggregation::TokenMean { normalizer: None },
    Aggregation::TokenMean {
        normalizer: Some(137.0),
    },
    Aggregation::SeqMeanTokenMean,
    Aggregation::SeqMeanTokenSum,
    Aggregation::SeqMeanTokenSumNorm { constant: 50.0 },
];

fn layouts() -> Vec<Lay> {
    vec![
        Lay::Padded(1, 1),
        Lay::Padded(1, 9),
        Lay::Padded(3, 5),
        Lay::Padded(6, 37),
        Lay::packed(&[1]),
        Lay::packed(&[0, 3, 0, 17, 1, 40, 0]),
        Lay::packed(&[2100, 0, 33]),
        Lay::packed(&[5000]),
    ]
}

/// Every aggregation x importance level x (old, ref with and without beta,
/// dual clip, mask, advantages per sequence or per token) on every layout.
#[test]
fn forward_and_backward_match_reference_everywhere() {
    let estimators = [
        KlEstimator::K3,
        KlEstimator::K1,
        KlEstimator::K2,
        KlEstimator::LowVarK3,
    ];
    let mut cases = 0;
    for (li, lay) in layouts().into_iter().enumerate() {
        let mut config = 0u64;
        for aggregation in AGGREGATIONS {
            for seq_level in [false, true] {
                for bits in 0..32u32 {
                    config += 1;
                    let bit = |i: u32| bits >> i & 1 == 1;
                    let (ref_logp, beta) = match (bit(1), bit(2)) {
                        (false, _) => (false, 0.0),
                        (true, false) => (true, 0.0),
                        (true, true) => (true, 0.04),
                    };
                    let o = Opts {
                        old: bit(0),
                        ref_logp,
                        per_seq_adv: bit(3),
                        mask: bit(4),
                        seq_level,
                    };
                    let cfg = PolicyLossConfig {
                        eps_high: if bits % 3 == 0 { 0.28 } else { 0.2 },
                        dual_clip: (bits % 4 < 2).then_some(3.0),
                        log_ratio_clamp: if bits % 5 == 0 { 1.0 } else { 20.0 },
                        importance: if seq_level {
                            ImportanceLevel::Sequence
                        } else {
                            ImportanceLevel::Token
                        },
                        beta,
                        kl: estimators[bits as usize % 4],
                        aggregation,
                        ..PolicyLossConfig::default()
                    };
                    let seed = li as u64 * 10_000 + config;
                    let case = make_case(lay.clone(), o, seed);
                    let what = format!("{lay:?} {o:?} {cfg:?}");
                    check_forward(&case, &cfg, &what);
                    check_backward(&case, &cfg, 24, seed, &what);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 8 * 5 * 2 * 32);
}

#[test]
fn many_sequences_take_the_parallel_path() {
    let mut rng = Rng::new(3);
    let lens: Vec<u32> = (0..300).map(|_| rng.below(400) as u32).collect();
    for seq_level in [false, true] {
        let o = Opts {
            old: true,
            ref_logp: true,
            per_seq_adv: false,
            mask: true,
            seq_level,
        };
        let case = make_case(Lay::packed(&lens), o, 4);
        let cfg = PolicyLossConfig {
            beta: 0.04,
            dual_clip: Some(3.0),
            importance: if seq_level {
                ImportanceLevel::Sequence
            } else {
                ImportanceLevel::Token
            },
            ..PolicyLossConfig::default()
        };
        check_forward(&case, &cfg, "300 packed sequences");
        check_backward(&case, &cfg, 64, 5, "300 packed sequences");
        // Deterministic: the same bits on every run.
        let a = policy_loss(&case.inputs(), &cfg).unwrap();
        let b = policy_loss(&case.inputs(), &cfg).unwrap();
        assert_eq!((a.per_token, a.summary), (b.per_token, b.summary));
    }
}

#[test]
fn clip_regions_and_statistics_by_hand() {
    // Four tokens of one sequence, eps 0.2, dual clip 3, no old: ratios from
    // old_logp = logp - lr.
    let lr = [0.5f32, -0.5, 0.05, 2.0];
    let adv = [1.0f32, -1.0, 2.0, -1.0];
    let logp = [-1.0f32; 4];
    let old: Vec<f32> = lr.iter().map(|l| -1.0 - l).collect();
    let lay = SeqLayout::Padded { batch: 1, seq_len: 4 };
    let inputs = PolicyLossInputs::new(&logp, Advantage::per_token(&adv), lay).with_old(&old);
    let cfg = PolicyLossConfig {
        dual_clip: Some(3.0),
        aggregation: Aggregation::SeqMeanTokenSum,
        ..PolicyLossConfig::default()
    };
    let out = policy_loss(&inputs, &cfg).unwrap();
    let r: Vec<f32> = lr.iter().map(|l| l.exp()).collect();
    // Token 0: r = 1.65 > 1.2 with A > 0: clipped high, loss -1.2.
    // Token 1: r = 0.61 < 0.8 with A < 0: clipped low, loss 0.8.
    // Token 2: r = 1.05 inside: loss -2 r.
    // Token 3: r = 7.39 with A < 0: dual clip binds, loss 3.
    let want = [-1.2, 0.8, -2.0 * r[2], 3.0];
    for (g, w) in out.per_token.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{:?} vs {want:?}", out.per_token);
    }
    let s = out.stats();
    assert_eq!(
        (s.clip_frac_low, s.clip_frac_high, s.dual_clip_frac),
        (0.25, 0.25, 0.25)
    );
    assert_eq!(s.tokens, 4.0);
    assert!((s.ratio_max - r[3]).abs() < 1e-5 && (s.ratio_mean - r.iter().sum::<f32>() / 4.0).abs() < 1e-5);
    assert_eq!(s.kl_mean, 0.0);
    let grad = policy_loss_backward(&inputs, &cfg, 1.0, None).unwrap();
    assert_eq!([grad[0], grad[1], grad[3]], [0.0; 3]);
    assert!((grad[2] + 2.0 * r[2]).abs() < 1e-6);
    assert_eq!(PolicyLossStats::from_summary(&s.to_summary()), s);
    assert_eq!(out.summary.len(), PolicyLossStats::SUMMARY_LEN);
    assert_eq!(out.summary[PolicyLossStats::LOSS], out.loss());
}

#[test]
fn no_masked_in_tokens_gives_zeros() {
    let logp = [f32::NAN, -1.0, f32::NAN];
    let adv = [f32::NAN, 0.5];
    let mask = [0u8, 0, 0];
    let cu = [0u32, 0, 3];
    let inputs = PolicyLossInputs::new(
        &logp,
        Advantage::per_sequence(&adv),
        SeqLayout::Packed { cu_seqlens: &cu },
    )
    .with_mask(&mask);
    for aggregation in AGGREGATIONS {
        let cfg = PolicyLossConfig {
            aggregation,
            ..PolicyLossConfig::default()
        };
        let out = policy_loss(&inputs, &cfg).unwrap();
        // All zeros but S, the sequence count (2).
        let mut want = vec![0.0; PolicyLossStats::SUMMARY_LEN];
        want[PolicyLossStats::SEQS] = 2.0;
        assert_eq!(out.summary, want);
        assert_eq!(out.per_token, vec![0.0; 3]);
        assert_eq!(
            policy_loss_backward(&inputs, &cfg, 1.0, None).unwrap(),
            vec![0.0; 3]
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Clipped, dual-clipped and clamped tokens get exactly zero gradient
    /// (beta = 0); the others get exactly -A r w.
    #[test]
    fn clipped_tokens_have_exactly_zero_gradient(
        lens in prop::collection::vec(0u32..50, 1..8),
        seed in any::<u64>(),
        seq_level in any::<bool>(),
        spread in 0.01f64..3.0,
    ) {
        let lay = Lay::packed(&lens);
        prop_assume!(lay.tokens() > 0);
        let mut rng = Rng::new(seed);
        let n = lay.tokens();
        let logp: Vec<f32> = (0..n).map(|_| -(rng.uniform() * 4.0) as f32).collect();
        let old: Vec<f32> = logp.iter().map(|&l| l - (rng.normal() * spread) as f32).collect();
        let adv: Vec<f32> = rng.normals(n, 1.0);
        let cfg = PolicyLossConfig {
            dual_clip: Some(3.0),
            log_ratio_clamp: 2.0,
            importance: if seq_level { ImportanceLevel::Sequence } else { ImportanceLevel::Token },
            aggregation: Aggregation::SeqMeanTokenSum,
            ..PolicyLossConfig::default()
        };
        let inputs = PolicyLossInputs::new(&logp, Advantage::per_token(&adv), lay.layout()).with_old(&old);
        let grad = policy_loss_backward(&inputs, &cfg, 1.0, None).unwrap();
        let w = 1.0 / lens.len() as f64;
        for range in lay.ranges() {
            let seq_lr = range.clone().map(|t| logp[t] as f64 - old[t] as f64).sum::<f64>() / range.len().max(1) as f64;
            for t in range {
                let lr = if seq_level { seq_lr } else { logp[t] as f64 - old[t] as f64 };
                let r = lr.exp();
                let a = adv[t] as f64;
                // Skip tokens within rounding of a kink (f32 vs f64 may disagree there).
                let near = |x: f64, edge: f64| (x - edge).abs() < 1e-4;
                if near(r, 0.8) || near(r, 1.2) || near(r, 3.0) || near(lr.abs(), 2.0) {
                    continue;
                }
                let clipped = (r < 0.8 && a < 0.0) || (r > 1.2 && a > 0.0) || (r > 3.0 && a < 0.0) || lr.abs() > 2.0;
                if clipped {
                    prop_assert_eq!(grad[t], 0.0, "token {} r {} a {}", t, r, a);
                } else {
                    let want = -a * r * w;
                    prop_assert!((grad[t] as f64 - want).abs() <= 1e-5 * want.abs() + 1e-9);
                }
            }
        }
    }

    /// `old = None` is `old = logp`, and per-sequence advantages are their
    /// broadcast per-token advantages, bit for bit.
    #[test]
    fn equivalent_inputs_give_identical_results(
        lens in prop::collection::vec(0u32..60, 1..10),
        seed in any::<u64>(),
        seq_level in any::<bool>(),
        agg in 0usize..5,
    ) {
        let lay = Lay::packed(&lens);
        prop_assume!(lay.tokens() > 0);
        let o = Opts { old: false, ref_logp: true, per_seq_adv: true, mask: true, seq_level };
        let case = make_case(lay, o, seed);
        let cfg = PolicyLossConfig {
            beta: 0.04,
            dual_clip: Some(3.0),
            importance: if seq_level { ImportanceLevel::Sequence } else { ImportanceLevel::Token },
            aggregation: AGGREGATIONS[agg],
            ..PolicyLossConfig::default()
        };
        let run = |case: &Case| {
            let fwd = policy_loss(&case.inputs(), &cfg).unwrap();
            let bwd = policy_loss_backward(&case.inputs(), &cfg, 0.7, Some(&case.logp)).unwrap();
            (fwd.per_token, fwd.summary, bwd)
        };
        let base = run(&case);
        let mut with_old = case.clone();
        with_old.old = Some(case.logp.clone());
        prop_assert_eq!(&run(&with_old), &base);
        let mut per_token = case.clone();
        let adv = case.adv_seq.as_ref().unwrap().iter().map(|&a| if a.is_nan() { 0.0 } else { a }).collect::<Vec<_>>();
        per_token.adv_tok = Some(broadcast_to_tokens(&adv, &case.lay.layout()).unwrap());
        per_token.adv_seq = None;
        prop_assert_eq!(&run(&per_token), &base);
    }
}

fn fwd_err(case: &Case, cfg: &PolicyLossConfig) -> Error {
    policy_loss(&case.inputs(), cfg).unwrap_err()
}

#[test]
fn bad_lengths_and_layouts_are_typed_errors() {
    let all = Opts {
        old: true,
        ref_logp: true,
        per_seq_adv: false,
        mask: true,
        seq_level: false,
    };
    let cfg = PolicyLossConfig::default();
    let good = make_case(Lay::packed(&[3, 0, 4]), all, 1);
    assert!(policy_loss(&good.inputs(), &cfg).is_ok());
    let short = |v: &Option<Vec<f32>>| Some(v.as_ref().unwrap()[1..].to_vec());
    let mut c = good.clone();
    c.old = short(&good.old);
    assert!(matches!(
        fwd_err(&c, &cfg),
        Error::ShapeMismatch {
            what: "old_logp",
            expected: 7,
            got: 6,
            ..
        }
    ));
    let mut c = good.clone();
    c.ref_logp = short(&good.ref_logp);
    assert!(matches!(
        fwd_err(&c, &cfg),
        Error::ShapeMismatch { what: "ref_logp", .. }
    ));
    let mut c = good.clone();
    c.adv_tok = short(&good.adv_tok);
    assert!(matches!(
        fwd_err(&c, &cfg),
        Error::ShapeMismatch {
            what: "advantages (per token)",
            ..
        }
    ));
    let mut c = good.clone();
    c.mask = Some(vec![1; 8]);
    assert!(matches!(
        fwd_err(&c, &cfg),
        Error::ShapeMismatch { what: "mask", .. }
    ));
    let mut c = good.clone();
    c.adv_seq = Some(vec![1.0; 2]);
    assert!(matches!(
        fwd_err(&c, &cfg),
        Error::ShapeMismatch {
            what: "advantages (per sequence)",
            expected: 3,
            got: 2,
            ..
        }
    ));
    let mut c = good.clone();
    c.lay = Lay::Padded(2, 3);
    assert!(matches!(
        fwd_err(&c, &cfg),
        Error::ShapeMismatch {
            what: "tokens (batch * seq_len)",
            ..
        }
    ));
    for cu in [vec![1, 3, 3, 7], vec![0, 4, 3, 7], vec![0, 3, 3, 6]] {
        let mut c = good.clone();
        c.lay = Lay::Packed(cu);
        assert!(matches!(fwd_err(&c, &cfg), Error::InvalidLayout { .. }));
    }
    let mut c = good.clone();
    c.lay = Lay::Packed(vec![0]);
    assert!(matches!(
        fwd_err(&c, &cfg),
        Error::Empty {
            what: "sequences",
            ..
        }
    ));
    let empty = Case {
        lay: Lay::Padded(0, 0),
        logp: vec![],
        old: None,
        ref_logp: None,
        adv_seq: Some(vec![]),
        adv_tok: None,
        mask: None,
        pg_weights: None,
    };
    assert!(matches!(fwd_err(&empty, &cfg), Error::Empty { what: "logp", .. }));

    // Backward: the gradients' own checks.
    let bwd = |g: f32, gpt: Option<&[f32]>| policy_loss_backward(&good.inputs(), &cfg, g, gpt).unwrap_err();
    assert!(matches!(
        bwd(1.0, Some(&[0.0; 6])),
        Error::ShapeMismatch {
            what: "grad_per_token",
            ..
        }
    ));
    for bad in [f32::NAN, f32::INFINITY] {
        assert!(matches!(
            bwd(bad, None),
            Error::NonFinite {
                what: "grad_loss",
                index: 0,
                ..
            }
        ));
    }
    let first_on = (0..7).find(|&t| good.active(t)).unwrap();
    let mut gpt = vec![0.0f32; 7];
    gpt[first_on] = f32::NAN;
    assert!(matches!(
        bwd(1.0, Some(&gpt)),
        Error::NonFinite { what: "grad_per_token", index, .. } if index == first_on
    ));
}

#[test]
fn bad_parameters_are_typed_errors() {
    let o = Opts {
        old: true,
        ref_logp: false,
        per_seq_adv: true,
        mask: false,
        seq_level: false,
    };
    let case = make_case(Lay::Padded(2, 3), o, 2);
    let base = PolicyLossConfig::default();
    let name_of = |cfg: PolicyLossConfig| match fwd_err(&case, &cfg) {
        Error::InvalidParameter { name, .. } => name,
        e => panic!("{e:?}"),
    };
    for x in [f32::NAN, f32::INFINITY] {
        for (cfg, name) in [
            (PolicyLossConfig { eps_low: x, ..base }, "eps_low"),
            (PolicyLossConfig { eps_high: x, ..base }, "eps_high"),
            (
                PolicyLossConfig {
                    dual_clip: Some(x),
                    ..base
                },
                "dual_clip",
            ),
            (
                PolicyLossConfig {
                    // +inf turns the clamp off; NaN and -inf are refused.
                    log_ratio_clamp: -x,
                    ..base
                },
                "log_ratio_clamp",
            ),
            (PolicyLossConfig { beta: x, ..base }, "beta"),
        ] {
            assert_eq!(name_of(cfg), name);
        }
    }
    for (cfg, name) in [
        (
            PolicyLossConfig {
                eps_low: -0.1,
                ..base
            },
            "eps_low",
        ),
        (
            PolicyLossConfig {
                eps_low: 1.01,
                ..base
            },
            "eps_low",
        ),
        (
            PolicyLossConfig {
                eps_high: -0.1,
                ..base
            },
            "eps_high",
        ),
        (
            PolicyLossConfig {
                dual_clip: Some(1.0),
                ..base
            },
            "dual_clip",
        ),
        (
            PolicyLossConfig {
                log_ratio_clamp: 0.0,
                ..base
            },
            "log_ratio_clamp",
        ),
        (PolicyLossConfig { beta: -0.01, ..base }, "beta"),
        // beta != 0 without ref_logp.
        (PolicyLossConfig { beta: 0.04, ..base }, "beta"),
        (
            PolicyLossConfig {
                aggregation: Aggregation::TokenMean {
                    normalizer: Some(0.0),
                },
                ..base
            },
            "normalizer",
        ),
        (
            PolicyLossConfig {
                aggregation: Aggregation::TokenMean {
                    normalizer: Some(f32::NAN),
                },
                ..base
            },
            "normalizer",
        ),
        (
            PolicyLossConfig {
                aggregation: Aggregation::SeqMeanTokenSumNorm { constant: -1.0 },
                ..base
            },
            "constant",
        ),
    ] {
        assert_eq!(name_of(cfg), name);
    }
    // The edges of the domains are accepted.
    for cfg in [
        PolicyLossConfig {
            eps_low: 1.0,
            eps_high: 0.0,
            ..base
        },
        PolicyLossConfig { eps_low: 0.0, ..base },
        PolicyLossConfig {
            dual_clip: Some(1.0001),
            ..base
        },
    ] {
        assert!(policy_loss(&case.inputs(), &cfg).is_ok());
    }
}

#[test]
fn non_finite_inputs_at_masked_in_tokens_are_reported_first_by_position() {
    let o = Opts {
        old: true,
        ref_logp: true,
        per_seq_adv: false,
        mask: true,
        seq_level: false,
    };
    let cfg = PolicyLossConfig {
        beta: 0.04,
        ..PolicyLossConfig::default()
    };
    // Long sequences, so the bad token sits deep in a block.
    let good = make_case(Lay::packed(&[3000, 0, 2500]), o, 3);
    let on: Vec<usize> = (0..5500).filter(|&t| good.active(t)).collect();
    let (early, late) = (on[2000], on[4000]);
    type Field = fn(&mut Case) -> &mut Vec<f32>;
    let fields: [(&str, Field); 4] = [
        ("logp", |c| &mut c.logp),
        ("old_logp", |c| c.old.as_mut().unwrap()),
        ("ref_logp", |c| c.ref_logp.as_mut().unwrap()),
        ("advantages (per token)", |c| c.adv_tok.as_mut().unwrap()),
    ];
    for (name, field) in fields {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut c = good.clone();
            field(&mut c)[late] = bad;
            field(&mut c)[early] = bad;
            for err in [
                fwd_err(&c, &cfg),
                policy_loss_backward(&c.inputs(), &cfg, 1.0, None).unwrap_err(),
            ] {
                assert!(
                    matches!(err, Error::NonFinite { what, index, .. } if what == name && index == early),
                    "{name}: {err:?}"
                );
            }
        }
    }
    // Per-sequence advantages: reported by sequence.
    let mut c = make_case(
        Lay::packed(&[5, 0, 6]),
        Opts {
            per_seq_adv: true,
            ..o
        },
        4,
    );
    c.adv_seq.as_mut().unwrap()[2] = f32::NAN;
    assert!(matches!(
        fwd_err(&c, &cfg),
        Error::NonFinite {
            what: "advantages (per sequence)",
            index: 2,
            ..
        }
    ));
}

/// TRL 1.16's `GRPOTrainer._compute_loss` and verl's policy losses
/// (tests/fixtures/policy_loss_reference.py): the loss, `d loss / d logp`
/// and the logged statistics, for every loss type and option, each case
/// also with NaN in the padding.
#[test]
fn matches_trl_and_verl_fixtures() {
    for c in crate::common::policy_loss_fixture::all_cases() {
        let advantages = if c.per_token_advantages {
            Advantage::per_token(&c.advantages)
        } else {
            Advantage::per_sequence(&c.advantages)
        };
        let layout = SeqLayout::Padded {
            batch: c.batch,
            seq_len: c.seq_len,
        };
        let mut inputs = PolicyLossInputs::new(&c.logp, advantages, layout)
            .with_old(&c.old_logp)
            .with_mask(&c.mask);
        if let Some(r) = &c.ref_logp {
            inputs = inputs.with_ref(r);
        }
        if let Some(w) = &c.pg_weights {
            inputs = inputs.with_pg_weights(w);
        }
        let out = policy_loss(&inputs, &c.cfg).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_close(&format!("{} loss", c.name), &[out.loss()], &[c.loss], 1e-6, 1e-5);
        let stats = out.stats();
        for (name, want) in &c.stats {
            let got = crate::common::policy_loss_fixture::FixtureCase::stat(&stats, name);
            assert_close(&format!("{} {name}", c.name), &[got], &[*want], 1e-6, 1e-5);
        }
        let dlogp = policy_loss_backward(&inputs, &c.cfg, 1.0, None).unwrap();
        assert_close(&format!("{} dlogp", c.name), &dlogp, &c.dlogp, 1e-7, 1e-5);
    }
}

/// Every objective with every new option (delta, no clamp, bias-corrected
/// KL, `pg_weights`, verl's divisor) against the f64 reference, forward and
/// finite differences, padded and packed.
#[test]
fn objectives_and_options_match_reference() {
    let objectives = [
        PolicyObjective::Clip { delta: Some(2.0) },
        PolicyObjective::Cispo {
            min_ratio: 0.0,
            max_ratio: 1.28,
        },
        PolicyObjective::Cispo {
            min_ratio: 0.8,
            max_ratio: 1.28,
        },
        PolicyObjective::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05,
        },
        PolicyObjective::Vespo {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        },
        PolicyObjective::Vespo {
            k_pos: 1.5,
            lambda_pos: 0.0,
            k_neg: -0.5,
            lambda_neg: 1.0,
        },
    ];
    let mut cases = 0;
    for (li, lay) in [
        Lay::Padded(1, 1),
        Lay::Padded(3, 5),
        Lay::packed(&[4, 0, 9, 1, 17]),
    ]
    .into_iter()
    .enumerate()
    {
        for (oi, &objective) in objectives.iter().enumerate() {
            let vespo = matches!(objective, PolicyObjective::Vespo { .. });
            for bits in 0..32u32 {
                let bit = |i: u32| bits >> i & 1 == 1;
                let o = Opts {
                    old: true,
                    ref_logp: bit(0),
                    per_seq_adv: bit(1),
                    mask: bit(2),
                    seq_level: !vespo && bit(3),
                };
                let seed = 77_000 + (li * 1000 + oi * 100) as u64 + bits as u64;
                let mut case = make_case(lay.clone(), o, seed);
                if vespo {
                    // Small log-ratios, so that the sequence weights are not all 0.
                    let logp = case.logp.clone();
                    for (old, &l) in case.old.as_mut().unwrap().iter_mut().zip(&logp) {
                        *old = l - (l - *old) * 0.05;
                    }
                }
                if bit(4) {
                    let mut rng = Rng::new(seed);
                    let w = (0..case.logp.len())
                        .map(|t| {
                            if case.active(t) {
                                rng.range(0.0, 1.5) as f32
                            } else {
                                f32::NAN
                            }
                        })
                        .collect();
                    case.pg_weights = Some(w);
                }
                let cfg = PolicyLossConfig {
                    objective,
                    eps_high: 0.28,
                    log_ratio_clamp: if bits % 3 == 0 { f32::INFINITY } else { 20.0 },
                    importance: if o.seq_level {
                        ImportanceLevel::Sequence
                    } else {
                        ImportanceLevel::Token
                    },
                    beta: if o.ref_logp { 0.05 } else { 0.0 },
                    kl: [KlEstimator::K3, KlEstimator::K2][bits as usize % 2],
                    kl_bias_correction: o.ref_logp && bits % 5 < 3,
                    aggregation: AGGREGATIONS[bits as usize % 5],
                    exclude_empty_seqs: bits % 7 < 3,
                    ..PolicyLossConfig::default()
                };
                let what = format!("{lay:?} {o:?} {cfg:?} weights {}", bit(4));
                check_forward(&case, &cfg, &what);
                check_backward(&case, &cfg, 24, seed, &what);
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 3 * 6 * 32);
}

/// A negative policy-gradient weight at a masked-in token is a typed
/// error; a NaN one is `NonFinite`; either is ignored where masked out.
#[test]
fn bad_pg_weights_are_typed_errors() {
    const LOGP: [f32; 3] = [-1.0, -2.0, -0.5];
    const ADV: [f32; 1] = [1.0];
    const MASK: [u8; 3] = [1, 0, 1];
    let cfg = PolicyLossConfig::default();
    let run = |w: &[f32]| {
        let inputs = PolicyLossInputs::new(
            &LOGP,
            Advantage::per_sequence(&ADV),
            SeqLayout::Padded { batch: 1, seq_len: 3 },
        )
        .with_mask(&MASK)
        .with_pg_weights(w);
        (
            policy_loss(&inputs, &cfg).map(|_| ()),
            policy_loss_backward(&inputs, &cfg, 1.0, None).map(|_| ()),
        )
    };
    let negative = Error::InvalidParameter {
        op: "policy_loss",
        name: "pg_weights",
        value: -0.5,
        expected: "finite and >= 0 at masked-in tokens",
    };
    let (f, b) = run(&[1.0, 1.0, -0.5]);
    assert_eq!(f.unwrap_err(), negative);
    assert!(matches!(
        b.unwrap_err(),
        Error::InvalidParameter {
            name: "pg_weights",
            ..
        }
    ));
    let (f, b) = run(&[f32::NAN, 1.0, 1.0]);
    let nan = |op| Error::NonFinite {
        op,
        what: "pg_weights",
        index: 0,
    };
    assert_eq!(f.unwrap_err(), nan("policy_loss"));
    assert_eq!(b.unwrap_err(), nan("policy_loss_backward"));
    let (f, b) = run(&[1.0, f32::NAN, 1.0]);
    f.unwrap();
    b.unwrap();
    let (f, _) = run(&[1.0, -3.0, 0.0]);
    f.unwrap();
    let short = PolicyLossInputs::new(
        &LOGP,
        Advantage::per_sequence(&ADV),
        SeqLayout::Padded { batch: 1, seq_len: 3 },
    )
    .with_pg_weights(&[1.0]);
    assert!(matches!(
        policy_loss(&short, &cfg).unwrap_err(),
        Error::ShapeMismatch {
            what: "pg_weights",
            ..
        }
    ));
}
