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
pub mod corrections;
pub mod extreme;
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
pub const ADVANTAGE_MODES: [grpo_kernels::AdvantageMode; 9] = [
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
    grpo_kernels::AdvantageMode::Whiten {
        eps: 1e-4,
        unbiased: true,
    },
    grpo_kernels::AdvantageMode::Whiten {
        eps: 0.0,
        unbiased: false,
    },
];

/// Every KL estimator.
pub const KL_ESTIMATORS: [grpo_kernels::KlEstimator; 8] = [
    grpo_kernels::KlEstimator::K1,
    grpo_kernels::KlEstimator::K2,
    grpo_kernels::KlEstimator::K3,
    grpo_kernels::KlEstimator::LowVarK3,
    grpo_kernels::KlEstimator::Abs,
    grpo_kernels::KlEstimator::K1StraightThrough,
    grpo_kernels::KlEstimator::LowVarK3StraightThrough,
    grpo_kernels::KlEstimator::AbsStraightThrough,
];

/// A committed JSON fixture of `tests/fixtures/`.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A fixture's array of numbers, `null` read as NaN.
pub fn fixture_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// A TRL case of `advantages_reference.json`: values component-major
/// `[K, P G]` (TRL's `rewards_per_func` is `[P G, K]`), weights, `G`.
pub fn trl_case(case: &serde_json::Value) -> (Vec<f32>, Vec<f32>, usize) {
    let k = case["funcs"].as_u64().unwrap() as usize;
    let rows = fixture_f64s(&case["rewards"]);
    let n = rows.len() / k;
    let values = (0..k)
        .flat_map(|kk| (0..n).map(move |i| (kk, i)))
        .map(|(kk, i)| rows[i * k + kk] as f32)
        .collect();
    let weights = fixture_f64s(&case["weights"]).iter().map(|&w| w as f32).collect();
    (values, weights, case["group_size"].as_u64().unwrap() as usize)
}

/// TRL 1.16's settings (the fixture's keys) and the crate's equivalents.
pub fn trl_settings() -> [(&'static str, grpo_kernels::AdvantageConfig); 4] {
    use grpo_kernels::{AdvantageConfig, AdvantageMode, NanRewards, RewardAggregation};
    let trl = |mode, aggregation| AdvantageConfig {
        mode,
        aggregation,
        nan_rewards: NanRewards::Skip,
        ..AdvantageConfig::default()
    };
    let sum = RewardAggregation::SumThenNormalize;
    let (eps, unbiased) = (1e-4, true);
    [
        (
            "sum_then_normalize/group",
            trl(AdvantageMode::GroupNorm { eps, unbiased }, sum),
        ),
        (
            "sum_then_normalize/batch",
            trl(AdvantageMode::BatchNorm { eps, unbiased }, sum),
        ),
        ("sum_then_normalize/none", trl(AdvantageMode::GroupMean, sum)),
        (
            "normalize_then_sum",
            trl(
                AdvantageMode::Whiten { eps, unbiased },
                RewardAggregation::NormalizeThenSum { eps },
            ),
        ),
    ]
}

/// verl's estimators (the fixture's keys) and the crate's equivalents.
pub fn verl_settings() -> [(&'static str, grpo_kernels::AdvantageConfig); 4] {
    use grpo_kernels::{AdvantageConfig, AdvantageMode, Singletons};
    let verl = |mode, singletons| AdvantageConfig {
        mode,
        singletons,
        ..AdvantageConfig::default()
    };
    let grpo = AdvantageMode::GroupNorm {
        eps: 1e-6,
        unbiased: true,
    };
    [
        ("grpo", verl(grpo, Singletons::Verl)),
        (
            "grpo/norm_adv_by_std_in_grpo=False",
            verl(AdvantageMode::GroupMean, Singletons::Verl),
        ),
        ("rloo", verl(AdvantageMode::LeaveOneOut, Singletons::Verl)),
        (
            "rloo_vectorized",
            verl(AdvantageMode::LeaveOneOut, Singletons::Zero),
        ),
    ]
}
