//! Per-token KL estimators between the policy and a reference model, from
//! samples of the policy (Schulman, "Approximating KL Divergence", 2020).
//!
//! With `d = ref_logp - logp` for a token sampled from the policy, so that
//! `E[e^d] = 1`:
//!
//! ```text
//! k1 = -d                        unbiased, high variance, can be negative
//! k2 = d^2 / 2                   biased, low variance
//! k3 = e^d - d - 1               unbiased, low variance, >= 0 (GRPO's KL term)
//! low_var_k3 = clamp(k3(clamp(d, -20, 20)), -10, 10)     verl's `low_var_kl`
//! abs = |d|                      verl's `abs`
//! ```
//!
//! **Straight-through estimators** (verl's names ending in `+`): the value
//! of one estimator with the gradient of `k2`, so that the expected
//! gradient is the true KL's (Schulman's `k1` and `k3` are unbiased in
//! value, not in gradient): verl computes `k2 - sg(k2) + sg(value)` (`sg`:
//! detach). [`KlEstimator::K1StraightThrough`],
//! [`KlEstimator::LowVarK3StraightThrough`] and
//! [`KlEstimator::AbsStraightThrough`] have the value of `K1`, `LowVarK3`
//! and `Abs` and the gradient `-d = logp - ref_logp` (unclamped, also
//! where `LowVarK3`'s clamps are active).
//!
//! **Names in TRL and verl** (verl `kl_penalty`/`kl_penalty_forward`,
//! `verl/trainer/ppo/core_algos.py` at commit
//! b178a3cd56f58b2d502255daba591e92833930a7; TRL 1.16 `GRPOTrainer` with
//! `beta > 0`), each reproduced exactly in value and gradient
//! ([`KlEstimator::from_verl_name`] parses verl's):
//!
//! | reference (verl: `kl_loss_type` / `kl_penalty` name) | crate |
//! |---|---|
//! | TRL `beta > 0` (`exp(ref - logp) - (ref - logp) - 1`) | [`KlEstimator::K3`] |
//! | verl `kl`, `k1` | [`KlEstimator::K1`] |
//! | verl `abs` | [`KlEstimator::Abs`] |
//! | verl `mse`, `k2` | [`KlEstimator::K2`] |
//! | verl `low_var_kl`, `k3` (verl's `k3` is clamped) | [`KlEstimator::LowVarK3`] |
//! | verl `kl+`, `k1+` | [`KlEstimator::K1StraightThrough`] |
//! | verl `abs+` | [`KlEstimator::AbsStraightThrough`] |
//! | verl `low_var_kl+`, `k3+` | [`KlEstimator::LowVarK3StraightThrough`] |
//! | verl `full` | none (verl raises `NotImplementedError`) |
//!
//! Where the crate differs: verl at that commit passes the name with its
//! `+` on to `kl_penalty_forward`, which knows no such name and raises
//! `NotImplementedError` for every `+` estimator; the crate implements
//! what verl documents (`docs/algo/grpo.md`: "Appending `+` ... would apply
//! straight through to employ k2") and its `kl_penalty` computes once the
//! `+` is stripped. `mse+` and `k2+` raise in verl too, and are `k2`
//! anyway. verl computes `k3` as `exp(d) - d - 1` in the input's precision
//! (all digits lost near `d = 0` in f32); the crate's `k3` is accurate
//! there (below). The fixture `tests/fixtures/kl_reference.json`
//! (`advantages_kl_reference.py`) holds verl's values and torch autograd
//! gradients for every name.
//!
//! Gradients with respect to `logp` (`dd/dlogp = -1`): `1`, `-d`,
//! `1 - e^d`, for `low_var_k3` the k3 gradient where neither clamp is
//! active, 0 where one is (torch's `clamp` passes the gradient at the bounds
//! themselves, and so does this), for `abs` `sign(logp - ref_logp) =
//! -sign(d)`, 0 at `d = 0` as torch's `abs` backward (`sgn(0) = 0`), and
//! `-d` for every straight-through estimator. Every estimator depends on `d` alone, so
//! `dL/dref_logp = -dL/dlogp`.
//!
//! `k3` is computed as `exp_excess(d)` (`e^d - d - 1` in one formula), accurate near `d = 0`
//! where the policy is close to the reference and `e^d - d - 1` computed
//! literally loses every digit. For `d > 88.37` the value saturates at about
//! `2.4e38` (the largest `e^x` the crate's vectorized `exp` returns) instead of overflowing,
//! and so does its derivative `1 - e^d` (at about `-2.4e38`); use
//! [`KlEstimator::LowVarK3`] where such tokens occur.
//!
//! **Non-finite values** (the crate's [rule](crate::error)). Both log-probs
//! must be finite: `-inf` (a token the model cannot produce) makes every
//! estimator infinite or NaN, so it is an
//! [`Error::NonFinite`](crate::Error::NonFinite) here, like NaN and `+inf`;
//! so is a non-finite upstream `grad` in the backward. Log-probs above 0
//! (which bf16 rounding produces) are accepted. Finite inputs whose result
//! overflows f32 (`k1` or `d` itself when `|ref_logp - logp|` exceeds
//! `f32::MAX`, `k2` when `|d|` exceeds about `2.6e19`, a gradient times a
//! large `grad`) are `NonFinite` with `what: "kl"` (forward) or `"dlogp"`
//! (backward) and the token's index: the only saturation is `k3`'s, above.

use std::mem::MaybeUninit;

use crate::error::{check, Result};
use crate::memory::{Host, Memory};
use crate::ops::math::{self, multiversion, MulAdd};
use crate::ops::output::{par_fill_into, par_filled};

pub(crate) const OP: &str = "kl_divergence";
pub(crate) const OP_BWD: &str = "kl_divergence_backward";

/// Elements per parallel task: large enough to amortize rayon's scheduling,
/// small enough to balance two to a few dozen cores at the bench size.
const CHUNK: usize = 1 << 14;

/// verl's `low_var_kl` clamps `d` to `[-D_BOUND, D_BOUND]` ...
const LOW_VAR_D_BOUND: f32 = 20.0;
/// ... and the estimate to `[-KL_BOUND, KL_BOUND]`.
const LOW_VAR_KL_BOUND: f32 = 10.0;

/// Which estimate of `KL(policy || ref)` to compute per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KlEstimator {
    /// `k1 = -d = logp - ref_logp`.
    K1,
    /// `k2 = d^2 / 2`.
    K2,
    /// `k3 = e^d - d - 1`: DeepSeekMath's GRPO KL term, TRL's and verl's
    /// `low_var_kl` without clamps.
    #[default]
    K3,
    /// verl's `low_var_kl` (also verl's `k3`): `k3` with `d` clamped to
    /// `[-20, 20]` and the estimate clamped to `[-10, 10]`, zero gradient
    /// where clamped.
    LowVarK3,
    /// verl's `abs`: `|d| = |logp - ref_logp|`, gradient `-sign(d)` (0 at
    /// `d = 0`, as torch's).
    Abs,
    /// verl's `k1+` (`kl+`): the value of [`KlEstimator::K1`], the gradient
    /// of [`KlEstimator::K2`] (`-d`).
    K1StraightThrough,
    /// verl's `low_var_kl+` (`k3+`): the value of [`KlEstimator::LowVarK3`],
    /// the gradient of [`KlEstimator::K2`] (`-d`, unclamped).
    LowVarK3StraightThrough,
    /// verl's `abs+`: the value of [`KlEstimator::Abs`], the gradient of
    /// [`KlEstimator::K2`] (`-d`).
    AbsStraightThrough,
}

/// `$body` with `$e` a constant equal to `$est`, one arm per estimator: in
/// a loop over tokens the estimator's `match` then folds away and the loop
/// vectorizes. The one list of every estimator.
macro_rules! with_estimator {
    ($est:expr, $e:ident => $body:expr) => {
        match $est {
            KlEstimator::K1 => {
                const $e: KlEstimator = KlEstimator::K1;
                $body
            }
            KlEstimator::K2 => {
                const $e: KlEstimator = KlEstimator::K2;
                $body
            }
            KlEstimator::K3 => {
                const $e: KlEstimator = KlEstimator::K3;
                $body
            }
            KlEstimator::LowVarK3 => {
                const $e: KlEstimator = KlEstimator::LowVarK3;
                $body
            }
            KlEstimator::Abs => {
                const $e: KlEstimator = KlEstimator::Abs;
                $body
            }
            KlEstimator::K1StraightThrough => {
                const $e: KlEstimator = KlEstimator::K1StraightThrough;
                $body
            }
            KlEstimator::LowVarK3StraightThrough => {
                const $e: KlEstimator = KlEstimator::LowVarK3StraightThrough;
                $body
            }
            KlEstimator::AbsStraightThrough => {
                const $e: KlEstimator = KlEstimator::AbsStraightThrough;
                $body
            }
        }
    };
}

impl KlEstimator {
    /// The estimator verl names `name` (its `kl_penalty` / `kl_loss_type`
    /// setting at commit b178a3cd): `kl`/`k1`, `abs`, `mse`/`k2`,
    /// `low_var_kl`/`k3` (clamped: [`KlEstimator::LowVarK3`]) and their
    /// straight-through forms with a trailing `+`; `None` for `full` (which
    /// verl does not implement either) and any other name. `k2+`/`mse+`
    /// (which verl rejects) are `k2`, whose gradient is already `k2`'s.
    pub fn from_verl_name(name: &str) -> Option<Self> {
        let (base, plus) = match name.strip_suffix('+') {
            Some(base) => (base, true),
            None => (name, false),
        };
        Some(match (base, plus) {
            ("kl" | "k1", false) => KlEstimator::K1,
            ("kl" | "k1", true) => KlEstimator::K1StraightThrough,
            ("abs", false) => KlEstimator::Abs,
            ("abs", true) => KlEstimator::AbsStraightThrough,
            ("mse" | "k2", _) => KlEstimator::K2,
            ("low_var_kl" | "k3", false) => KlEstimator::LowVarK3,
            ("low_var_kl" | "k3", true) => KlEstimator::LowVarK3StraightThrough,
            _ => return None,
        })
    }

    /// Whether the gradient is `k2`'s whatever the value (verl's `+`).
    pub fn is_straight_through(self) -> bool {
        matches!(
            self,
            KlEstimator::K1StraightThrough
                | KlEstimator::LowVarK3StraightThrough
                | KlEstimator::AbsStraightThrough
        )
    }

    /// The estimate for one token, from `d = ref_logp - logp`: bit for bit
    /// what [`crate::kl_divergence`] gives for that token on this CPU at the
    /// current [`crate::simd_level`] (the copies with fused multiply-adds
    /// round some products differently from the portable one).
    pub fn value(self, d: f32) -> f32 {
        if math::has_avx2_fma() {
            self.value_with::<math::Fused>(d)
        } else {
            self.value_with::<math::Baseline>(d)
        }
    }

    /// `d value / d logp` for one token, from `d = ref_logp - logp`: bit for
    /// bit what [`crate::kl_divergence_backward`] gives for that token with
    /// an upstream gradient of 1, as [`KlEstimator::value`].
    pub fn grad_logp(self, d: f32) -> f32 {
        if math::has_avx2_fma() {
            self.grad_logp_with::<math::Fused>(d)
        } else {
            self.grad_logp_with::<math::Baseline>(d)
        }
    }

    /// [`KlEstimator::value`] with `M`'s multiply-add (`math::Baseline`
    /// unless inside a vectorized copy).
    #[inline(always)]
    pub(crate) fn value_with<M: MulAdd>(self, d: f32) -> f32 {
        match self {
            KlEstimator::K1 | KlEstimator::K1StraightThrough => -d,
            KlEstimator::K2 => 0.5 * d * d,
            KlEstimator::K3 => math::exp_excess::<M>(d),
            KlEstimator::LowVarK3 | KlEstimator::LowVarK3StraightThrough => {
                let k = math::exp_excess::<M>(clamp(d, LOW_VAR_D_BOUND));
                clamp(k, LOW_VAR_KL_BOUND)
            }
            KlEstimator::Abs | KlEstimator::AbsStraightThrough => d.abs(),
        }
    }

    /// [`KlEstimator::grad_logp`] with `M`'s multiply-add.
    #[inline(always)]
    pub(crate) fn grad_logp_with<M: MulAdd>(self, d: f32) -> f32 {
        match self {
            KlEstimator::K1 => 1.0,
            // k2's gradient, also that of every straight-through estimator.
            KlEstimator::K2
            | KlEstimator::K1StraightThrough
            | KlEstimator::LowVarK3StraightThrough
            | KlEstimator::AbsStraightThrough => -d,
            // sign(logp - ref) = -sign(d), 0 at 0 (torch's sgn).
            KlEstimator::Abs => {
                if d > 0.0 {
                    -1.0
                } else if d < 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            // 1 - e^d, without the cancellation near d = 0.
            KlEstimator::K3 => -(d + math::exp_excess::<M>(d)),
            KlEstimator::LowVarK3 => {
                let k = math::exp_excess::<M>(d);
                let inside = d.abs() <= LOW_VAR_D_BOUND && k <= LOW_VAR_KL_BOUND;
                if inside {
                    -(d + k)
                } else {
                    0.0
                }
            }
        }
    }
}

/// `x` clamped to `[-bound, bound]`, with comparisons (NaN stays NaN).
#[inline(always)]
fn clamp(x: f32, bound: f32) -> f32 {
    let x = if x > bound { bound } else { x };
    if x < -bound {
        -bound
    } else {
        x
    }
}

/// Per-token log-probs of the sampled tokens under the policy and the
/// reference model, `[N]` each.
pub struct KlInputs<'a, M: Memory = Host> {
    /// Policy log-probs (the differentiated input).
    pub logp: M::Buf<'a, f32>,
    /// Reference model log-probs.
    pub ref_logp: M::Buf<'a, f32>,
}

impl<M: Memory> KlInputs<'_, M> {
    /// Checks the lengths; returns `N`.
    pub(crate) fn validate(&self, op: &'static str) -> Result<usize> {
        let n = M::len(&self.logp);
        check::non_empty(op, "logp", n)?;
        check::len(op, "ref_logp", n, M::len(&self.ref_logp))?;
        Ok(n)
    }
}

impl<'a> KlInputs<'a, Host> {
    /// `logp` and `ref_logp`, `[N]` each.
    pub fn new(logp: &'a [f32], ref_logp: &'a [f32]) -> Self {
        Self { logp, ref_logp }
    }
}

/// The estimate `est` of each token's KL term, `[N]`.
///
/// Errors: empty input, length mismatch, a non-finite log-prob
/// ([`Error::NonFinite`](crate::Error::NonFinite) at the first one in
/// `logp`, else in `ref_logp`), an estimate that overflows f32 (`what:
/// "kl"`).
pub fn kl_divergence(inputs: &KlInputs<'_>, est: KlEstimator) -> Result<Vec<f32>> {
    let n = inputs.validate(OP)?;
    let block = |i| chunk(i, n);
    // SAFETY: `kl_block` writes all of `out`: its inputs' chunks are as long.
    let (out, finite) = unsafe {
        par_filled(n, CHUNK, |i, out| {
            kl_block(est, &inputs.logp[block(i)], &inputs.ref_logp[block(i)], out)
        })
    };
    if !finite {
        check::finite(OP, "logp", inputs.logp)?;
        check::finite(OP, "ref_logp", inputs.ref_logp)?;
        check::finite(OP, "kl", &out)?;
    }
    Ok(out)
}

/// [`kl_divergence`] into a caller's buffer `out` `[N]` (every element
/// written; unspecified after an error): with the buffer reused, a loop of
/// calls allocates nothing. Errors: those of [`kl_divergence`], and
/// `out`'s length.
pub fn kl_divergence_into(inputs: &KlInputs<'_>, est: KlEstimator, out: &mut [f32]) -> Result<()> {
    let n = inputs.validate(OP)?;
    check::len(OP, "out", n, out.len())?;
    let block = |i| chunk(i, n);
    let finite = par_fill_into(out, CHUNK, |i, out| {
        kl_block(est, &inputs.logp[block(i)], &inputs.ref_logp[block(i)], out)
    });
    if !finite {
        check::finite(OP, "logp", inputs.logp)?;
        check::finite(OP, "ref_logp", inputs.ref_logp)?;
        check::finite(OP, "kl", out)?;
    }
    Ok(())
}

/// `dL/dlogp = grad * d kl / d logp` for each token, given `grad = dL/dkl`
/// `[N]`. The gradient with respect to `ref_logp` is its negation.
///
/// Errors: as [`kl_divergence`], plus `grad`'s length and non-finite
/// values, and a gradient that overflows f32 (`what: "dlogp"`).
pub fn kl_divergence_backward(inputs: &KlInputs<'_>, est: KlEstimator, grad: &[f32]) -> Result<Vec<f32>> {
    let n = inputs.validate(OP_BWD)?;
    check::len(OP_BWD, "grad", n, grad.len())?;
    let block = |i| chunk(i, n);
    // SAFETY: `kl_grad_block` writes all of `out`: its inputs' chunks are as long.
    let (out, finite) = unsafe {
        par_filled(n, CHUNK, |i, out| {
            let (logp, ref_logp) = (&inputs.logp[block(i)], &inputs.ref_logp[block(i)]);
            kl_grad_block(est, logp, ref_logp, &grad[block(i)], out)
        })
    };
    if !finite {
        check::finite(OP_BWD, "logp", inputs.logp)?;
        check::finite(OP_BWD, "ref_logp", inputs.ref_logp)?;
        check::finite(OP_BWD, "grad", grad)?;
        check::finite(OP_BWD, "dlogp", &out)?;
    }
    Ok(out)
}

/// [`kl_divergence_backward`] into a caller's buffer `dlogp` `[N]` (every
/// element written; unspecified after an error). Errors: those of
/// [`kl_divergence_backward`], and `dlogp`'s length.
pub fn kl_divergence_backward_into(
    inputs: &KlInputs<'_>,
    est: KlEstimator,
    grad: &[f32],
    dlogp: &mut [f32],
) -> Result<()> {
    let n = inputs.validate(OP_BWD)?;
    check::len(OP_BWD, "grad", n, grad.len())?;
    check::len(OP_BWD, "dlogp", n, dlogp.len())?;
    let block = |i| chunk(i, n);
    let finite = par_fill_into(dlogp, CHUNK, |i, out| {
        let (logp, ref_logp) = (&inputs.logp[block(i)], &inputs.ref_logp[block(i)]);
        kl_grad_block(est, logp, ref_logp, &grad[block(i)], out)
    });
    if !finite {
        check::finite(OP_BWD, "logp", inputs.logp)?;
        check::finite(OP_BWD, "ref_logp", inputs.ref_logp)?;
        check::finite(OP_BWD, "grad", grad)?;
        check::finite(OP_BWD, "dlogp", dlogp)?;
    }
    Ok(())
}

/// The indices of the `i`-th of `n` tokens' parallel blocks.
fn chunk(i: usize, n: usize) -> std::ops::Range<usize> {
    i * CHUNK..n.min((i + 1) * CHUNK)
}

/// `out[i] = f(ref_logp[i] - logp[i])`, times `grad[i]` if given; whether
/// every input and output was finite (or, conservatively, `d` overflowed:
/// the caller's error path then finds nothing and returns `out`). Inlined
/// into each estimator's arm so each loop is branch-free. Writes all of
/// `out` when the inputs are as long.
#[inline(always)]
fn map_d(
    logp: &[f32],
    ref_logp: &[f32],
    grad: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
    f: impl Fn(f32) -> f32,
) -> bool {
    let mut finite = true;
    let pairs = out.iter_mut().zip(logp).zip(ref_logp);
    match grad {
        // A non-finite input makes `d` non-finite, and a non-finite `g`
        // makes `f'(d) g` non-finite (`0 * inf` is NaN): two tests cover
        // inputs and output.
        None => pairs.for_each(|((o, &lp), &rf)| {
            let d = rf - lp;
            let v = f(d);
            finite &= d.is_finite() & v.is_finite();
            o.write(v);
        }),
        Some(grad) => pairs.zip(grad).for_each(|(((o, &lp), &rf), &g)| {
            let d = rf - lp;
            let v = f(d) * g;
            finite &= d.is_finite() & v.is_finite();
            o.write(v);
        }),
    }
    finite
}

multiversion! {
    /// The estimate over one block; whether every input and output was finite.
    fn kl_block(est: KlEstimator, logp: &[f32], ref_logp: &[f32], out: &mut [MaybeUninit<f32>]) -> bool {
        with_estimator!(est, E => map_d(logp, ref_logp, None, out, |d| E.value_with::<Mad>(d)))
    }
}

multiversion! {
    /// `grad * d kl / d logp` over one block; whether every input and output was finite.
    fn kl_grad_block(
        est: KlEstimator,
        logp: &[f32],
        ref_logp: &[f32],
        grad: &[f32],
        out: &mut [MaybeUninit<f32>],
    ) -> bool {
        with_estimator!(est, E => map_d(logp, ref_logp, Some(grad), out, |d| E.grad_logp_with::<Mad>(d)))
    }
}
