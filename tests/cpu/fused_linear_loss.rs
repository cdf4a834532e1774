//! The fused LM-head + GRPO loss on the CPU: against the two-call form
//! (fused_linear_logprobs, policy_loss, policy_loss_backward,
//! fused_linear_logprobs_backward) on random awkward sizes and every
//! aggregation; against an f64 reference written out here; dh and dW
//! against finite differences of that reference; independence from the
//! chunk sizes; bf16; every bad input.

use crate::common::{assert_close, finite_diff, widen, Rng};
use grpo_kernels::{
    fused_linear_logprobs, fused_linear_logprobs_backward, fused_linear_policy_loss, policy_loss,
    policy_loss_backward, Advantage, Aggregation, Error, Float, FusedLinearConfig, FusedLossConfig,
    ImportanceLevel, KlEstimator, LinearGrads, LinearLoss, LinearLossInputs, LinearRows, LogProbConfig,
    LogProbGrads, PolicyLossConfig, PolicyLossInputs, PolicyLossStats, PolicyObjective, SeqLayout,
};
use half::bf16;

const IGNORE: i64 = -100;

/// One random problem, in f32 (converted to `T` by [`Problem::inputs`]).
#[derive(Debug, Clone)]
struct Problem {
    n: usize,
    h: usize,
    v: usize,
    hidden: Vec<f32>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    targets: Vec<i64>,
    mask: Option<Vec<u8>>,
    old: Option<Vec<f32>>,
    reference: Option<Vec<f32>>,
    adv: Vec<f32>,
    per_sequence: bool,
    cu_seqlens: Vec<u32>,
    cfg: FusedLossConfig,
}

impl Problem {
    /// Sizes, options and values drawn from `seed`; `smooth` keeps every
    /// token away from the loss's kinks (no clipping), for finite differences.
    fn random(seed: u64, smooth: bool) -> Self {
        let mut rng = Rng::new(seed);
        let n = 1 + rng.below(37);
        let h = 1 + rng.below(23);
        let v = 2 + rng.below(301);
        let hidden: Vec<f32> = rng.normals(n * h, 1.0);
        let weight: Vec<f32> = rng.normals(v * h, 1.5 / (h as f64).sqrt());
        let bias = (rng.below(2) == 0).then(|| rng.normals(v, 0.5));
        let mut targets: Vec<i64> = (0..n).map(|_| rng.below(v) as i64).collect();
        if n > 2 && rng.below(3) == 0 {
            targets[rng.below(n)] = IGNORE;
        }
        let mask = (rng.below(2) == 0).then(|| (0..n).map(|_| (rng.below(4) != 0) as u8).collect());
        // Sequences: random cut points, empty sequences allowed.
        let mut cu = vec![0u32];
        while (*cu.last().unwrap() as usize) < n {
            let len = rng.below(9);
            cu.push((*cu.last().unwrap() as usize + len).min(n) as u32);
        }
        let seqs = cu.len() - 1;
        let per_sequence = rng.below(2) == 0;
        let adv: Vec<f32> = rng.normals(if per_sequence { seqs } else { n }, 1.0);
        // Without old log-probs the ratio is 1 with gradient r (a detached
        // old): not the derivative of the loss's value, so finite
        // differences need them.
        let old = (smooth || rng.below(4) != 0).then(|| rng.normals(n, 0.0));
        let reference = (rng.below(3) != 0).then(|| rng.normals(n, 0.0));
        let aggregation = match rng.below(5) {
            0 => Aggregation::TokenMean { normalizer: None },
            1 => Aggregation::TokenMean {
                normalizer: Some(7.5),
            },
            2 => Aggregation::SeqMeanTokenMean,
            3 => Aggregation::SeqMeanTokenSum,
            _ => Aggregation::SeqMeanTokenSumNorm { constant: 11.0 },
        };
        let kl = [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3][rng.below(3)];
        let loss = PolicyLossConfig {
            eps_low: if smooth { 1.0 } else { 0.2 },
            eps_high: if smooth { 1e6 } else { 0.28 },
            dual_clip: (!smooth && rng.below(2) == 0).then_some(3.0),
            log_ratio_clamp: 20.0,
            importance: ImportanceLevel::Token,
            beta: if reference.is_some() {
                0.04 + rng.uniform() as f32
            } else {
                0.0
            },
            kl,
            aggregation,
            ..Default::default()
        };
        let cfg = FusedLossConfig {
            logprob: LogProbConfig {
                temperature: [1.0, 0.7, 1.3][rng.below(3)],
                entropy: rng.below(2) == 0,
                ignore_index: Some(IGNORE),
            },
            loss,
            chunk_rows: 1 + rng.below(n + 3),
            chunk_vocab: 1 + rng.below(v + 5),
        };
        let mut p = Self {
            n,
            h,
            v,
            hidden,
            weight,
            bias,
            targets,
            mask,
            old,
            reference,
            adv,
            per_sequence,
            cu_seqlens: cu,
            cfg,
        };
        // Old and reference log-probs near the policy's own, so that
        // ratios spread around 1 (some clipped, some not).
        let logp = p.reference_f64().logp;
        let spread = if smooth { 0.05 } else { 0.4 };
        if let Some(old) = &mut p.old {
            for (o, &l) in old.iter_mut().zip(&logp) {
                *o = (l + spread * rng.normal()) as f32;
            }
        }
        if let Some(r) = &mut p.reference {
            for (o, &l) in r.iter_mut().zip(&logp) {
                *o = (l + spread * rng.normal()) as f32;
            }
        }
        p
    }

    fn active(&self, i: usize) -> bool {
        self.targets[i] != IGNORE && self.mask.as_ref().is_none_or(|m| m[i] != 0)
    }

    fn policy_mask(&self) -> Vec<u8> {
        (0..self.n).map(|i| self.active(i) as u8).collect()
    }

    fn advantage(&self) -> Advantage<'_> {
        if self.per_sequence {
            Advantage::per_sequence(&self.adv)
        } else {
            Advantage::per_token(&self.adv)
        }
    }

    fn layout(&self) -> SeqLayout<'_> {
        SeqLayout::Packed {
            cu_seqlens: &self.cu_seqlens,
        }
    }

    fn linear_cfg(&self) -> FusedLinearConfig {
        FusedLinearConfig {
            logprob: self.cfg.logprob,
            chunk_rows: self.cfg.chunk_rows,
            chunk_vocab: self.cfg.chunk_vocab,
        }
    }

    /// The op on the inputs converted to `T`.
    fn run<T: Float>(&self) -> Result<LinearLoss<T>, Error> {
        let (hidden, weight, bias) = self.converted::<T>();
        let mut rows = LinearRows::new(&hidden, &weight, &self.targets, self.h);
        if let Some(b) = &bias {
            rows = rows.with_bias(b);
        }
        if let Some(m) = &self.mask {
            rows = rows.with_mask(m);
        }
        let mut inputs = LinearLossInputs::new(rows, self.advantage(), self.layout());
        if let Some(o) = &self.old {
            inputs = inputs.with_old(o);
        }
        if let Some(r) = &self.reference {
            inputs = inputs.with_ref(r);
        }
        fused_linear_policy_loss(&inputs, &self.cfg)
    }

    fn converted<T: Float>(&self) -> (Vec<T>, Vec<T>, Option<Vec<T>>) {
        let conv = |xs: &[f32]| xs.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
        (
            conv(&self.hidden),
            conv(&self.weight),
            self.bias.as_deref().map(conv),
        )
    }

    /// The two-call form: log-probs, policy loss, its backward, the fused
    /// linear backward. Returns `(logp, per_token, summary, grads)`.
    fn two_call<T: Float>(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>, LinearGrads<T>) {
        let (hidden, weight, bias) = self.converted::<T>();
        let mut rows = LinearRows::new(&hidden, &weight, &self.targets, self.h);
        if let Some(b) = &bias {
            rows = rows.with_bias(b);
        }
        if let Some(m) = &self.mask {
            rows = rows.with_mask(m);
        }
        let lin = self.linear_cfg();
        let lp = fused_linear_logprobs(&rows, &lin).unwrap();
        let mask = self.policy_mask();
        let mut pin = PolicyLossInputs::new(&lp.logp, self.advantage(), self.layout()).with_mask(&mask);
        if let Some(o) = &self.old {
            pin = pin.with_old(o);
        }
        if let Some(r) = &self.reference {
            pin = pin.with_ref(r);
        }
        let loss = policy_loss(&pin, &self.cfg.loss).unwrap();
        let dlogp = policy_loss_backward(&pin, &self.cfg.loss, 1.0, None).unwrap();
        let grads = LogProbGrads {
            logp: &dlogp[..],
            entropy: None,
            lse: None,
        };
        let g = fused_linear_logprobs_backward(&rows, &lin, &lp.saved(), &grads).unwrap();
        (lp.logp, loss.per_token, loss.summary, g)
    }

    /// The f64 reference at the problem's own values.
    fn reference_f64(&self) -> Reference {
        self.reference_at(&widen(&self.hidden), &widen(&self.weight))
    }

    /// Logits, log-softmax, token losses, aggregation and gradients in f64,
    /// written out from the formulas of the module docs.
    fn reference_at(&self, hidden: &[f64], weight: &[f64]) -> Reference {
        let (n, h, v) = (self.n, self.h, self.v);
        let t = self.cfg.logprob.temperature as f64;
        let cfg = &self.cfg.loss;
        let seq_of: Vec<usize> = (0..n)
            .map(|i| {
                self.cu_seqlens
                    .windows(2)
                    .position(|w| (w[0] as usize..w[1] as usize).contains(&i))
                    .unwrap()
            })
            .collect();
        let seqs = self.cu_seqlens.len() - 1;
        let counts: Vec<usize> = (0..seqs)
            .map(|s| (0..n).filter(|&i| seq_of[i] == s && self.active(i)).count())
            .collect();
        let tokens: usize = counts.iter().sum();
        let weight_of = |s: usize| -> f64 {
            let sf = seqs as f64;
            match cfg.aggregation {
                Aggregation::TokenMean { normalizer } => {
                    1.0 / normalizer.map_or(tokens.max(1) as f64, |x| x as f64)
                }
                Aggregation::SeqMeanTokenMean => 1.0 / (sf * counts[s].max(1) as f64),
                Aggregation::SeqMeanTokenSum => 1.0 / sf,
                Aggregation::SeqMeanTokenSumNorm { constant } => 1.0 / (sf * constant as f64),
            }
        };
        let mut out = Reference {
            loss: 0.0,
            logp: vec![0.0; n],
            per_token: vec![0.0; n],
            dhidden: vec![0.0; n * h],
            dweight: vec![0.0; v * h],
            dbias: vec![0.0; v],
        };
        for i in (0..n).filter(|&i| self.active(i)) {
            let x: Vec<f64> = (0..v)
                .map(|j| {
                    let z: f64 = (0..h).map(|k| hidden[i * h + k] * weight[j * h + k]).sum::<f64>()
                        + self.bias.as_ref().map_or(0.0, |b| b[j] as f64);
                    z / t
                })
                .collect();
            let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + x.iter().map(|&xj| (xj - m).exp()).sum::<f64>().ln();
            let y = self.targets[i] as usize;
            let logp = x[y] - lse;
            out.logp[i] = logp;
            let adv = self.adv[if self.per_sequence { seq_of[i] } else { i }] as f64;
            let lr = self.old.as_ref().map_or(0.0, |o| logp - o[i] as f64);
            let d = self.reference.as_ref().map_or(0.0, |r| r[i] as f64 - logp);
            let (l, dl) = token_loss_f64(cfg, lr, adv, d);
            out.per_token[i] = l;
            let w = weight_of(seq_of[i]);
            out.loss += w * l;
            let g = w * dl;
            for j in 0..v {
                let p = (x[j] - lse).exp();
                let dz = g * ((j == y) as u8 as f64 - p) / t;
                for k in 0..h {
                    out.dhidden[i * h + k] += dz * weight[j * h + k];
                    out.dweight[j * h + k] += dz * hidden[i * h + k];
                }
                out.dbias[j] += dz;
            }
        }
        out
    }
}

struct Reference {
    loss: f64,
    logp: Vec<f64>,
    per_token: Vec<f64>,
    dhidden: Vec<f64>,
    dweight: Vec<f64>,
    dbias: Vec<f64>,
}

/// `(l, dl/dlogp)` of one token in f64, from policy_loss's module docs.
fn token_loss_f64(cfg: &PolicyLossConfig, log_ratio: f64, adv: f64, d: f64) -> (f64, f64) {
    let c = cfg.log_ratio_clamp as f64;
    let clamped = log_ratio.abs() > c;
    let r = log_ratio.clamp(-c, c).exp();
    let (lo, hi) = (1.0 - cfg.eps_low as f64, 1.0 + cfg.eps_high as f64);
    let clip_low = r < lo && adv < 0.0;
    let clip_high = r > hi && adv > 0.0;
    let mut pg = (-adv * r).max(-adv * r.clamp(lo, hi));
    let mut dual = false;
    if let Some(cc) = cfg.dual_clip {
        if adv < 0.0 && pg > -(cc as f64) * adv {
            pg = -(cc as f64) * adv;
            dual = true;
        }
    }
    let dpg = if clip_low || clip_high || dual || clamped {
        0.0
    } else {
        -adv * r
    };
    // d = ref - logp, so dd/dlogp = -1.
    let (kl, dkl) = match cfg.kl {
        KlEstimator::K1 => (-d, 1.0),
        KlEstimator::K2 => (d * d / 2.0, -d),
        KlEstimator::K3 => (d.exp() - d - 1.0, 1.0 - d.exp()),
        _ => unreachable!("not drawn"),
    };
    let beta = cfg.beta as f64;
    (pg + beta * kl, dpg + beta * dkl)
}

fn grads_close<T: Float + Into<f64>>(
    what: &str,
    got: &LinearGrads<T>,
    want: (&[f64], &[f64], Option<&[f64]>),
    tol: f64,
) {
    let scale = |xs: &[f64]| xs.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3);
    assert_close(
        &format!("{what} dh"),
        &got.hidden,
        want.0,
        tol * scale(want.0),
        tol,
    );
    assert_close(
        &format!("{what} dW"),
        &got.weight,
        want.1,
        tol * scale(want.1),
        tol,
    );
    match (&got.bias, want.2) {
        (Some(b), Some(w)) => assert_close(&format!("{what} db"), b, w, tol * scale(w), tol),
        (None, None) => {}
        _ => panic!("{what}: bias gradient presence"),
    }
}

#[test]
fn matches_the_two_call_form() {
    for seed in 0..60 {
        let p = Problem::random(seed, false);
        let fused = p.run::<f32>().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let (logp, per_token, summary, g) = p.two_call::<f32>();
        let ctx = format!(
            "seed {seed} {:?}",
            (p.n, p.h, p.v, p.cfg.chunk_rows, p.cfg.chunk_vocab)
        );
        assert_close(&format!("{ctx} logp"), &fused.logp, &widen(&logp), 1e-5, 1e-5);
        assert_close(
            &format!("{ctx} per_token"),
            &fused.per_token,
            &widen(&per_token),
            1e-5,
            1e-4,
        );
        // Loss and statistics: equal up to the summation order.
        assert_close(
            &format!("{ctx} summary"),
            // The fused loss leaves the sequence-level statistics at 0.
            &fused.summary[..=PolicyLossStats::TOKENS],
            &widen(&summary[..=PolicyLossStats::TOKENS]),
            1e-5,
            1e-4,
        );
        let bias = g.bias.as_ref().map(|b| widen(b));
        grads_close(
            &ctx,
            &fused.grads,
            (&widen(&g.hidden), &widen(&g.weight), bias.as_deref()),
            1e-4,
        );
        assert_eq!(fused.entropy.is_some(), p.cfg.logprob.entropy);
    }
}

#[test]
fn matches_the_f64_reference() {
    for seed in 100..140 {
        let p = Problem::random(seed, false);
        let fused = p.run::<f32>().unwrap();
        let r = p.reference_f64();
        let ctx = format!("seed {seed}");
        assert_close(&format!("{ctx} logp"), &fused.logp, &r.logp, 2e-5, 2e-5);
        assert_close(
            &format!("{ctx} per_token"),
            &fused.per_token,
            &r.per_token,
            1e-4,
            1e-4,
        );
        assert_close(&format!("{ctx} loss"), &[fused.loss()], &[r.loss], 1e-4, 1e-4);
        let bias = p.bias.as_ref().map(|_| r.dbias.as_slice());
        grads_close(&ctx, &fused.grads, (&r.dhidden, &r.dweight, bias), 2e-4);
    }
}

#[test]
fn gradients_match_finite_differences() {
    for seed in 200..215 {
        let p = Problem::random(seed, true);
        let fused = p.run::<f32>().unwrap();
        let (hidden, weight) = (widen(&p.hidden), widen(&p.weight));
        let fd_h = finite_diff(&hidden, 1e-6, |x| p.reference_at(x, &weight).loss);
        let fd_w = finite_diff(&weight, 1e-6, |x| p.reference_at(&hidden, x).loss);
        let ctx = format!("seed {seed} (finite differences)");
        let scale = |xs: &[f64]| xs.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3);
        assert_close(
            &format!("{ctx} dh"),
            &fused.grads.hidden,
            &fd_h,
            1e-4 * scale(&fd_h),
            1e-3,
        );
        assert_close(
            &format!("{ctx} dW"),
            &fused.grads.weight,
            &fd_w,
            1e-4 * scale(&fd_w),
            1e-3,
        );
    }
}

#[test]
fn chunk_sizes_do_not_change_the_result() {
    for seed in 300..320 {
        let mut p = Problem::random(seed, false);
        p.cfg.chunk_rows = p.n + 1;
        p.cfg.chunk_vocab = p.v;
        let one = p.run::<f32>().unwrap();
        for (rows, cols) in [(1, 1), (2, 3), (5, 64)] {
            p.cfg.chunk_rows = rows;
            p.cfg.chunk_vocab = cols;
            let other = p.run::<f32>().unwrap();
            let ctx = format!("seed {seed} chunks {rows}x{cols}");
            assert_close(&format!("{ctx} logp"), &other.logp, &widen(&one.logp), 1e-5, 1e-5);
            assert_close(
                &format!("{ctx} summary"),
                &other.summary,
                &widen(&one.summary),
                1e-5,
                1e-5,
            );
            let bias = one.grads.bias.as_ref().map(|b| widen(b));
            grads_close(
                &ctx,
                &other.grads,
                (
                    &widen(&one.grads.hidden),
                    &widen(&one.grads.weight),
                    bias.as_deref(),
                ),
                1e-4,
            );
        }
    }
}

#[test]
fn bf16_matches_the_two_call_form() {
    for seed in 400..420 {
        let mut p = Problem::random(seed, false);
        // One row chunk: dW in bf16 is rounded once per row chunk on both sides.
        p.cfg.chunk_rows = p.n;
        let fused = p.run::<bf16>().unwrap();
        let (logp, _, summary, g) = p.two_call::<bf16>();
        let ctx = format!("seed {seed} bf16");
        assert_close(&format!("{ctx} logp"), &fused.logp, &widen(&logp), 1e-5, 1e-5);
        assert_close(
            &format!("{ctx} summary"),
            // The fused loss leaves the sequence-level statistics at 0.
            &fused.summary[..=PolicyLossStats::TOKENS],
            &widen(&summary[..=PolicyLossStats::TOKENS]),
            1e-5,
            1e-4,
        );
        let bias = g.bias.as_ref().map(|b| widen(b));
        grads_close(
            &ctx,
            &fused.grads,
            (&widen(&g.hidden), &widen(&g.weight), bias.as_deref()),
            1e-2,
        );
    }
}

#[test]
fn skipped_rows_are_never_read_and_get_zero_gradients() {
    let mut p = Problem::random(7, false);
    while p.n < 4 {
        p = Problem::random(p.n as u64 + 1000, false);
    }
    p.mask = Some((0..p.n).map(|i| i.is_multiple_of(2) as u8).collect());
    let clean = p.run::<f32>().unwrap();
    for i in (0..p.n).filter(|i| i % 2 == 1) {
        p.hidden[i * p.h..(i + 1) * p.h].fill(f32::NAN);
        if let Some(o) = &mut p.old {
            o[i] = f32::NAN;
        }
        if let Some(r) = &mut p.reference {
            r[i] = f32::INFINITY;
        }
        if !p.per_sequence {
            p.adv[i] = f32::NAN;
        }
    }
    let poisoned = p.run::<f32>().unwrap();
    assert_eq!(clean.summary, poisoned.summary);
    assert_eq!(clean.grads.weight, poisoned.grads.weight);
    for i in (0..p.n).filter(|i| i % 2 == 1) {
        assert!(poisoned.grads.hidden[i * p.h..(i + 1) * p.h]
            .iter()
            .all(|&x| x == 0.0));
        assert_eq!((poisoned.logp[i], poisoned.per_token[i]), (0.0, 0.0));
    }
}

#[test]
fn no_active_rows_gives_zero_loss_and_gradients() {
    let mut p = Problem::random(11, false);
    p.mask = Some(vec![0; p.n]);
    let out = p.run::<f32>().unwrap();
    assert_eq!(out.loss(), 0.0);
    assert_eq!(out.stats().tokens, 0.0);
    assert!(out
        .grads
        .hidden
        .iter()
        .chain(&out.grads.weight)
        .all(|&x| x == 0.0));
}

#[test]
fn scaling_the_gradients() {
    let p = Problem::random(12, false);
    let one = p.run::<f32>().unwrap();
    let mut half = p.run::<f32>().unwrap();
    half.scale_grads(0.5).unwrap();
    let want: Vec<f64> = one.grads.weight.iter().map(|&x| 0.5 * x as f64).collect();
    assert_close("scaled dW", &half.grads.weight, &want, 0.0, 0.0);
    assert_eq!(
        half.scale_grads(f32::NAN).unwrap_err(),
        Error::NonFinite {
            op: "fused_linear_policy_loss",
            what: "grad_loss",
            index: 0
        }
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    const OP: &str = "fused_linear_policy_loss";
    let base = {
        let mut p = Problem::random(3, false);
        while p.n < 3 || p.old.is_none() || p.reference.is_none() {
            p = Problem::random(p.n as u64 * 31 + 5000 + p.v as u64, false);
        }
        p.mask = None;
        p.targets.iter_mut().for_each(|t| *t = t.rem_euclid(p.v as i64));
        p.per_sequence = false;
        p.adv = vec![0.5; p.n];
        p
    };
    let err = |f: &dyn Fn(&mut Problem)| {
        let mut p = base.clone();
        f(&mut p);
        p.run::<f32>().unwrap_err()
    };
    // GSPO cannot be fused in one pass.
    assert!(matches!(
        err(&|p| p.cfg.loss.importance = ImportanceLevel::Sequence),
        Error::Unsupported { op: OP, .. }
    ));
    // Nor, for now, the other objectives and options.
    let sapo = PolicyObjective::Sapo {
        tau_pos: 1.0,
        tau_neg: 1.05,
    };
    for objective in [sapo, PolicyObjective::Clip { delta: Some(2.0) }] {
        assert!(matches!(
            err(&|p| {
                p.cfg.loss.objective = objective;
                p.cfg.loss.dual_clip = None;
            }),
            Error::Unsupported { op: OP, .. }
        ));
    }
    assert!(matches!(
        err(&|p| p.cfg.loss.exclude_empty_seqs = true),
        Error::Unsupported { op: OP, .. }
    ));
    assert_eq!(
        err(&|p| p.cfg.chunk_rows = 0),
        Error::InvalidParameter {
            op: OP,
            name: "chunk_rows",
            value: 0.0,
            expected: ">= 1"
        }
    );
    assert!(matches!(
        err(&|p| p.cfg.logprob.temperature = 0.0),
        Error::InvalidParameter {
            op: OP,
            name: "temperature",
            ..
        }
    ));
    assert!(matches!(
        err(&|p| p.reference = None),
        Error::InvalidParameter {
            op: OP,
            name: "beta",
            ..
        }
    ));
    assert!(matches!(
        err(&|p| p.cfg.loss.eps_low = 2.0),
        Error::InvalidParameter {
            op: OP,
            name: "eps_low",
            ..
        }
    ));
    assert_eq!(
        err(&|p| p.adv.push(0.0)),
        Error::ShapeMismatch {
            op: OP,
            what: "advantages (per token)",
            expected: base.n,
            got: base.n + 1
        }
    );
    assert_eq!(
        err(&|p| {
            p.old.as_mut().unwrap().pop();
        }),
        Error::ShapeMismatch {
            op: OP,
            what: "old_logp",
            expected: base.n,
            got: base.n - 1
        }
    );
    assert!(matches!(
        err(&|p| {
            p.hidden.pop();
        }),
        Error::ShapeMismatch {
            op: OP,
            what: "hidden",
            ..
        }
    ));
    assert!(matches!(
        err(&|p| *p.cu_seqlens.last_mut().unwrap() += 1),
        Error::InvalidLayout { op: OP, .. }
    ));
    assert_eq!(
        err(&|p| p.targets[1] = p.v as i64),
        Error::TokenOutOfRange {
            op: OP,
            index: 1,
            token: base.v as i64,
            vocab: base.v
        }
    );
    let non_finite = |what, index| Error::NonFinite { op: OP, what, index };
    assert_eq!(
        err(&|p| p.old.as_mut().unwrap()[2] = f32::NAN),
        non_finite("old_logp", 2)
    );
    assert_eq!(
        err(&|p| p.reference.as_mut().unwrap()[1] = f32::INFINITY),
        non_finite("ref_logp", 1)
    );
    assert_eq!(
        err(&|p| p.adv[2] = f32::NAN),
        non_finite("advantages (per token)", 2)
    );
    assert_eq!(
        err(&|p| {
            p.per_sequence = true;
            p.adv = vec![1.0; p.cu_seqlens.len() - 1];
            let s = p.cu_seqlens.windows(2).position(|w| w[1] > w[0]).unwrap();
            p.adv[s] = f32::NEG_INFINITY;
        }),
        {
            let s = base.cu_seqlens.windows(2).position(|w| w[1] > w[0]).unwrap();
            non_finite("advantages (per sequence)", s)
        }
    );
    assert_eq!(err(&|p| p.hidden[p.h] = f32::NAN), non_finite("logits", 1));
    assert_eq!(err(&|p| p.weight[0] = f32::NAN), non_finite("logits", 0));
    // A target of probability 0 (a -inf bias).
    assert_eq!(
        err(&|p| {
            let y = p.targets[0] as usize;
            let mut b = p.bias.clone().unwrap_or(vec![0.0; p.v]);
            b[y] = f32::NEG_INFINITY;
            p.bias = Some(b);
        }),
        non_finite("logp", 0)
    );
    // A token loss that overflows: a huge advantage at the ratio's clamp.
    assert_eq!(
        err(&|p| {
            p.cfg.loss.eps_high = 1e30;
            p.old.as_mut().unwrap()[0] = -1e30;
            p.adv[0] = 3e38;
        }),
        non_finite("per_token", 0)
    );
    // k2 of a huge d.
    assert_eq!(
        err(&|p| {
            p.cfg.loss.kl = KlEstimator::K2;
            p.reference.as_mut().unwrap()[1] = 1e30;
        }),
        non_finite("kl", 1)
    );
    assert_eq!(
        PolicyLossStats::SUMMARY_LEN,
        base.run::<f32>().unwrap().summary.len()
    );
}
