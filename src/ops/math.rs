//! The CPU's shared numerics: a vectorizable `exp`, the online softmax state
//! every row-wise op reduces with, and runtime dispatch to AVX-512 or
//! AVX2+FMA.
//!
//! The hot loops are written over fixed-width lane arrays with no branches,
//! so LLVM turns them into SIMD; the crate-internal `multiversion!` macro
//! compiles each one three times (baseline x86-64, AVX2+FMA, AVX-512) and
//! picks at run time, so one binary is fast on any x86-64 machine.

/// Lanes per accumulator array: two AVX2 registers (enough independent adds
/// to hide FMA latency) or one AVX-512 register (whose loop bodies are long
/// enough to hide it on their own).
pub const LANES: usize = 16;

/// Rows are processed in blocks of this many f32: a block stays in L1
/// between its max pass and its exp pass.
pub const BLOCK: usize = 2048;

/// Defines `fn $name(args) -> ret` whose body is compiled for the baseline
/// target, for AVX2+FMA and for AVX-512, choosing at run time. In the body
/// the type `Mad` is the copy's [`MulAdd`]: pass it on to the math below
/// (`math::exp::<Mad>(x)`).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$($gen:ident : $bound:path),*>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name $(<$($gen: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
            // Bodies without multiply-adds (sums, copies) leave `Mad` unused.
            #[allow(clippy::extra_unused_type_parameters)]
            #[inline(always)]
            fn generic<Mad: $crate::ops::math::MulAdd $($(, $gen: $bound)*)?>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512 $(<$($gen: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    generic::<$crate::ops::math::Fused $($(, $gen)*)?>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$($gen: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    generic::<$crate::ops::math::Fused $($(, $gen)*)?>($($arg),*)
                }
                if $crate::ops::math::has_avx512() {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::ops::math::has_avx2_fma() {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic::<$crate::ops::math::Baseline $($(, $gen)*)?>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// The widest instruction set the crate's CPU ops may use: the ops compile
/// their hot loops three times and pick, at each call, the widest copy both
/// the CPU and this level allow. All copies compute the same formulas in the
/// same order over 16-lane arrays, so the AVX2 and AVX-512 copies give the
/// same bits; the portable copy, without fused multiply-adds, rounds some
/// products differently. Matrix products (the `gemm` crate, in
/// [`crate::fused_linear_logprobs`] and in candle) choose their own kernels
/// by CPU and are not covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Baseline x86-64 (or the target's baseline): the same bits on every machine.
    Portable,
    /// At most AVX2 and FMA.
    Avx2,
    /// Whatever the CPU has (the default).
    Native,
}

/// 0: not yet decided (read `GRPO_KERNELS_SIMD` on first use); else the level + 1.
static SIMD_LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Caps the instruction set of every CPU op from now on, for the whole
/// process (e.g. [`SimdLevel::Portable`] for runs that must match across
/// machines). Overrides the `GRPO_KERNELS_SIMD` environment variable.
pub fn set_simd_level(level: SimdLevel) {
    SIMD_LEVEL.store(level as u8 + 1, std::sync::atomic::Ordering::Relaxed);
}

/// The cap in force: set by [`set_simd_level`], else by the environment
/// variable `GRPO_KERNELS_SIMD` (`portable`, `avx2` or `native`, read once;
/// another value is ignored with a warning on stderr), else
/// [`SimdLevel::Native`].
pub fn simd_level() -> SimdLevel {
    use std::sync::atomic::Ordering;
    let level = match SIMD_LEVEL.load(Ordering::Relaxed) {
        1 => return SimdLevel::Portable,
        2 => return SimdLevel::Avx2,
        3 => return SimdLevel::Native,
        _ => {
            match std::env::var("GRPO_KERNELS_SIMD").as_deref() {
                Ok("portable") => SimdLevel::Portable,
                Ok("avx2") => SimdLevel::Avx2,
                Ok("native") | Err(_) => SimdLevel::Native,
                Ok(other) => {
                    eprintln!("grpo-kernels: GRPO_KERNELS_SIMD={other:?} is not portable, avx2 or native; using native");
                    SimdLevel::Native
                }
            }
        }
    };
    // A concurrent `set_simd_level` wins over the environment.
    let _ = SIMD_LEVEL.compare_exchange(0, level as u8 + 1, Ordering::Relaxed, Ordering::Relaxed);
    simd_level()
}

/// The copy the CPU ops run now: the widest level both this CPU and the cap
/// ([`simd_level`]) allow. [`SimdLevel::Native`] here means the AVX-512
/// copies; a CPU without AVX-512 runs [`SimdLevel::Avx2`] at most, one
/// without AVX2 and FMA (or not x86-64) [`SimdLevel::Portable`].
pub fn active_simd_level() -> SimdLevel {
    if has_avx512() {
        SimdLevel::Native
    } else if has_avx2_fma() {
        SimdLevel::Avx2
    } else {
        SimdLevel::Portable
    }
}

/// Whether the AVX2+FMA copies may run: the CPU has AVX2 and FMA (cached by
/// std after the first call) and [`simd_level`] allows them.
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd_level() >= SimdLevel::Avx2
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 copies may run: the CPU has the subsets they use (F,
/// BW, VL, DQ) besides AVX2 and FMA, and [`simd_level`] is native.
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd_level() == SimdLevel::Native
            && has_avx2_fma()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How a copy of a hot loop computes `a * b + c`. Rust never fuses the two
/// on its own, and a fused multiply-add without the hardware instruction is
/// a slow libm call, so each `multiversion!` copy names its own: [`Fused`]
/// where it is compiled with FMA, [`Baseline`] elsewhere.
pub trait MulAdd {
    /// `a * b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// `a * b + c` with one rounding (one FMA instruction where the code is
/// compiled with FMA; a libm call elsewhere).
#[derive(Debug)]
pub enum Fused {}

/// `a * b + c` as a multiply and an add.
#[derive(Debug)]
pub enum Unfused {}

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The multiply-add of code compiled for the baseline target: fused on
/// AArch64 (FMA is part of the base instruction set), unfused elsewhere.
#[cfg(target_arch = "aarch64")]
pub type Baseline = Fused;
/// The multiply-add of code compiled for the baseline target: fused on
/// AArch64 (FMA is part of the base instruction set), unfused elsewhere.
#[cfg(not(target_arch = "aarch64"))]
pub type Baseline = Unfused;

/// Below this, `exp` returns exactly 0 (e^-87.3 is the smallest normal f32).
const EXP_LO: f32 = -87.33;
const EXP_HI: f32 = 88.37;

/// `e^x` to about 1 ulp, branch-free so it vectorizes: `x = n ln2 + r`,
/// `e^r` by the Cephes minimax polynomial on `|r| <= ln2/2`, `2^n` built in
/// the exponent bits. Exactly 0 below -87.33 (so `-inf` gives 0), NaN in
/// gives NaN out.
#[inline(always)]
pub fn exp<M: MulAdd>(x: f32) -> f32 {
    // Comparisons, not f32::max/min: those would turn NaN into the bound.
    let xc = if x > EXP_HI { EXP_HI } else { x };
    let xc = if xc < EXP_LO { EXP_LO } else { xc };
    let y = exp_clamped::<M>(xc);
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}

/// `e^x` for `x` in `[EXP_LO, EXP_HI]` (or NaN): the range reduction and
/// polynomial of [`exp`].
#[inline(always)]
fn exp_clamped<M: MulAdd>(xc: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer held in the mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let t = M::mul_add(xc, LOG2E, ROUND);
    let n = t - ROUND;
    let r = M::mul_add(-n, LN2_LO, M::mul_add(-n, LN2_HI, xc));
    let er = M::mul_add(exp_poly::<M>(r), r * r, r) + 1.0;
    // t - ROUND is exactly n, and so is the difference of their bit
    // patterns (both lie in [2^23, 2^24)); 2^n goes in the exponent field.
    let bits = (t.to_bits().wrapping_sub(ROUND.to_bits()) as i32 + 127) << 23;
    er * f32::from_bits(bits as u32)
}

/// `e^d` for `d <= 0` (or NaN), cheaper than [`exp`] where a tiny positive
/// result for `d` below -87.33 (about 1e-38 instead of 0) does no harm, as
/// in a sum that already holds the maximum's 1.
#[inline(always)]
fn exp_nonpositive<M: MulAdd>(d: f32) -> f32 {
    exp_clamped::<M>(if d < EXP_LO { EXP_LO } else { d })
}

/// The Cephes minimax polynomial `p` with `e^r = 1 + r + r^2 p(r)` on
/// `|r| <= ln2/2`.
#[inline(always)]
fn exp_poly<M: MulAdd>(r: f32) -> f32 {
    let p = 1.987_569_1e-4_f32;
    let p = M::mul_add(p, r, 1.398_199_9e-3);
    let p = M::mul_add(p, r, 8.333_452e-3);
    let p = M::mul_add(p, r, 4.166_579_6e-2);
    let p = M::mul_add(p, r, 1.666_666_5e-1);
    M::mul_add(p, r, 0.5)
}

/// `e^x - 1 - x` (the excess of `e^x` over its tangent at 0) to a relative
/// error below 3e-6 everywhere, including near 0, where `exp(x) - x - 1`
/// cancels to noise. Branch-free. Saturates like [`exp`] (at `e^88.37`).
#[inline(always)]
pub fn exp_excess<M: MulAdd>(x: f32) -> f32 {
    const HALF_LN2: f32 = 0.346_573_6;
    // On |x| <= ln2/2 exp's range reduction is the identity, and
    // e^x - 1 - x is exactly the polynomial term.
    let near = exp_poly::<M>(x) * (x * x);
    let far = exp::<M>(x) - x - 1.0;
    if x.abs() <= HALF_LN2 {
        near
    } else {
        far
    }
}

/// `ln x` to about 1 ulp, branch-free so it vectorizes: `x = 2^e m` with
/// `m` in `[sqrt(1/2), sqrt(2))`, `ln m` by the Cephes minimax polynomial in
/// `m - 1` (exact, so results near `x = 1` keep their relative precision),
/// `e ln2` added in two parts. `ln 0 = -inf`, `ln inf = inf`, NaN for
/// negative or NaN input; subnormal inputs are scaled into range first.
#[inline(always)]
pub fn ln<M: MulAdd>(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Subnormals: multiply by 2^23 and take 23 off the exponent.
    let tiny = x < f32::MIN_POSITIVE;
    let xs = if tiny { x * 8_388_608.0 } else { x };
    let bits = xs.to_bits();
    // Mantissa bits with the exponent of 0.5: m in [0.5, 1), x = 2^e m.
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let e = ((bits >> 23) & 0xff) as i32 - 126 - if tiny { 23 } else { 0 };
    let low = m < SQRT_HALF;
    let e = (e - low as i32) as f32;
    let r = if low { m + m - 1.0 } else { m - 1.0 };
    let r2 = r * r;
    let p = 7.037_683_6e-2_f32;
    let p = M::mul_add(p, r, -1.151_461e-1);
    let p = M::mul_add(p, r, 1.167_699_9e-1);
    let p = M::mul_add(p, r, -1.242_014_1e-1);
    let p = M::mul_add(p, r, 1.424_932_3e-1);
    let p = M::mul_add(p, r, -1.666_805_8e-1);
    let p = M::mul_add(p, r, 2.000_071_5e-1);
    let p = M::mul_add(p, r, -2.499_999_4e-1);
    let p = M::mul_add(p, r, 3.333_333e-1);
    let y = M::mul_add(e, LN2_LO, p * r * r2);
    let y = M::mul_add(-0.5, r2, y);
    let y = M::mul_add(e, LN2_HI, r + y);
    if x > 0.0 && x < f32::INFINITY {
        y
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        x
    } else {
        f32::NAN
    }
}

/// Largest element (-inf for an empty slice; NaN elements are skipped here
/// and caught by [`SoftmaxState::finish`], since they make the sums NaN).
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in chunks.remainder() {
        m = m.max(x);
    }
    m
}

/// `(sum e^(x-m), sum e^(x-m) (x-m))` over a block, for `m >= max x`; the
/// second sum feeds the entropy and is 0 unless `ENTROPY`. Terms with
/// `e^(x-m) == 0` contribute 0 (so `-inf` logits are fine).
#[inline(always)]
pub fn sum_exp<M: MulAdd, const ENTROPY: bool>(xs: &[f32], m: f32) -> (f32, f32) {
    let mut s = [0.0f32; LANES];
    let mut e = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] - m;
            if ENTROPY {
                let p = exp::<M>(d);
                s[i] += p;
                e[i] += if p > 0.0 { p * d } else { 0.0 };
            } else {
                s[i] += exp_nonpositive::<M>(d);
            }
        }
    }
    let (mut s1, mut e1) = (s.iter().sum::<f32>(), e.iter().sum::<f32>());
    for &x in chunks.remainder() {
        let d = x - m;
        let p = exp::<M>(d);
        s1 += p;
        if ENTROPY {
            e1 += if p > 0.0 { p * d } else { 0.0 };
        }
    }
    (s1, e1)
}

/// The online softmax state of a sequence of values `x`:
/// `m = max x`, `s = sum e^(x-m)`, `e = sum e^(x-m) (x-m)`.
///
/// From it, `logsumexp = m + ln s` and the entropy of `softmax(x)` is
/// `H = ln s - e / s`. States of disjoint parts merge exactly (up to
/// rounding), which is how rows are split across blocks, threads, vocab
/// chunks and GPU blocks alike (Milakov & Gimelshein, "Online normalizer
/// calculation for softmax", 2018, extended with the entropy term).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxState {
    /// Running maximum.
    pub m: f32,
    /// `sum e^(x-m)`.
    pub s: f32,
    /// `sum e^(x-m) (x-m)`.
    pub e: f32,
}

impl Default for SoftmaxState {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl SoftmaxState {
    /// The state of no values.
    pub const EMPTY: Self = Self {
        m: f32::NEG_INFINITY,
        s: 0.0,
        e: 0.0,
    };

    /// The state after also seeing `block` (already temperature-scaled).
    /// Without `ENTROPY` the `e` sum is not kept up to date (it saves a
    /// fifth of the work per value): the entropy [`finish`](Self::finish)
    /// returns is then meaningless.
    #[inline(always)]
    pub fn update<M: MulAdd, const ENTROPY: bool>(self, block: &[f32]) -> Self {
        let bm = max(block);
        let merged = self.rebase(self.m.max(bm));
        let (s, e) = sum_exp::<M, ENTROPY>(block, merged.m);
        Self {
            m: merged.m,
            s: merged.s + s,
            e: merged.e + e,
        }
    }

    /// [`update`](Self::update) with the entropy sum chosen at run time.
    #[inline(always)]
    pub fn fold<M: MulAdd>(self, block: &[f32], entropy: bool) -> Self {
        if entropy {
            self.update::<M, true>(block)
        } else {
            self.update::<M, false>(block)
        }
    }

    /// The same state expressed relative to a new maximum `m >= self.m`:
    /// `s' = a s`, `e' = a (e + (m_old - m) s)` with `a = e^(m_old - m)`.
    #[inline(always)]
    fn rebase(self, m: f32) -> Self {
        if self.s == 0.0 || m == self.m {
            return Self { m, ..self };
        }
        let delta = self.m - m;
        let a = exp::<Baseline>(delta);
        Self {
            m,
            s: a * self.s,
            e: a * (self.e + delta * self.s),
        }
    }

    /// The state of the union of the values behind `self` and `other` (what
    /// the CUDA kernels do across threads; checked by the tests below).
    #[inline]
    pub fn merge(self, other: Self) -> Self {
        let m = self.m.max(other.m);
        if m == f32::NEG_INFINITY {
            return Self::EMPTY;
        }
        let a = self.rebase(m);
        let b = other.rebase(m);
        Self {
            m,
            s: a.s + b.s,
            e: a.e + b.e,
        }
    }

    /// `(logsumexp, entropy)`, or `None` when a value was NaN or +inf, or no
    /// value was finite.
    #[inline]
    pub fn finish(self) -> Option<(f32, f32)> {
        if !(self.m.is_finite() && self.s.is_finite() && self.e.is_finite() && self.s > 0.0) {
            return None;
        }
        let ln_s = self.s.ln();
        Some((self.m + ln_s, ln_s - self.e / self.s))
    }
}

multiversion! {
    /// Online softmax state of `src * scale` (its entropy sum only if
    /// `entropy`), converting from the storage type one L1-sized block at a
    /// time.
    pub fn softmax_state<T: crate::Float>(
        src: &[T],
        scale: f32,
        entropy: bool,
        buf: &mut [f32; BLOCK],
    ) -> SoftmaxState {
        let mut state = SoftmaxState::EMPTY;
        for chunk in src.chunks(BLOCK) {
            let block = &mut buf[..chunk.len()];
            T::load_scaled(chunk, scale, block);
            state = state.fold::<Mad>(block, entropy);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp_matches_std<M: MulAdd>() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, exact) = (exp::<M>(x), (x as f64).exp());
            let rel = ((ours as f64 - exact) / exact).abs();
            assert!(rel < 2.5e-7, "exp({x}) = {ours}, exact {exact}, rel {rel}");
            x += 0.0137;
        }
        assert_eq!(exp::<M>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<M>(-100.0), 0.0);
        assert!(exp::<M>(f32::NAN).is_nan());
        assert_eq!(exp::<M>(0.0), 1.0);
    }

    fn exp_excess_is_accurate<M: MulAdd>() {
        let mut x = -30.0f64;
        while x < 30.0 {
            let exact = x.exp_m1() - x;
            let ours = exp_excess::<M>(x as f32) as f64;
            // x itself is rounded to f32 first: compare with its exact excess.
            let xf = x as f32 as f64;
            let exact_f = xf.exp_m1() - xf;
            let rel = ((ours - exact_f) / exact_f).abs();
            assert!(rel < 3e-6, "exp_excess({x}) = {ours}, exact {exact}, rel {rel}");
            x += if x.abs() < 1e-3 { 1.37e-6 } else { 0.00731 };
        }
        assert_eq!(exp_excess::<M>(0.0), 0.0);
        assert!(exp_excess::<M>(f32::NAN).is_nan());
    }

    fn ln_matches_std<M: MulAdd>() {
        // Geometric sweep over the normal range, and a fine one around 1.
        let mut xs: Vec<f32> = Vec::new();
        let mut x = f32::MIN_POSITIVE;
        while x < 3e38 {
            xs.push(x);
            x *= 1.0137;
        }
        xs.extend((1..20_000).map(|i| 1.0 + (i as f32 - 10_000.0) * 3e-6));
        xs.extend([1.0 - f32::EPSILON / 2.0, 1.0 + f32::EPSILON, 0.5, 2.0]);
        for &x in &xs {
            let (ours, exact) = (ln::<M>(x) as f64, (x as f64).ln());
            let ulp = (exact.abs() as f32).max(f32::MIN_POSITIVE);
            let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
            assert!(
                (ours - exact).abs() <= 2.0 * ulp,
                "ln({x}) = {ours}, exact {exact}"
            );
        }
        assert_eq!(ln::<M>(1.0), 0.0);
        assert_eq!(ln::<M>(0.0), f32::NEG_INFINITY);
        assert_eq!(ln::<M>(f32::INFINITY), f32::INFINITY);
        assert!(ln::<M>(-1.0).is_nan() && ln::<M>(f32::NAN).is_nan() && ln::<M>(f32::NEG_INFINITY).is_nan());
        let sub = f32::MIN_POSITIVE / 1024.0;
        assert!(((ln::<M>(sub) as f64) - (sub as f64).ln()).abs() < 1e-5);
    }

    #[test]
    fn exp_matches_std_to_two_ulp() {
        exp_matches_std::<Fused>();
        exp_matches_std::<Unfused>();
    }

    #[test]
    fn exp_excess_is_accurate_near_zero_and_far() {
        exp_excess_is_accurate::<Fused>();
        exp_excess_is_accurate::<Unfused>();
    }

    #[test]
    fn ln_matches_std_to_two_ulp() {
        ln_matches_std::<Fused>();
        ln_matches_std::<Unfused>();
    }

    #[test]
    fn the_cheaper_exp_of_sums_matches_exp() {
        let mut d = -100.0f32;
        while d <= 0.0 {
            let (cheap, full) = (exp_nonpositive::<Fused>(d), exp::<Fused>(d));
            assert!(
                (cheap - full).abs() <= 2e-38f32.max(full * 1e-7),
                "e^{d}: {cheap} vs {full}"
            );
            d += 0.0173;
        }
        assert!(exp_nonpositive::<Unfused>(f32::NAN).is_nan());
        let xs = [0.5f32, -1.0, f32::NEG_INFINITY, 2.0, -90.0];
        let (with, _) = sum_exp::<Unfused, true>(&xs, 2.0);
        let (without, e) = sum_exp::<Unfused, false>(&xs, 2.0);
        assert!((with - without).abs() < 1e-6 && e == 0.0);
    }

    #[test]
    fn merge_equals_one_pass() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 3.0)
            .collect();
        let whole = SoftmaxState::EMPTY.update::<Unfused, true>(&xs);
        let parts = SoftmaxState::EMPTY
            .update::<Fused, true>(&xs[..333])
            .merge(SoftmaxState::EMPTY.update::<Unfused, true>(&xs[333..]));
        let (l1, h1) = whole.finish().unwrap();
        let (l2, h2) = parts.finish().unwrap();
        assert!((l1 - l2).abs() < 1e-5 && (h1 - h2).abs() < 1e-5);
        assert_eq!(
            SoftmaxState::EMPTY.merge(SoftmaxState::EMPTY),
            SoftmaxState::EMPTY
        );
    }
}
