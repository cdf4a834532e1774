//! CUDA clipped policy loss against the CPU op: fresh random inputs of
//! awkward sizes, every KL estimator, layout, aggregation and option, a
//! NaN-poisoned memory pool, and the status word for bad data.
#![cfg(feature = "cuda")]

use crate::common::gpu::{down, gpu, poison_pool, sanitizer, up};
use crate::common::{assert_close, Rng};
use cudarc::driver::CudaSlice;
use grpo_kernels::cuda::{self, Device, Gpu};
use grpo_kernels::{
    policy_loss, policy_loss_backward, Advantage, Aggregation, DeviceFault, Error, ImportanceLevel,
    KlEstimator, PolicyLossConfig, PolicyLossInputs, PolicyLossStats, PolicyObjective, SeqLayout,
};

const ESTIMATORS: [KlEstimator; 4] = [
    KlEstimator::K1,
    KlEstimator::K2,
    KlEstimator::K3,
    KlEstimator::LowVarK3,
];

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// One random policy-loss problem, on the host.
struct Problem {
    logp: Vec<f32>,
    old: Option<Vec<f32>>,
    reference: Option<Vec<f32>>,
    adv: Vec<f32>,
    per_token_adv: bool,
    mask: Option<Vec<u8>>,
    cu_seqlens: Option<Vec<u32>>,
    pg_weights: Option<Vec<f32>>,
    padded: (usize, usize),
    grad_per_token: Vec<f32>,
}

impl Problem {
    fn random(rng: &mut Rng, seqs: usize, max_len: usize, packed: bool) -> Self {
        let (cu, n, padded) = if packed {
            let mut cu = vec![0u32];
            for _ in 0..seqs {
                // Some sequences are empty.
                let len = if rng.below(6) == 0 {
                    0
                } else {
                    rng.below(max_len + 1)
                };
                cu.push(cu.last().unwrap() + len as u32);
            }
            let n = *cu.last().unwrap() as usize;
            (Some(cu), n.max(1), (0, 0))
        } else {
            let len = 1 + rng.below(max_len);
            (None, seqs * len, (seqs, len))
        };
        let cu = cu.map(|mut c| {
            // An all-empty packed batch still needs one token.
            if *c.last().unwrap() == 0 {
                *c.last_mut().unwrap() = 1;
            }
            c
        });
        let logp: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.5 - 2.0) as f32).collect();
        let jitter = |rng: &mut Rng, s: f64| {
            logp.iter()
                .map(|&l| l + (rng.normal() * s) as f32)
                .collect::<Vec<_>>()
        };
        let old = (rng.below(3) != 0).then(|| jitter(rng, 0.3));
        let reference = (rng.below(2) == 0).then(|| jitter(rng, 0.2));
        let per_token_adv = rng.below(3) == 0;
        let adv = (0..if per_token_adv { n } else { seqs })
            .map(|_| rng.normal() as f32)
            .collect();
        let mask = (rng.below(2) == 0).then(|| (0..n).map(|_| (rng.below(5) != 0) as u8).collect());
        let grad_per_token = (0..n).map(|_| rng.normal() as f32 * 0.1).collect();
        let pg_weights = (rng.below(2) == 0).then(|| (0..n).map(|_| rng.uniform() as f32 * 1.5).collect());
        Self {
            logp,
            old,
            reference,
            adv,
            per_token_adv,
            mask,
            cu_seqlens: cu,
            pg_weights,
            padded,
            grad_per_token,
        }
    }

    fn host(&self) -> PolicyLossInputs<'_> {
        PolicyLossInputs {
            logp: &self.logp,
            old_logp: self.old.as_deref(),
            ref_logp: self.reference.as_deref(),
            advantages: if self.per_token_adv {
                Advantage::PerToken(&self.adv[..])
            } else {
                Advantage::PerSequence(&self.adv[..])
            },
            mask: self.mask.as_deref(),
            layout: match &self.cu_seqlens {
                Some(cu) => SeqLayout::Packed { cu_seqlens: cu },
                None => SeqLayout::Padded {
                    batch: self.padded.0,
                    seq_len: self.padded.1,
                },
            },
            pg_weights: self.pg_weights.as_deref(),
        }
    }

    /// The fewest masked-in tokens of a non-empty sequence (1 when none).
    fn min_seq_tokens(&self) -> usize {
        let ranges: Vec<(usize, usize)> = match &self.cu_seqlens {
            Some(cu) => cu.windows(2).map(|w| (w[0] as usize, w[1] as usize)).collect(),
            None => (0..self.padded.0)
                .map(|s| (s * self.padded.1, (s + 1) * self.padded.1))
                .collect(),
        };
        let active = |t: usize| self.mask.as_ref().is_none_or(|m| m[t] != 0);
        ranges
            .iter()
            .map(|&(a, b)| (a..b).filter(|&t| active(t)).count())
            .filter(|&c| c > 0)
            .min()
            .unwrap_or(1)
    }
}

/// The problem's buffers on the device.
struct OnDevice {
    logp: CudaSlice<f32>,
    old: Option<CudaSlice<f32>>,
    reference: Option<CudaSlice<f32>>,
    adv: CudaSlice<f32>,
    mask: Option<CudaSlice<u8>>,
    cu: Option<CudaSlice<u32>>,
    pg_weights: Option<CudaSlice<f32>>,
}

impl OnDevice {
    fn new(gpu: &Gpu, p: &Problem) -> Self {
        Self {
            logp: up(gpu, &p.logp),
            old: p.old.as_ref().map(|v| up(gpu, v)),
            reference: p.reference.as_ref().map(|v| up(gpu, v)),
            adv: up(gpu, &p.adv),
            mask: p.mask.as_ref().map(|v| up(gpu, v)),
            cu: p.cu_seqlens.as_ref().map(|v| up(gpu, v)),
            pg_weights: p.pg_weights.as_ref().map(|v| up(gpu, v)),
        }
    }

    fn inputs<'a>(&'a self, p: &Problem) -> PolicyLossInputs<'a, Device> {
        PolicyLossInputs {
            logp: self.logp.as_view(),
            old_logp: self.old.as_ref().map(|v| v.as_view()),
            ref_logp: self.reference.as_ref().map(|v| v.as_view()),
            advantages: if p.per_token_adv {
                Advantage::PerToken(self.adv.as_view())
            } else {
                Advantage::PerSequence(self.adv.as_view())
            },
            mask: self.mask.as_ref().map(|v| v.as_view()),
            layout: match &self.cu {
                Some(cu) => SeqLayout::Packed {
                    cu_seqlens: cu.as_view(),
                },
                None => SeqLayout::Padded {
                    batch: p.padded.0,
                    seq_len: p.padded.1,
                },
            },
            pg_weights: self.pg_weights.as_ref().map(|v| v.as_view()),
        }
    }
}

fn random_config(rng: &mut Rng, has_ref: bool) -> PolicyLossConfig {
    let aggregation = match rng.below(5) {
        0 => Aggregation::TokenMean { normalizer: None },
        1 => Aggregation::TokenMean {
            normalizer: Some(4096.0),
        },
        2 => Aggregation::SeqMeanTokenMean,
        3 => Aggregation::SeqMeanTokenSum,
        _ => Aggregation::SeqMeanTokenSumNorm { constant: 333.0 },
    };
    let objective = match rng.below(6) {
        0 => PolicyObjective::Clip { delta: Some(1.5) },
        1 => PolicyObjective::Cispo {
            min_ratio: [0.0, 0.8][rng.below(2)],
            max_ratio: 1.3,
        },
        2 => PolicyObjective::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05,
        },
        3 => PolicyObjective::Vespo {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        },
        _ => PolicyObjective::Clip { delta: None },
    };
    let clip = matches!(objective, PolicyObjective::Clip { .. });
    let vespo = matches!(objective, PolicyObjective::Vespo { .. });
    PolicyLossConfig {
        objective,
        eps_low: [0.2, 0.1, 1.0][rng.below(3)],
        eps_high: [0.2, 0.28][rng.below(2)],
        dual_clip: (clip && rng.below(2) == 0).then_some(3.0),
        log_ratio_clamp: [20.0, 0.25, f32::INFINITY][rng.below(3)],
        importance: if !vespo && rng.below(3) == 0 {
            ImportanceLevel::Sequence
        } else {
            ImportanceLevel::Token
        },
        beta: if has_ref { 0.04 } else { 0.0 },
        kl: ESTIMATORS[rng.below(4)],
        kl_bias_correction: rng.below(2) == 0,
        aggregation,
        exclude_empty_seqs: rng.below(2) == 0,
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn policy_loss_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng::new(2);
    let runs = if sanitizer() { 8 } else { 120 };
    for run in 0..runs {
        let (seqs, max_len) = match run % 4 {
            0 => (1, 1),
            1 => (3 + rng.below(10), 40),
            2 => (64, 700),
            _ if sanitizer() => (16, 100),
            _ => (32, 2048),
        };
        let packed = rng.below(2) == 0;
        let p = Problem::random(&mut rng, seqs, max_len, packed);
        let cfg = random_config(&mut rng, p.reference.is_some());
        let what = format!("run {run}: {seqs} seqs, n={} {cfg:?}", p.logp.len());
        let host = p.host();
        let want = policy_loss(&host, &cfg).unwrap();
        let grad_loss = rng.normal() as f32;
        let want_d = policy_loss_backward(&host, &cfg, grad_loss, Some(&p.grad_per_token)).unwrap();

        let d = OnDevice::new(&gpu, &p);
        let dev = d.inputs(&p);
        poison_pool(&gpu, 4 * p.logp.len() + 64);
        let got = cuda::policy_loss(&gpu, &dev, &cfg).unwrap();
        let (g_loss, g_tok) = (up(&gpu, &[grad_loss]), up(&gpu, &p.grad_per_token));
        let got_d = cuda::policy_loss_backward(
            &gpu,
            &dev,
            &cfg,
            &got.summary.as_view(),
            &g_loss.as_view(),
            Some(&g_tok.as_view()),
        )
        .unwrap();
        gpu.check().unwrap();

        assert_close(
            &format!("per-token {what}"),
            &down(&gpu, &got.per_token),
            &widen(&want.per_token),
            2e-6,
            2e-5,
        );
        let (gs, ws) = (
            PolicyLossStats::from_summary(&down(&gpu, &got.summary)),
            want.stats(),
        );
        let field = |name: &str, g: f32, w: f32, tol: f64| {
            assert_close(&format!("{name} {what}"), &[g], &[w as f64], tol, tol);
        };
        field("loss", gs.loss, ws.loss, 2e-5);
        // A ratio within an ulp of a clip bound may fall either side (the
        // GPU's expf and the CPU's exp differ by an ulp): one token of slack.
        let one_token = 1.5 / ws.tokens.max(1.0) as f64;
        field("clip_frac_low", gs.clip_frac_low, ws.clip_frac_low, one_token);
        field("clip_frac_high", gs.clip_frac_high, ws.clip_frac_high, one_token);
        field("dual_clip_frac", gs.dual_clip_frac, ws.dual_clip_frac, one_token);
        field("ratio_mean", gs.ratio_mean, ws.ratio_mean, 1e-5);
        field("ratio_max", gs.ratio_max, ws.ratio_max, 1e-6);
        field("kl_mean", gs.kl_mean, ws.kl_mean, 1e-5);
        assert_eq!(gs.tokens, ws.tokens, "tokens {what}");
        // One flipped flag moves a sequence's fraction by 1 / L_s.
        let one_seq = 1.5 / p.min_seq_tokens() as f64;
        for (name, g, w) in [
            ("clip_frac_low_seq", gs.clip_frac_low_seq, ws.clip_frac_low_seq),
            ("clip_frac_high_seq", gs.clip_frac_high_seq, ws.clip_frac_high_seq),
            (
                "clip_frac_low_seq_min",
                gs.clip_frac_low_seq_min,
                ws.clip_frac_low_seq_min,
            ),
            (
                "clip_frac_high_seq_max",
                gs.clip_frac_high_seq_max,
                ws.clip_frac_high_seq_max,
            ),
        ] {
            field(name, g, w, one_seq);
        }
        let got_d = down(&gpu, &got_d);
        let off: Vec<usize> = (0..got_d.len())
            .filter(|&i| {
                let (g, w) = (got_d[i] as f64, want_d[i] as f64);
                // NaN counts as a difference.
                let close = (g - w).abs() <= 1e-7 + 2e-5 * w.abs();
                !close
            })
            .collect();
        assert!(
            off.len() <= 1,
            "dlogp {what}: {} tokens differ, first {:?}",
            off.len(),
            off.iter()
                .take(3)
                .map(|&i| (i, got_d[i], want_d[i]))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn policy_loss_reports_bad_offsets_and_non_finite_tokens() {
    let gpu = gpu();
    let cfg = PolicyLossConfig::default();
    let logp = vec![-1.0f32; 10];
    let adv = vec![1.0f32, -1.0];
    let (d_logp, d_adv) = (up(&gpu, &logp), up(&gpu, &adv));
    // Offsets that run past the tokens.
    let bad_cu = up(&gpu, &[0u32, 7, 12]);
    let inputs = PolicyLossInputs::<Device> {
        logp: d_logp.as_view(),
        old_logp: None,
        ref_logp: None,
        advantages: Advantage::PerSequence(d_adv.as_view()),
        mask: None,
        pg_weights: None,
        layout: SeqLayout::Packed {
            cu_seqlens: bad_cu.as_view(),
        },
    };
    cuda::policy_loss(&gpu, &inputs, &cfg).unwrap();
    let err = gpu.check().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Device {
                fault: DeviceFault::InvalidLayout,
                index: 1,
                op: "policy_loss"
            }
        ),
        "{err}"
    );
    // A NaN at a masked-in token is reported; one at a masked-out token is not read.
    let mut logp = logp;
    logp[2] = f32::NAN;
    logp[8] = f32::NAN;
    let mut mask = vec![1u8; 10];
    mask[2] = 0;
    let (d_logp, d_mask, cu) = (up(&gpu, &logp), up(&gpu, &mask), up(&gpu, &[0u32, 5, 10]));
    let inputs = PolicyLossInputs::<Device> {
        logp: d_logp.as_view(),
        old_logp: None,
        ref_logp: None,
        advantages: Advantage::PerSequence(d_adv.as_view()),
        mask: Some(d_mask.as_view()),
        pg_weights: None,
        layout: SeqLayout::Packed {
            cu_seqlens: cu.as_view(),
        },
    };
    cuda::policy_loss(&gpu, &inputs, &cfg).unwrap();
    let err = gpu.check().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Device {
                fault: DeviceFault::NonFinite,
                index: 8,
                op: "policy_loss"
            }
        ),
        "{err}"
    );
    gpu.check().expect("check clears the status");
}

/// The TRL 1.16 / verl fixtures on the GPU: loss, statistics and
/// `d loss / d logp` against the references' values.
#[test]
#[ignore = "needs a CUDA device"]
fn policy_loss_matches_trl_and_verl_fixtures() {
    use crate::common::policy_loss_fixture::{all_cases, FixtureCase};
    let gpu = gpu();
    for c in all_cases() {
        let (logp, old, adv, mask) = (
            up(&gpu, &c.logp),
            up(&gpu, &c.old_logp),
            up(&gpu, &c.advantages),
            up(&gpu, &c.mask),
        );
        let reference = c.ref_logp.as_ref().map(|r| up(&gpu, r));
        let weights = c.pg_weights.as_ref().map(|w| up(&gpu, w));
        let inputs = PolicyLossInputs::<Device> {
            logp: logp.as_view(),
            old_logp: Some(old.as_view()),
            ref_logp: reference.as_ref().map(|r| r.as_view()),
            advantages: if c.per_token_advantages {
                Advantage::PerToken(adv.as_view())
            } else {
                Advantage::PerSequence(adv.as_view())
            },
            mask: Some(mask.as_view()),
            pg_weights: weights.as_ref().map(|w| w.as_view()),
            layout: SeqLayout::Padded {
                batch: c.batch,
                seq_len: c.seq_len,
            },
        };
        let out = cuda::policy_loss(&gpu, &inputs, &c.cfg).unwrap();
        let g_loss = up(&gpu, &[1.0f32]);
        let dlogp = cuda::policy_loss_backward(
            &gpu,
            &inputs,
            &c.cfg,
            &out.summary.as_view(),
            &g_loss.as_view(),
            None,
        )
        .unwrap();
        gpu.check().unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let stats = PolicyLossStats::from_summary(&down(&gpu, &out.summary));
        assert_close(&format!("{} loss", c.name), &[stats.loss], &[c.loss], 1e-6, 2e-5);
        for (name, want) in &c.stats {
            let got = FixtureCase::stat(&stats, name);
            assert_close(&format!("{} {name}", c.name), &[got], &[*want], 1e-6, 2e-5);
        }
        assert_close(
            &format!("{} dlogp", c.name),
            &down(&gpu, &dlogp),
            &c.dlogp,
            1e-7,
            2e-5,
        );
    }
}
