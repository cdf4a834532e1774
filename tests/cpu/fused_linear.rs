//! Fused linear log-probs on the CPU: the forward against an f64 reference
//! (explicit matmul, then log-softmax) and against token_logprobs on
//! materialized logits; the backward against finite differences and against
//! the chain rule through token_logprobs_backward; independence from the
//! chunk sizes; masked rows; every bad input.

use crate::common::reference::logprob_rows;
use crate::common::{assert_close, finite_diff, widen, Rng};
use grpo_kernels::{
    fused_linear_logprobs, fused_linear_logprobs_backward, token_logprobs, token_logprobs_backward, DType,
    Error, Float, FusedLinearConfig, LinearGrads, LinearRows, LogProbConfig, LogProbGrads, LogProbSaved,
    LogProbs, LogitRows,
};
use half::{bf16, f16};
use proptest::prelude::*;

const IGNORE: i64 = -100;

/// One problem: sizes, options and chunking.
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    h: usize,
    v: usize,
    bias: bool,
    mask: bool,
    t: f32,
    chunk_rows: usize,
    chunk_vocab: usize,
    seed: u64,
}

impl Case {
    fn cfg(&self) -> FusedLinearConfig {
        FusedLinearConfig {
            logprob: LogProbConfig {
                temperature: self.t,
                entropy: true,
                ignore_index: Some(IGNORE),
            },
            chunk_rows: self.chunk_rows,
            chunk_vocab: self.chunk_vocab,
        }
    }
}

/// Random inputs of a case, stored as `T`. Skipped rows (mask 0, or the
/// ignored target) hold NaN hidden states: the op must never read them.
struct Inputs<T> {
    hidden: Vec<T>,
    weight: Vec<T>,
    bias: Option<Vec<T>>,
    targets: Vec<i64>,
    mask: Option<Vec<u8>>,
}

impl<T: Float> Inputs<T> {
    fn new(c: &Case) -> Self {
        let mut rng = Rng::new(c.seed);
        // Logits of spread about 2: softmaxes neither flat nor one-hot.
        let hidden: Vec<T> = rng.normals(c.n * c.h, 1.0);
        let weight = rng.normals(c.v * c.h, 2.0 / (c.h as f64).sqrt());
        let bias = c.bias.then(|| rng.normals(c.v, 1.0));
        let mut targets: Vec<i64> = (0..c.n).map(|_| rng.below(c.v) as i64).collect();
        let mask = c
            .mask
            .then(|| (0..c.n).map(|_| (rng.below(4) != 0) as u8).collect::<Vec<_>>());
        if c.mask && c.n > 2 {
            targets[1] = IGNORE;
        }
        let mut x = Self {
            hidden,
            weight,
            bias,
            targets,
            mask,
        };
        for i in 0..c.n {
            if !x.active(i) {
                x.hidden[i * c.h..(i + 1) * c.h].fill(T::from_f32(f32::NAN));
            }
        }
        x
    }

    fn active(&self, i: usize) -> bool {
        self.targets[i] != IGNORE && self.mask.as_ref().is_none_or(|m| m[i] != 0)
    }

    fn rows(&self, h: usize) -> LinearRows<'_, T, i64> {
        LinearRows {
            hidden: &self.hidden,
            weight: &self.weight,
            bias: self.bias.as_deref(),
            targets: &self.targets,
            mask: self.mask.as_deref(),
            hidden_size: h,
        }
    }
}

/// `h W^T + b` in f64, `[n, v]`.
fn logits_f64(hidden: &[f64], weight: &[f64], bias: Option<&[f64]>, h: usize) -> Vec<f64> {
    hidden
        .chunks(h)
        .flat_map(|x| {
            weight.chunks(h).enumerate().map(move |(j, w)| {
                let dot: f64 = x.iter().zip(w).map(|(a, b)| a * b).sum();
                dot + bias.map_or(0.0, |b| b[j])
            })
        })
        .collect()
}

/// `(logp, entropy, lse)` per row in f64; `None` for skipped rows.
fn reference<T: Float>(c: &Case, x: &Inputs<T>) -> Vec<Option<(f64, f64, f64)>> {
    let bias = x.bias.as_deref().map(widen);
    (0..c.n)
        .map(|i| {
            x.active(i).then(|| {
                let z = logits_f64(
                    &widen(&x.hidden[i * c.h..(i + 1) * c.h]),
                    &widen(&x.weight),
                    bias.as_deref(),
                    c.h,
                );
                logprob_rows(&z, &[x.targets[i] as usize], c.v, c.t as f64)[0]
            })
        })
        .collect()
}

/// Compares the forward's three outputs with a reference; skipped rows must be exactly 0.
#[track_caller]
fn assert_outputs(what: &str, out: &LogProbs, want: &[Option<(f64, f64, f64)>], tol: f64) {
    let col = |k: usize| -> Vec<f64> {
        want.iter()
            .map(|w| w.map_or(0.0, |w| [w.0, w.1, w.2][k]))
            .collect()
    };
    assert_close(&format!("logp {what}"), &out.logp, &col(0), tol, tol);
    assert_close(
        &format!("entropy {what}"),
        out.entropy.as_ref().unwrap(),
        &col(1),
        tol,
        tol,
    );
    assert_close(&format!("lse {what}"), &out.lse, &col(2), tol, tol);
}

fn check_forward<T: Float>(c: &Case) {
    let x = Inputs::<T>::new(c);
    let out = fused_linear_logprobs(&x.rows(c.h), &c.cfg()).unwrap();
    assert_outputs(&format!("{:?} {c:?}", T::DTYPE), &out, &reference(c, &x), 5e-6);
}

#[test]
fn forward_matches_f64_reference_on_awkward_sizes() {
    let mut seed = 0;
    for n in [1, 7, 130] {
        for h in [1, 3, 65] {
            for v in [1, 13, 1021] {
                // Chunks that divide neither n nor v, one column per tile,
                // and one tile for everything.
                for (chunk_rows, chunk_vocab) in [(3, 5), (64, 1), (1000, 4096), (2, 300)] {
                    seed += 1;
                    let c = Case {
                        n,
                        h,
                        v,
                        bias: seed % 2 == 0,
                        mask: seed % 3 == 0,
                        t: [1.0, 0.7, 1.6][seed as usize % 3],
                        chunk_rows,
                        chunk_vocab,
                        seed,
                    };
                    check_forward::<f32>(&c);
                    check_forward::<bf16>(&c);
                    check_forward::<f16>(&c);
                }
            }
        }
    }
}

#[test]
fn forward_at_qwen_vocab() {
    // Default chunks: many vocab tiles in many groups of tiles, the last
    // group partial and its last tile short (151936 = 593 * 256 + 128).
    let c = Case {
        n: 5,
        h: 64,
        v: 151_936,
        bias: false,
        mask: false,
        t: 1.0,
        chunk_rows: 512,
        chunk_vocab: 256,
        seed: 9,
    };
    assert_eq!(FusedLinearConfig::default().chunk_vocab, c.chunk_vocab);
    check_forward::<bf16>(&c);
    check_forward::<f32>(&Case {
        t: 0.6,
        bias: true,
        ..c
    });
}

/// f32 logits `h W^T + b`, materialized (rounded from f64).
fn materialize<T: Float>(c: &Case, x: &Inputs<T>) -> Vec<f32> {
    // Skipped rows are NaN in, NaN out: token_logprobs never reads them either.
    let bias = x.bias.as_deref().map(widen);
    logits_f64(&widen(&x.hidden), &widen(&x.weight), bias.as_deref(), c.h)
        .iter()
        .map(|&z| z as f32)
        .collect()
}

#[test]
fn forward_equals_token_logprobs_on_materialized_logits() {
    for (i, &(n, h, v)) in [(37, 50, 3001), (130, 65, 1021), (4, 200, 9000)]
        .iter()
        .enumerate()
    {
        let c = Case {
            n,
            h,
            v,
            bias: i != 1,
            mask: true,
            t: 0.8,
            chunk_rows: 16,
            chunk_vocab: 700,
            seed: 40 + i as u64,
        };
        let x = Inputs::<f32>::new(&c);
        let logits = materialize(&c, &x);
        let rows = LogitRows {
            logits: &logits[..],
            targets: &x.targets[..],
            mask: x.mask.as_deref(),
            vocab: v,
        };
        let want = token_logprobs(&rows, &c.cfg().logprob).unwrap();
        let got = fused_linear_logprobs(&x.rows(h), &c.cfg()).unwrap();
        // The two differ only by the f32 rounding of the logits themselves.
        let w = |xs: &[f32]| widen(xs);
        assert_close("logp", &got.logp, &w(&want.logp), 3e-6, 3e-6);
        assert_close("lse", &got.lse, &w(&want.lse), 3e-6, 3e-6);
        assert_close(
            "entropy",
            got.entropy.as_ref().unwrap(),
            &w(want.entropy.as_ref().unwrap()),
            3e-6,
            3e-6,
        );
    }
}

/// Random upstream gradients of (logp, entropy, lse), per row.
fn upstream(n: usize, seed: u64) -> [Vec<f32>; 3] {
    let mut rng = Rng::new(seed);
    let mut g = || (0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>();
    [g(), g(), g()]
}

fn backward<T: Float>(c: &Case, x: &Inputs<T>, g: &[Vec<f32>; 3]) -> LinearGrads<T> {
    let fwd = fused_linear_logprobs(&x.rows(c.h), &c.cfg()).unwrap();
    let grads = LogProbGrads {
        logp: &g[0][..],
        entropy: Some(&g[1][..]),
        lse: Some(&g[2][..]),
    };
    fused_linear_logprobs_backward(&x.rows(c.h), &c.cfg(), &fwd.saved(), &grads).unwrap()
}

/// Compares gradients stored as `T`. Errors are relative to the largest
/// wanted value: f32 GEMMs and sums err by a few ulps of their largest
/// terms. bf16/f16 add their rounding (unit roundoff `u`), once for dh and
/// once per row chunk for dW and db, each within `u` of a partial sum.
#[track_caller]
fn assert_grads<T: Float>(what: &str, c: &Case, got: &LinearGrads<T>, want: [&[f64]; 3], f32_tol: f64) {
    // At most this many row chunks (fewer when rows are skipped).
    let row_chunks = c.n.div_ceil(c.chunk_rows) as f64;
    let u = match T::DTYPE {
        DType::F32 => 0.0,
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
    };
    let bias = got.bias.as_deref().map(widen);
    let parts = [
        ("dh", Some(widen(&got.hidden)), want[0], 1.0),
        ("dW", Some(widen(&got.weight)), want[1], row_chunks),
        ("db", bias, want[2], row_chunks),
    ];
    for (name, got, want, roundings) in parts {
        let Some(got) = got else {
            assert!(!c.bias, "{what}: bias gradient missing");
            continue;
        };
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let got: Vec<f32> = got.iter().map(|&x| x as f32).collect();
        let atol = (f32_tol + roundings * u) * scale;
        assert_close(&format!("{name} {what}"), &got, want, atol, u + f32_tol);
    }
}

fn check_backward_fd<T: Float>(c: &Case) {
    let x = Inputs::<T>::new(c);
    let g = upstream(c.n, c.seed + 1000);
    let got = backward(c, &x, &g);

    // The scalar sum_i g_i logp_i + gh_i H_i + gl_i lse_i over active rows,
    // as a function of (h, W, b) flattened, in f64.
    let (nh, nw) = (c.n * c.h, c.v * c.h);
    let active: Vec<usize> = (0..c.n).filter(|&i| x.active(i)).collect();
    let targets: Vec<usize> = active.iter().map(|&i| x.targets[i] as usize).collect();
    let objective = |p: &[f64]| {
        let hidden: Vec<f64> = active
            .iter()
            .flat_map(|&i| p[i * c.h..(i + 1) * c.h].to_vec())
            .collect();
        let bias = c.bias.then(|| &p[nh + nw..]);
        let z = logits_f64(&hidden, &p[nh..nh + nw], bias, c.h);
        logprob_rows(&z, &targets, c.v, c.t as f64)
            .iter()
            .zip(&active)
            .map(|(o, &i)| g[0][i] as f64 * o.0 + g[1][i] as f64 * o.1 + g[2][i] as f64 * o.2)
            .sum()
    };
    let mut params = widen(&x.hidden);
    // Skipped rows' NaNs are not parameters of the objective: their gradient is 0.
    params.iter_mut().filter(|p| p.is_nan()).for_each(|p| *p = 0.0);
    params.extend(widen(&x.weight));
    params.extend(x.bias.as_deref().map(widen).unwrap_or_default());
    let fd = finite_diff(&params, 1e-5, objective);
    let what = format!("{:?} {c:?}", T::DTYPE);
    assert_grads(
        &what,
        c,
        &got,
        [&fd[..nh], &fd[nh..nh + nw], &fd[nh + nw..]],
        2e-6,
    );
}

#[test]
fn backward_matches_finite_differences() {
    let mut seed = 500;
    for n in [1, 3, 5] {
        for h in [1, 4] {
            for v in [1, 7, 13] {
                seed += 1;
                let c = Case {
                    n,
                    h,
                    v,
                    bias: seed % 2 == 0,
                    mask: n > 3,
                    t: if seed % 3 == 0 { 0.6 } else { 1.0 },
                    chunk_rows: 2,
                    chunk_vocab: 3,
                    seed,
                };
                check_backward_fd::<f32>(&c);
                check_backward_fd::<bf16>(&c);
                check_backward_fd::<f16>(&c);
            }
        }
    }
}

/// dh = dz W, dW = dz^T h, db = column sums of dz, in f64, with dz from
/// token_logprobs_backward on the materialized f32 logits.
fn chain_rule<T: Float>(c: &Case, x: &Inputs<T>, g: &[Vec<f32>; 3]) -> [Vec<f64>; 3] {
    let logits = materialize(c, x);
    let rows = LogitRows {
        logits: &logits[..],
        targets: &x.targets[..],
        mask: x.mask.as_deref(),
        vocab: c.v,
    };
    let cfg = c.cfg().logprob;
    let fwd = token_logprobs(&rows, &cfg).unwrap();
    let grads = LogProbGrads {
        logp: &g[0][..],
        entropy: Some(&g[1][..]),
        lse: Some(&g[2][..]),
    };
    let dz = widen(&token_logprobs_backward(&rows, &cfg, &fwd.saved(), &grads).unwrap());
    let (hidden, weight) = (widen(&x.hidden), widen(&x.weight));
    let mut dh = vec![0.0; c.n * c.h];
    let mut dw = vec![0.0; c.v * c.h];
    let mut db = vec![0.0; c.v];
    for i in (0..c.n).filter(|&i| x.active(i)) {
        for j in 0..c.v {
            let d = dz[i * c.v + j];
            db[j] += d;
            for k in 0..c.h {
                dh[i * c.h + k] += d * weight[j * c.h + k];
                dw[j * c.h + k] += d * hidden[i * c.h + k];
            }
        }
    }
    [dh, dw, db]
}

fn check_chain_rule<T: Float>(c: &Case) {
    let x = Inputs::<T>::new(c);
    let g = upstream(c.n, c.seed + 2000);
    let got = backward(c, &x, &g);
    let want = chain_rule(c, &x, &g);
    let what = format!("{:?} {c:?}", T::DTYPE);
    assert_grads(&what, c, &got, [&want[0], &want[1], &want[2]], 5e-6);
}

#[test]
fn backward_matches_chain_rule_through_token_logprobs_backward() {
    for (i, &(n, h, v, chunk_rows, chunk_vocab)) in [
        (130, 65, 1021, 48, 300),
        (37, 33, 4099, 512, 2048),
        (200, 16, 513, 7, 64),
    ]
    .iter()
    .enumerate()
    {
        let c = Case {
            n,
            h,
            v,
            bias: i != 1,
            mask: i != 2,
            t: [0.8, 1.0, 1.7][i],
            chunk_rows,
            chunk_vocab,
            seed: 60 + i as u64,
        };
        check_chain_rule::<f32>(&c);
        check_chain_rule::<bf16>(&c);
        check_chain_rule::<f16>(&c);
    }
}

#[test]
fn masked_and_ignored_rows_are_zero_and_cost_nothing() {
    // The same active rows with and without skipped rows around them give
    // the same bits: row chunks are made of active rows only.
    let c = Case {
        n: 40,
        h: 9,
        v: 101,
        bias: true,
        mask: true,
        t: 1.3,
        chunk_rows: 6,
        chunk_vocab: 17,
        seed: 77,
    };
    let x = Inputs::<f32>::new(&c);
    let g = upstream(c.n, 78);
    let fwd = fused_linear_logprobs(&x.rows(c.h), &c.cfg()).unwrap();
    let grads = backward(&c, &x, &g);

    let active: Vec<usize> = (0..c.n).filter(|&i| x.active(i)).collect();
    assert!(
        active.len() < c.n - 5 && active.len() > c.n / 2,
        "{} active rows",
        active.len()
    );
    let dense = Inputs::<f32> {
        hidden: active
            .iter()
            .flat_map(|&i| x.hidden[i * c.h..(i + 1) * c.h].to_vec())
            .collect(),
        weight: x.weight.clone(),
        bias: x.bias.clone(),
        targets: active.iter().map(|&i| x.targets[i]).collect(),
        mask: None,
    };
    let dc = Case { n: active.len(), ..c };
    let dense_g = g
        .clone()
        .map(|gk| active.iter().map(|&i| gk[i]).collect::<Vec<_>>());
    let dense_fwd = fused_linear_logprobs(&dense.rows(c.h), &dc.cfg()).unwrap();
    let dense_grads = backward(&dc, &dense, &dense_g);

    for i in 0..c.n {
        let row = &grads.hidden[i * c.h..(i + 1) * c.h];
        match active.iter().position(|&a| a == i) {
            Some(k) => {
                assert_eq!(fwd.logp[i], dense_fwd.logp[k]);
                assert_eq!(fwd.lse[i], dense_fwd.lse[k]);
                assert_eq!(row, &dense_grads.hidden[k * c.h..(k + 1) * c.h]);
            }
            None => {
                assert_eq!((fwd.logp[i], fwd.lse[i]), (0.0, 0.0));
                assert_eq!(fwd.entropy.as_ref().unwrap()[i], 0.0);
                assert!(row.iter().all(|&d| d == 0.0));
            }
        }
    }
    assert_eq!(grads.weight, dense_grads.weight);
    assert_eq!(grads.bias, dense_grads.bias);
}

#[test]
fn results_are_deterministic() {
    let c = Case {
        n: 300,
        h: 70,
        v: 5000,
        bias: true,
        mask: false,
        t: 1.0,
        chunk_rows: 128,
        chunk_vocab: 1024,
        seed: 88,
    };
    let x = Inputs::<bf16>::new(&c);
    let g = upstream(c.n, 89);
    let first = backward(&c, &x, &g);
    for _ in 0..3 {
        let again = backward(&c, &x, &g);
        assert_eq!(again.hidden, first.hidden);
        assert_eq!(again.weight, first.weight);
        assert_eq!(again.bias, first.bias);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Chunking changes the order of the sums, not their value.
    #[test]
    fn results_do_not_depend_on_chunk_sizes(
        n in 1usize..40, h in 1usize..24, v in 1usize..300,
        chunk_rows in 1usize..50, chunk_vocab in 1usize..400,
        bias: bool, mask: bool, seed: u64,
    ) {
        let c = Case { n, h, v, bias, mask, t: 0.9, chunk_rows, chunk_vocab, seed };
        let whole = Case { chunk_rows: n, chunk_vocab: v, ..c };
        let x = Inputs::<f32>::new(&c);
        let g = upstream(n, seed ^ 1);
        let want = fused_linear_logprobs(&x.rows(h), &whole.cfg()).unwrap();
        let got = fused_linear_logprobs(&x.rows(h), &c.cfg()).unwrap();
        let want_rows: Vec<_> = (0..n)
            .map(|i| Some((want.logp[i] as f64, want.entropy.as_ref().unwrap()[i] as f64, want.lse[i] as f64)))
            .collect();
        assert_outputs("chunked vs whole", &got, &want_rows, 2e-6);
        let want = backward(&whole, &x, &g);
        let flat = |d: &LinearGrads<f32>| [widen(&d.hidden), widen(&d.weight), widen(d.bias.as_deref().unwrap_or(&[]))];
        let w = flat(&want);
        assert_grads("chunked vs whole", &c, &backward(&c, &x, &g), [&w[0], &w[1], &w[2]], 2e-6);
    }
}

#[test]
fn negative_infinite_bias_bans_a_token() {
    // -inf logits mean probability 0, as in token_logprobs; a banned
    // target has no finite log-prob, which is an error.
    let c = Case {
        n: 3,
        h: 4,
        v: 6,
        bias: true,
        mask: false,
        t: 1.0,
        chunk_rows: 2,
        chunk_vocab: 4,
        seed: 3,
    };
    let mut x = Inputs::<f32>::new(&c);
    x.bias.as_mut().unwrap()[5] = f32::NEG_INFINITY;
    x.targets = vec![0, 5, 1];
    assert_eq!(
        fused_linear_logprobs(&x.rows(c.h), &c.cfg()).unwrap_err(),
        Error::NonFinite {
            op: "fused_linear_logprobs",
            what: "logp",
            index: 1
        }
    );
    x.targets = vec![2, 0, 1];
    let out = fused_linear_logprobs(&x.rows(c.h), &c.cfg()).unwrap();
    assert!(out.logp.iter().chain(&out.lse).all(|l| l.is_finite()));
    let want = reference(&c, &x);
    assert_close(
        "lse",
        &out.lse,
        &want.iter().map(|w| w.unwrap().2).collect::<Vec<_>>(),
        2e-5,
        2e-5,
    );
    let grads = backward(&c, &x, &upstream(c.n, 4));
    assert_eq!(grads.bias.as_ref().unwrap()[5], 0.0);
    assert!(grads.hidden.iter().chain(&grads.weight).all(|d| d.is_finite()));
}

#[test]
fn non_finite_values_reaching_logits_are_errors() {
    let c = Case {
        n: 4,
        h: 3,
        v: 10,
        bias: true,
        mask: false,
        t: 1.0,
        chunk_rows: 3,
        chunk_vocab: 4,
        seed: 5,
    };
    let fwd_err = |x: &Inputs<f32>| fused_linear_logprobs(&x.rows(c.h), &c.cfg()).unwrap_err();
    let non_finite = |index| Error::NonFinite {
        op: "fused_linear_logprobs",
        what: "logits",
        index,
    };
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = Inputs::<f32>::new(&c);
        x.hidden[2 * c.h + 1] = bad;
        assert_eq!(fwd_err(&x), non_finite(2), "hidden {bad}");
    }
    // A NaN weight spoils every row: the first active one is named.
    let mut x = Inputs::<f32>::new(&c);
    x.mask = Some(vec![0, 1, 1, 1]);
    x.weight[7 * c.h] = f32::NAN;
    assert_eq!(fwd_err(&x), non_finite(1));
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = Inputs::<f32>::new(&c);
        x.bias.as_mut().unwrap()[9] = bad;
        assert_eq!(fwd_err(&x), non_finite(0), "bias {bad}");
    }
    // Finite inputs whose logits overflow f32.
    let mut x = Inputs::<f32>::new(&c);
    x.hidden[c.h..2 * c.h].fill(1e30);
    x.weight[..c.h].fill(1e30);
    assert_eq!(fwd_err(&x), non_finite(1));
}

#[test]
fn bad_inputs_are_typed_errors() {
    const OP: &str = "fused_linear_logprobs";
    const OP_BWD: &str = "fused_linear_logprobs_backward";
    let (h, v) = (3, 4);
    let hidden = [0.5f32; 6];
    let weight = [0.25f32; 12];
    let targets = [0i64, 3];
    let cfg = FusedLinearConfig {
        logprob: LogProbConfig {
            entropy: false,
            ..LogProbConfig::default()
        },
        ..FusedLinearConfig::default()
    };
    let ok = LinearRows::new(&hidden[..], &weight[..], &targets[..], h);
    let err = |rows: LinearRows<'_, f32, i64>, cfg: FusedLinearConfig| {
        fused_linear_logprobs(&rows, &cfg).unwrap_err()
    };

    assert_eq!(
        err(LinearRows::new(&[], &weight, &[], h), cfg),
        Error::Empty {
            op: OP,
            what: "targets"
        }
    );
    assert_eq!(
        err(LinearRows::new(&hidden, &weight, &targets, 0), cfg),
        Error::Empty {
            op: OP,
            what: "hidden_size"
        }
    );
    assert_eq!(
        err(LinearRows::new(&hidden[..5], &weight, &targets, h), cfg),
        Error::ShapeMismatch {
            op: OP,
            what: "hidden",
            expected: 6,
            got: 5
        }
    );
    assert_eq!(
        err(LinearRows::new(&hidden, &[], &targets, h), cfg),
        Error::Empty {
            op: OP,
            what: "weight"
        }
    );
    assert!(matches!(
        err(LinearRows::new(&hidden, &weight[..11], &targets, h), cfg),
        Error::InvalidLayout { op: OP, .. }
    ));
    assert_eq!(
        err(
            LinearRows::new(&hidden, &weight, &targets, h).with_bias(&[0.0; 3]),
            cfg
        ),
        Error::ShapeMismatch {
            op: OP,
            what: "bias",
            expected: v,
            got: 3
        }
    );
    assert_eq!(
        err(
            LinearRows::new(&hidden, &weight, &targets, h).with_mask(&[1]),
            cfg
        ),
        Error::ShapeMismatch {
            op: OP,
            what: "mask",
            expected: 2,
            got: 1
        }
    );
    for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let bad = FusedLinearConfig {
            logprob: LogProbConfig {
                temperature: t,
                ..cfg.logprob
            },
            ..cfg
        };
        assert!(matches!(
            err(LinearRows::new(&hidden, &weight, &targets, h), bad),
            Error::InvalidParameter {
                op: OP,
                name: "temperature",
                ..
            }
        ));
    }
    for (bad, name) in [
        (FusedLinearConfig { chunk_rows: 0, ..cfg }, "chunk_rows"),
        (
            FusedLinearConfig {
                chunk_vocab: 0,
                ..cfg
            },
            "chunk_vocab",
        ),
    ] {
        assert!(matches!(
            err(LinearRows::new(&hidden, &weight, &targets, h), bad),
            Error::InvalidParameter { op: OP, name: n, .. } if n == name
        ));
    }
    for (token, index) in [(4i64, 1), (-1, 0)] {
        let mut t = targets;
        t[index] = token;
        assert_eq!(
            err(LinearRows::new(&hidden, &weight, &t, h), cfg),
            Error::TokenOutOfRange {
                op: OP,
                index,
                token,
                vocab: v
            }
        );
    }
    // Out-of-range targets of skipped rows are never looked at.
    let skipped = [0i64, 99];
    assert!(fused_linear_logprobs(
        &LinearRows::new(&hidden, &weight, &skipped, h).with_mask(&[1, 0]),
        &cfg
    )
    .is_ok());

    // Backward: the forward's checks under the backward's name, then the gradients'.
    let fwd = fused_linear_logprobs(&ok, &cfg).unwrap();
    let g = [1.0f32; 2];
    fn grads<'a>(logp: &'a [f32], entropy: Option<&'a [f32]>) -> LogProbGrads<'a> {
        LogProbGrads {
            logp,
            entropy,
            lse: None,
        }
    }
    let bwd_err = |rows: &LinearRows<'_, f32, i64>, lse: &[f32], grads: LogProbGrads<'_>| {
        let saved = LogProbSaved { lse, entropy: None };
        fused_linear_logprobs_backward(rows, &cfg, &saved, &grads).unwrap_err()
    };
    assert_eq!(
        bwd_err(
            &LinearRows::new(&hidden[..5], &weight, &targets, h),
            &fwd.lse,
            grads(&g, None)
        ),
        Error::ShapeMismatch {
            op: OP_BWD,
            what: "hidden",
            expected: 6,
            got: 5
        }
    );
    assert!(matches!(
        bwd_err(&ok, &fwd.lse, grads(&g[..1], None)),
        Error::ShapeMismatch {
            op: OP_BWD,
            what: "grad_logp",
            ..
        }
    ));
    assert!(matches!(
        bwd_err(&ok, &fwd.lse[..1], grads(&g, None)),
        Error::ShapeMismatch {
            op: OP_BWD,
            what: "lse",
            ..
        }
    ));
    assert!(matches!(
        bwd_err(&ok, &fwd.lse, grads(&g, Some(&g))),
        Error::Unsupported { op: OP_BWD, .. }
    ));
    assert_eq!(
        bwd_err(&ok, &[0.0, f32::NAN], grads(&g, None)),
        Error::NonFinite {
            op: OP_BWD,
            what: "lse",
            index: 1
        }
    );
}
