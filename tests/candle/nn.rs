//! `grpo_kernels::candle::nn`: softmax, RMS norm, LayerNorm and quick GELU
//! on their fused CPU path (f32) and their composed one (F64, BF16), RoPE
//! and its tables, and candle's own erf GELU, against f64 references and
//! central finite differences through candle's autograd; and the typed
//! error for each bad parameter or shape.

use crate::common::tensors::{f64s, to32, to64, var, CPU};
use crate::common::{assert_close, assert_close_rows, assert_typed_error, finite_diff, Rng};
use candle_core::{DType, Device, Module, Tensor, Var};
use grpo_kernels::candle::nn::{
    quick_gelu, rms_normalize, rope, rope_tables, softmax_last_dim, LayerNorm, RmsNorm,
};

#[test]
fn nn_norms_reject_bad_eps_weights_and_dtypes_with_typed_errors() {
    use candle_core::Module;
    use grpo_kernels::candle::nn::{layer_normalize, rms_normalize, LayerNorm, RmsNorm};
    use grpo_kernels::Error;
    let dev = Device::Cpu;
    let x = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
    let (w, b) = (
        Tensor::ones(4, DType::F32, &dev).unwrap(),
        Tensor::zeros(4, DType::F32, &dev).unwrap(),
    );
    let bad_eps = |op, value| Error::InvalidParameter {
        op,
        name: "eps",
        value,
        expected: "finite and >= 0",
    };
    // Both paths: fused (F32) and composed (F64).
    for x in [x.clone(), x.to_dtype(DType::F64).unwrap()] {
        for eps in [-1e-6, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_typed_error(rms_normalize(&x, eps), bad_eps("rms_normalize", eps));
            assert_typed_error(layer_normalize(&x, eps), bad_eps("layer_normalize", eps));
        }
        assert!(rms_normalize(&x, 0.0).is_ok() && layer_normalize(&x, 0.0).is_ok());
    }
    let norm = LayerNorm::new(w.clone(), Some(b.clone()), -1.0);
    assert_typed_error(norm.forward(&x), bad_eps("layer_normalize", -1.0));
    assert_typed_error(
        RmsNorm::new(w.clone(), f64::NAN).forward(&x),
        bad_eps("rms_normalize", f64::NAN),
    );

    // A weight or bias must hold one value per column: a [1] tensor would
    // broadcast silently, a [2, 4] one stack the rows.
    let shape = |op, what, got| Error::ShapeMismatch {
        op,
        what,
        expected: 4,
        got,
    };
    let one = Tensor::ones(1, DType::F32, &dev).unwrap();
    let two_rows = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
    let ln = |w: &Tensor, b: Option<&Tensor>| LayerNorm::new(w.clone(), b.cloned(), 1e-6).forward(&x);
    assert_typed_error(ln(&one, Some(&b)), shape("layer_norm", "weight", 1));
    assert_typed_error(ln(&w, Some(&two_rows)), shape("layer_norm", "bias", 8));
    assert_typed_error(
        RmsNorm::new(two_rows.clone(), 1e-6).forward(&x),
        shape("rms_norm", "weight", 8),
    );
    // [4, 1] is still one value per column.
    let column = w.reshape((4, 1)).unwrap();
    assert_eq!(
        to32(&ln(&column, Some(&b)).unwrap()),
        to32(&ln(&w, Some(&b)).unwrap())
    );

    // Integer input would round the normalized values back to integers.
    let ids = Tensor::ones((2, 4), DType::U32, &dev).unwrap();
    for (op, r) in [
        ("rms_normalize", rms_normalize(&ids, 1e-6)),
        ("layer_normalize", layer_normalize(&ids, 1e-6)),
    ] {
        let reason = "`x` must be F32, F64, BF16 or F16, got U32".to_string();
        assert_typed_error(r, Error::Unsupported { op, reason });
    }
}

#[test]
fn rope_rejects_odd_dims_and_tables_of_the_wrong_width() {
    use grpo_kernels::candle::nn::{rope, rope_tables};
    use grpo_kernels::Error;
    let dev = Device::Cpu;
    let (cos, sin) = rope_tables(3, 6, 10_000.0, &dev).unwrap();
    let x = Tensor::ones((1, 2, 3, 6), DType::F32, &dev).unwrap();
    assert!(rope(&x, &cos, &sin).is_ok());
    // An odd dimension: the last column has no partner.
    let odd = Tensor::ones((1, 2, 3, 7), DType::F32, &dev).unwrap();
    assert_typed_error(
        rope(&odd, &cos, &sin),
        Error::InvalidParameter {
            op: "rope",
            name: "dim",
            value: 7.0,
            expected: "even (x's last dimension)",
        },
    );
    // Tables as wide as x (transformers' `cat(freqs, freqs)` layout) or too narrow.
    let wide = Tensor::cat(&[&cos, &cos], 1).unwrap();
    let mismatch = |what, got| Error::ShapeMismatch {
        op: "rope",
        what,
        expected: 3,
        got,
    };
    assert_typed_error(rope(&x, &wide, &sin), mismatch("cos's last dimension", 6));
    assert_typed_error(
        rope(&x, &cos, &sin.narrow(1, 0, 2).unwrap()),
        mismatch("sin's last dimension", 2),
    );
}

#[test]
fn rope_tables_reject_bad_theta_odd_dims_and_unrepresentable_lengths() {
    use grpo_kernels::candle::nn::rope_tables;
    use grpo_kernels::Error;
    let dev = Device::Cpu;
    let bad = |name, value, expected| Error::InvalidParameter {
        op: "rope_tables",
        name,
        value,
        expected,
    };
    for theta in [0.0, -10.0, f64::NAN, f64::INFINITY] {
        assert_typed_error(
            rope_tables(4, 8, theta, &dev),
            bad("theta", theta, "finite and > 0"),
        );
    }
    assert_typed_error(rope_tables(4, 7, 1e4, &dev), bad("dim", 7.0, "even"));
    // Positions are u32 ids: one more would have wrapped to a shorter table.
    let seq = u32::MAX as usize + 1;
    assert_typed_error(
        rope_tables(seq, 8, 1e4, &dev),
        bad("seq", seq as f64, "at most u32::MAX"),
    );
}

/// Rows of `d` values each; `f` maps one f64 row to its output row.
fn rowwise(x: &[f64], d: usize, f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    x.chunks(d).flat_map(f).collect()
}

fn softmax_ref(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
    row.iter().map(|v| (v - max).exp() / sum).collect()
}

fn rms_ref(row: &[f64], eps: f64) -> Vec<f64> {
    let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt();
    row.iter().map(|v| v * r).collect()
}

#[test]
fn fused_softmax_and_rms_norm_match_f64_references_and_finite_differences() {
    let mut rng = Rng::new(23);
    // 1 and 7 columns; 3 x 5 x 37 takes the parallel path (> 2^14 elements
    // needs more rows: 130 x 131 does).
    for (rows, d) in [(1usize, 1usize), (4, 7), (15, 37), (130, 131)] {
        let n = rows * d;
        let x: Vec<f32> = (0..n).map(|_| (3.0 * rng.normal()) as f32).collect();
        let w: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let scale: Vec<f32> = (0..d).map(|_| rng.range(0.5, 1.5) as f32).collect();
        let x64 = f64s(&x);
        let wt = Tensor::from_vec(w.clone(), (rows, d), &CPU).unwrap();
        let eps = 1e-6;

        // Softmax: values and the gradient of sum(w * softmax(x)).
        let xv = var(&x, &[rows, d]);
        let y = softmax_last_dim(&xv).unwrap();
        assert_close("softmax", &to32(&y), &rowwise(&x64, d, softmax_ref), 1e-6, 1e-5);
        let grads = y.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
        let objective = |x: &[f64]| -> f64 {
            let y = rowwise(x, d, softmax_ref);
            y.iter().zip(&w).map(|(a, &b)| a * b as f64).sum()
        };
        if n <= 300 {
            let want = finite_diff(&x64, 1e-6, objective);
            assert_close("dsoftmax", &to32(grads.get(&xv).unwrap()), &want, 1e-5, 1e-4);
        }

        // RMS norm with a scale: values and gradients in x and the scale.
        let xv = var(&x, &[rows, d]);
        let sv = var(&scale, &[d]);
        let norm = RmsNorm::new(sv.as_tensor().clone(), eps);
        let y = candle_core::Module::forward(&norm, &xv).unwrap();
        let s64 = f64s(&scale);
        let reference = |x: &[f64], s: &[f64]| -> Vec<f64> {
            let mut y = rowwise(x, d, |r| rms_ref(r, eps));
            y.iter_mut().enumerate().for_each(|(i, v)| *v *= s[i % d]);
            y
        };
        assert_close("rms_norm", &to32(&y), &reference(&x64, &s64), 1e-6, 1e-5);
        let grads = y.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
        if n <= 300 {
            let dot = |y: Vec<f64>| -> f64 { y.iter().zip(&w).map(|(a, &b)| a * b as f64).sum() };
            let want_x = finite_diff(&x64, 1e-6, |x| dot(reference(x, &s64)));
            let want_s = finite_diff(&s64, 1e-6, |s| dot(reference(&x64, s)));
            assert_close("drms/dx", &to32(grads.get(&xv).unwrap()), &want_x, 1e-5, 1e-4);
            assert_close("drms/dscale", &to32(grads.get(&sv).unwrap()), &want_s, 1e-5, 1e-4);
        }

        // The fused path (f32) and the composed one (f64) agree, gradients too.
        let x64t = Tensor::from_vec(x64.clone(), (rows, d), &CPU).unwrap();
        let xv64 = Var::from_tensor(&x64t).unwrap();
        let w64 = wt.to_dtype(DType::F64).unwrap();
        for (name, fused, composed) in [
            (
                "softmax",
                softmax_last_dim(&xv).unwrap(),
                softmax_last_dim(&xv64).unwrap(),
            ),
            (
                "rms_normalize",
                rms_normalize(&xv, eps).unwrap(),
                rms_normalize(&xv64, eps).unwrap(),
            ),
        ] {
            let g32 = fused.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
            let g64 = composed.mul(&w64).unwrap().sum_all().unwrap().backward().unwrap();
            let want: Vec<f64> = g64.get(&xv64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_close(
                &format!("{name} fused vs composed"),
                &to32(g32.get(&xv).unwrap()),
                &want,
                1e-5,
                1e-4,
            );
        }
    }
}

/// torch's `layer_norm` of one row: biased variance about the mean.
fn layer_ref(row: &[f64], eps: f64) -> Vec<f64> {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    row.iter().map(|v| (v - mean) / (var + eps).sqrt()).collect()
}

/// `layer_ref(x) * weight + bias` over rows of `weight.len()` values.
fn layer_norm_ref(x: &[f64], weight: &[f64], bias: Option<&[f64]>, eps: f64) -> Vec<f64> {
    let d = weight.len();
    let mut y = rowwise(x, d, |r| layer_ref(r, eps));
    for (i, v) in y.iter_mut().enumerate() {
        *v = *v * weight[i % d] + bias.map_or(0.0, |b| b[i % d]);
    }
    y
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// How closely a path must match the reference, as `(row_atol, rtol)` of
/// [`assert_close_rows`]: the error may scale with the row's largest value.
struct Tol {
    values: (f64, f64),
    grads: (f64, f64),
}

/// A `rows x d` tensor of `dtype` holding `offset + scale N(0, 1)`, and its
/// values as rounded to `dtype`.
fn draw(rng: &mut Rng, dtype: DType, (rows, d): (usize, usize), offset: f64, scale: f64) -> (Var, Vec<f64>) {
    let v: Vec<f64> = (0..rows * d).map(|_| offset + scale * rng.normal()).collect();
    let t = Tensor::from_vec(v, (rows, d), &CPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (Var::from_tensor(&t).unwrap(), to64(&t))
}

/// LayerNorm (the `Module`, with or without a bias) on `rows x d` inputs
/// `offset + 3 N(0, 1)` of `dtype`: its values against [`layer_norm_ref`]
/// and its gradients in x, weight and bias (of `sum(w * y)`, random `w`)
/// against central finite differences of it. LayerNorm is invariant to the
/// offset, so the reference sees the inputs less it (exactly, in f64): the
/// op must not lose the small differences under a large common value.
fn check_layer_norm(
    rng: &mut Rng,
    dtype: DType,
    (rows, d): (usize, usize),
    offset: f64,
    bias: bool,
    tol: &Tol,
) {
    let eps = 1e-6;
    let what = |name: &str| format!("layer_norm {name} {dtype:?} {rows}x{d} offset {offset} bias {bias}");
    let (xv, x64) = draw(rng, dtype, (rows, d), offset, 3.0);
    let x64: Vec<f64> = x64.iter().map(|x| x - offset).collect();
    let (wv, w64) = draw(rng, dtype, (1, d), 1.0, 0.3);
    let (bv, b64) = draw(rng, dtype, (1, d), 0.0, 1.0);
    let (up, up64) = draw(rng, dtype, (rows, d), 0.0, 1.0);
    let (wt, bt) = (wv.flatten_all().unwrap(), bv.flatten_all().unwrap());
    let norm = LayerNorm::new(wt, bias.then_some(bt), eps);
    let y = norm.forward(&xv).unwrap();
    assert_eq!(y.dtype(), dtype);
    let b64 = bias.then_some(b64.as_slice());
    let (va, vr) = tol.values;
    let want = layer_norm_ref(&x64, &w64, b64, eps);
    assert_close_rows(&what("values"), &to64(&y), &want, d, va, |_| 0.0, vr);

    let grads = (&y * up.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // Rounding in the sum over d outputs costs ~1e-16 d / h, truncation
    // ~h^2 (more for short rows of small variance): 1e-5 keeps both near
    // 1e-8, below the F64 tolerance.
    let h = 1e-5;
    let want_x: Vec<f64> = x64
        .chunks(d)
        .zip(up64.chunks(d))
        .flat_map(|(row, u)| finite_diff(row, h, |r| dot(&layer_norm_ref(r, &w64, b64, eps), u)))
        .collect();
    let want_w = finite_diff(&w64, h, |w| dot(&layer_norm_ref(&x64, w, b64, eps), &up64));
    let (ga, gr) = tol.grads;
    let got = |v: &Var| to64(grads.get(v).unwrap());
    assert_close_rows(&what("dx"), &got(&xv), &want_x, d, ga, |_| 0.0, gr);
    assert_close_rows(&what("dweight"), &got(&wv), &want_w, d, ga, |_| 0.0, gr);
    if let Some(b) = b64 {
        let want_b = finite_diff(b, h, |b| dot(&layer_norm_ref(&x64, &w64, Some(b), eps), &up64));
        assert_close_rows(&what("dbias"), &got(&bv), &want_b, d, ga, |_| 0.0, gr);
    }
}

/// Row lengths 1 (variance 0: the output is the bias, the gradient in x
/// 0), 3, 37 and 1283; 13 x 1283 rows exceed 2^14 elements, the fused op's
/// parallel path.
const NORM_SHAPES: [(usize, usize); 5] = [(7, 1), (7, 3), (7, 37), (7, 1283), (13, 1283)];

#[test]
fn layer_norm_fused_f32_matches_f64_reference_and_finite_differences() {
    let mut rng = Rng::new(41);
    let tol = Tol {
        values: (1e-6, 1e-6),
        grads: (1e-5, 1e-5),
    };
    for shape in NORM_SHAPES {
        for bias in [true, false] {
            check_layer_norm(&mut rng, DType::F32, shape, 0.0, bias, &tol);
        }
    }
}

#[test]
fn layer_norm_composed_f64_and_bf16_match_f64_reference_and_finite_differences() {
    let mut rng = Rng::new(42);
    // F64 is computed in F64: the formula itself, to rounding.
    let tight = Tol {
        values: (1e-13, 1e-13),
        grads: (1e-7, 1e-7),
    };
    for shape in NORM_SHAPES {
        for bias in [true, false] {
            check_layer_norm(&mut rng, DType::F64, shape, 0.0, bias, &tight);
        }
    }
    // BF16 in, f32 inside, BF16 out: a few of BF16's 2^-8 steps.
    let bf16 = Tol {
        values: (2e-2, 0.0),
        grads: (5e-2, 0.0),
    };
    for shape in [(7, 3), (7, 37), (7, 1283)] {
        check_layer_norm(&mut rng, DType::BF16, shape, 0.0, true, &bf16);
    }
}

#[test]
fn layer_norm_of_rows_far_from_zero_keeps_their_differences() {
    // 1e4 + 3 N(0, 1): in f32, E[x^2] - E[x]^2 would cancel to noise.
    let mut rng = Rng::new(43);
    let (f32_tol, f64_tol) = (
        Tol {
            values: (1e-6, 1e-6),
            grads: (1e-5, 1e-5),
        },
        Tol {
            values: (1e-12, 1e-12),
            grads: (1e-7, 1e-7),
        },
    );
    for shape in [(7, 3), (7, 1283), (13, 1283)] {
        check_layer_norm(&mut rng, DType::F32, shape, 1e4, true, &f32_tol);
        check_layer_norm(&mut rng, DType::F64, shape, 1e4, true, &f64_tol);
    }
}

fn quick_gelu_ref(x: f64) -> f64 {
    x / (1.0 + (-1.702 * x).exp())
}

/// quick GELU on `n` values of `dtype` (`3 N(0, 1)`, and -100, -20, 20,
/// 100 where they fit, where the sigmoid saturates): values against
/// [`quick_gelu_ref`], the gradient of `sum(w * y)` against central finite
/// differences of it, elementwise within `atol + rtol |want|`.
fn check_quick_gelu(
    rng: &mut Rng,
    dtype: DType,
    n: usize,
    (atol, rtol): (f64, f64),
    (gatol, grtol): (f64, f64),
) {
    let what = |name: &str| format!("quick_gelu {name} {dtype:?} n = {n}");
    let mut x: Vec<f64> = (0..n).map(|_| 3.0 * rng.normal()).collect();
    let tails = [-100.0, -20.0, 20.0, 100.0];
    if n >= 4 {
        x[..4].copy_from_slice(&tails);
    }
    let t = |v: Vec<f64>| Tensor::from_vec(v, n, &CPU).unwrap().to_dtype(dtype).unwrap();
    let xv = Var::from_tensor(&t(x)).unwrap();
    let up = t((0..n).map(|_| rng.normal()).collect());
    let (x64, up64) = (to64(&xv), to64(&up));
    let y = quick_gelu(&xv).unwrap();
    assert_eq!(y.dtype(), dtype);
    let want: Vec<f64> = x64.iter().map(|&v| quick_gelu_ref(v)).collect();
    assert_close(&what("values"), &to64(&y), &want, atol, rtol);
    let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let want: Vec<f64> = x64
        .iter()
        .zip(&up64)
        .map(|(&v, &u)| u * finite_diff(&[v], 1e-6, |v| quick_gelu_ref(v[0]))[0])
        .collect();
    assert_close(&what("dx"), &to64(grads.get(&xv).unwrap()), &want, gatol, grtol);
}

#[test]
fn quick_gelu_fused_and_composed_match_f64_reference_and_finite_differences() {
    let mut rng = Rng::new(44);
    // 13 x 1283 values: the fused op's parallel path, with a short last chunk.
    for n in [1, 3, 7 * 37, 13 * 1283] {
        check_quick_gelu(&mut rng, DType::F32, n, (1e-6, 1e-6), (1e-6, 1e-5));
        check_quick_gelu(&mut rng, DType::F64, n, (1e-14, 1e-13), (1e-9, 1e-8));
    }
    // BF16 throughout (as transformers runs it): 1.702 x, the sigmoid and the
    // product each rounded to 2^-8.
    for n in [3, 7 * 37] {
        check_quick_gelu(&mut rng, DType::BF16, n, (1e-2, 2e-2), (2e-2, 3e-2));
    }
}

/// erf in f64 from its everywhere-convergent series of positive terms,
/// `2/sqrt(pi) e^(-z^2) sum_n 2^n z^(2n+1) / (1 3 ... (2n+1))` (Abramowitz
/// & Stegun 7.1.6).
fn erf_ref(z: f64) -> f64 {
    let (mut term, mut sum, mut k) = (z.abs(), 0.0, 0.0);
    while term > 1e-17 * sum || k == 0.0 {
        sum += term;
        k += 1.0;
        term *= 2.0 * z * z / (2.0 * k + 1.0);
    }
    (2.0 / std::f64::consts::PI.sqrt() * (-z * z).exp() * sum).copysign(z)
}

#[test]
fn candle_gelu_erf_is_x_phi_x_with_a_backward() {
    // The exact GELU of Qwen2-VL's patch merger: x Phi(x), Phi(x) = (1 +
    // erf(x / sqrt 2)) / 2. candle's backward writes 1/sqrt(2 pi) as
    // 0.398942 (relative error 7e-7), so its F64 gradient is only that close.
    let gelu = |x: f64| x * 0.5 * (1.0 + erf_ref(x / std::f64::consts::SQRT_2));
    let mut rng = Rng::new(45);
    let x: Vec<f64> = (0..257).map(|_| rng.range(-6.0, 6.0)).chain([0.0]).collect();
    let up: Vec<f64> = x.iter().map(|_| rng.normal()).collect();
    for (dtype, values, grads) in [
        (DType::F32, (1e-6, 1e-6), (1e-6, 1e-5)),
        // Phi(x) = (1 + erf) / 2 cancels for x << 0 here and in candle:
        // absolute errors of ~1e-16 |x|.
        (DType::F64, (1e-14, 1e-14), (1e-6, 1e-6)),
    ] {
        let t = |v: &[f64]| Tensor::new(v, &CPU).unwrap().to_dtype(dtype).unwrap();
        let xv = Var::from_tensor(&t(&x)).unwrap();
        let x64 = to64(&xv);
        let y = xv.gelu_erf().unwrap();
        let want: Vec<f64> = x64.iter().map(|&v| gelu(v)).collect();
        assert_close(
            &format!("gelu_erf {dtype:?}"),
            &to64(&y),
            &want,
            values.0,
            values.1,
        );
        let g = (&y * t(&up)).unwrap().sum_all().unwrap().backward().unwrap();
        let want: Vec<f64> = x64
            .iter()
            .zip(&up)
            .map(|(&v, &u)| u as f32 as f64 * finite_diff(&[v], 1e-6, |v| gelu(v[0]))[0])
            .collect();
        let (atol, rtol) = grads;
        assert_close(
            &format!("dgelu_erf {dtype:?}"),
            &to64(g.get(&xv).unwrap()),
            &want,
            atol,
            rtol,
        );
    }
}

#[test]
fn rope_and_its_tables_match_f64_references_and_finite_differences() {
    let mut rng = Rng::new(46);
    let (b, heads, seq, dim, theta) = (2usize, 3usize, 5usize, 6usize, 10_000.0f64);
    let half = dim / 2;
    let (cos, sin) = rope_tables(seq, dim, theta, &CPU).unwrap();
    assert_eq!(cos.dims(), &[seq, half]);
    let angle = |p: usize, i: usize| p as f64 * theta.powf(-2.0 * i as f64 / dim as f64);
    let table = |f: fn(f64) -> f64| -> Vec<f64> {
        (0..seq)
            .flat_map(|p| (0..half).map(move |i| f(angle(p, i))))
            .collect()
    };
    // Angles up to 4 rounded to f32: a few 1e-7.
    assert_close("rope cos", &to32(&cos), &table(f64::cos), 1e-6, 0.0);
    assert_close("rope sin", &to32(&sin), &table(f64::sin), 1e-6, 0.0);

    // [x1, x2] -> [x1 cos - x2 sin, x1 sin + x2 cos] per position, with the
    // F32 tables as given.
    let (c64, s64) = (to64(&cos), to64(&sin));
    let reference = |x: &[f64]| -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for (r, (xr, yr)) in x.chunks(dim).zip(y.chunks_mut(dim)).enumerate() {
            let p = r % seq;
            for i in 0..half {
                let (c, s) = (c64[p * half + i], s64[p * half + i]);
                yr[i] = xr[i] * c - xr[half + i] * s;
                yr[half + i] = xr[i] * s + xr[half + i] * c;
            }
        }
        y
    };
    let n = b * heads * seq * dim;
    let x: Vec<f32> = rng.normals(n, 1.0);
    let w: Vec<f32> = rng.normals(n, 1.0);
    let xv = var(&x, &[b, heads, seq, dim]);
    let y = rope(&xv, &cos, &sin).unwrap();
    assert_close("rope", &to32(&y), &reference(&f64s(&x)), 1e-6, 1e-6);
    let wt = Tensor::from_vec(w.clone(), (b, heads, seq, dim), &CPU).unwrap();
    let grads = (&y * &wt).unwrap().sum_all().unwrap().backward().unwrap();
    let want = finite_diff(&f64s(&x), 1e-6, |x| dot(&reference(x), &f64s(&w)));
    assert_close("drope", &to32(grads.get(&xv).unwrap()), &want, 1e-6, 1e-5);
}
