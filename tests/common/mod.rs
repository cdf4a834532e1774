//! Shared by the test suites: a seeded generator, dtype round-trips, and
//! tolerance checks. Reference implementations live beside the tests that
//! use them, written in f64 and as plainly as possible.
#![allow(dead_code)]

use grpo_kernels::Float;

/// SplitMix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// `n` values `scale * N(0, 1)`, rounded to `T`.
    pub fn normals<T: Float>(&mut self, n: usize, scale: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f32((self.normal() * scale) as f32))
            .collect()
    }
}

/// Exact widening of stored values to f64, so references see exactly what
/// the op saw.
pub fn widen<T: Float>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| x.to_f32() as f64).collect()
}

/// Asserts `|got - want| <= atol + rtol |want|` elementwise; NaN never passes.
/// `got` is f32 (an op's output) or f64 (a path that computes in f64).
#[track_caller]
pub fn assert_close<T: Copy + Into<f64>>(what: &str, got: &[T], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g: f64 = g.into();
        let ok = (g - w).abs() <= atol + rtol * w.abs();
        assert!(
            ok && g.is_finite() == w.is_finite(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Like [`assert_close`] for `[rows, row_len]` data whose error scales with
/// each row's magnitude (gradients of a softmax row): element `j` of row `r`
/// passes if `|got - want| <= row_atol * max(max|want_row|, floor(r)) + rtol |want|`.
/// `floor` covers terms whose weight the row's values do not show: an
/// entropy gradient `g_H` multiplies `log p`, whose absolute error is that of
/// the logits, even where it leaves the row's values small.
#[track_caller]
pub fn assert_close_rows<T: Copy + Into<f64>>(
    what: &str,
    got: &[T],
    want: &[f64],
    row_len: usize,
    row_atol: f64,
    floor: impl Fn(usize) -> f64,
    rtol: f64,
) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (r, (g, w)) in got.chunks(row_len).zip(want.chunks(row_len)).enumerate() {
        let scale = w.iter().fold(floor(r), |m, x| m.max(x.abs()));
        for (j, (&g, &w)) in g.iter().zip(w).enumerate() {
            let g: f64 = g.into();
            let ok = (g - w).abs() <= row_atol * scale + rtol * w.abs();
            assert!(
                ok && g.is_finite() == w.is_finite(),
                "{what}[row {r}, col {j}]: got {g}, want {w} (row max {scale})"
            );
        }
    }
}

/// Asserts `|got - want| <= bound` elementwise, for bounds derived per
/// element; NaN never passes. `row_len` only labels the failing element.
#[track_caller]
pub fn assert_within(what: &str, got: &[f32], want: &[f64], bound: &[f64], row_len: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert_eq!(bound.len(), want.len(), "{what}: bounds");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let g = g as f64;
        assert!(
            (g - w).abs() <= b && g.is_finite() == w.is_finite(),
            "{what}[row {}, col {}]: got {g}, want {w}, bound {b}",
            i / row_len,
            i % row_len
        );
    }
}

/// f32's resolution for softmax gradients of logits `z / t`: 4 ulps of the
/// largest scaled logit (`log p = x - lse` is no more exact than that).
pub fn softmax_row_atol<T: Float>(logits: &[T], t: f32) -> f64 {
    let xmax = logits
        .iter()
        .fold(1.0f64, |m, z| m.max((z.to_f32() / t).abs() as f64));
    4.0 * f32::EPSILON as f64 * xmax
}

pub mod bad_input;
#[cfg(feature = "candle")]
pub mod composed;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod policy_loss_fixture;
pub mod reference;

/// Central finite differences of `f` at `x`, step `h`.
pub fn finite_diff(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + h;
            let up = f(&x);
            x[i] = x0 - h;
            let down = f(&x);
            x[i] = x0;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Asserts that `r` failed with exactly `want`, this crate's typed error
/// wrapped by `grpo_kernels::candle`. candle 0.11 holds it as
/// `Error::Wrapped(Box<dyn Display>)`, which cannot be downcast, so this
/// compares messages: op, argument, value and the variant's wording.
#[cfg(feature = "candle")]
#[track_caller]
pub fn assert_typed_error<T: std::fmt::Debug>(r: candle_core::Result<T>, want: grpo_kernels::Error) {
    let mut err = r.expect_err(&format!("expected {want:?}"));
    // RUST_BACKTRACE adds one layer.
    if let candle_core::Error::WithBacktrace { inner, .. } = err {
        err = *inner;
    }
    match err {
        candle_core::Error::Wrapped(got) => assert_eq!(got.to_string(), want.to_string()),
        other => panic!("expected {want:?}, got candle's {other:?}"),
    }
}

/// Candle tensors flattened to host vectors.
#[cfg(feature = "candle")]
pub mod tensors {
    use candle_core::{DType, Device, Tensor, Var};

    pub const CPU: Device = Device::Cpu;

    /// A variable on the CPU holding `x` in `shape`.
    pub fn var(x: &[f32], shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_vec(x.to_vec(), shape, &CPU).unwrap()).unwrap()
    }

    pub fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    pub fn to64(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub fn to32(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

/// Every advantage mode, with both std conventions and eps from TRL's and
/// verl's defaults down to 0.
pub const ADVANTAGE_MODES: [grpo_kernels::AdvantageMode; 7] = [
    grpo_kernels::AdvantageMode::GroupNorm {
        eps: 1e-4,
        unbiased: true,
    },
    grpo_kernels::AdvantageMode::GroupNorm {
        eps: 1e-6,
        unbiased: false,
    },
    grpo_kernels::AdvantageMode::GroupMean,
    grpo_kernels::AdvantageMode::BatchNorm {
        eps: 1e-4,
        unbiased: true,
    },
    grpo_kernels::AdvantageMode::BatchNorm {
        eps: 0.0,
        unbiased: false,
    },
    grpo_kernels::AdvantageMode::LeaveOneOut,
    grpo_kernels::AdvantageMode::None,
];
