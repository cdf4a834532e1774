//! Philox4x32-10, the counter-based random number generator of Salmon,
//! Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3"
//! (SC 2011), as in their Random123 library and in cuRAND's
//! `curand_Philox4x32_10`.
//!
//! A counter-based generator is a keyed bijection: the `n`-th random word of a
//! stream is a pure function of `(key, n)`, so any thread on any device
//! computes any draw without a shared state. That is what lets the CPU
//! sampler and a CUDA kernel follow the same stream.
//!
//! **The sampling stream.** The uniform of vocabulary index `j` in row `row`
//! at decoding step `step`, under a 64-bit `seed`, is lane `j % 4` of
//!
//! ```text
//! philox4x32_10(counter = [j / 4, row, step as u32, (step >> 32) as u32],
//!               key     = [seed as u32, (seed >> 32) as u32])
//! ```
//!
//! mapped to `u = ((x >> 9) as f32 + 0.5) * 2^-23`, and its Gumbel noise is
//! `g = -ln(-ln u)` (both `ln` in f32). The top 23 bits are used, not 24: every
//! `k + 0.5` with `k < 2^23` is exact in f32, so `u` lies in
//! `[2^-24, 1 - 2^-24]`, strictly inside (0, 1). With 24 bits,
//! `(2^24 - 1) + 0.5` rounds to `2^24` in f32, so `u = 1` and `g = +inf` for
//! one word in 2^24: about one row in a hundred at a 151936-token vocabulary.
//! `g` therefore lies in about `[-2.81, 16.64]`.

use crate::ops::math;

/// First Philox multiplier (of counter word 0).
pub(crate) const PHILOX_M0: u32 = 0xD251_1F53;
/// Second Philox multiplier (of counter word 2).
pub(crate) const PHILOX_M1: u32 = 0xCD9E_8D57;
/// Weyl increment of key word 0 between rounds (golden ratio).
pub(crate) const PHILOX_W0: u32 = 0x9E37_79B9;
/// Weyl increment of key word 1 between rounds (sqrt(3) - 1).
pub(crate) const PHILOX_W1: u32 = 0xBB67_AE85;

/// An upper bound on every Gumbel value of the stream (the largest is
/// `-ln(-ln(1 - 2^-24)) = 16.636`; the margin absorbs `ln`'s rounding).
pub(crate) const GUMBEL_MAX: f32 = 17.0;

/// Counters per vectorized block: 64 consecutive vocabulary indices.
const BLOCK_COUNTERS: usize = 16;
/// Vocabulary indices per vectorized block.
pub(crate) const BLOCK_TOKENS: usize = 4 * BLOCK_COUNTERS;

/// `(hi, lo)` words of the 64-bit product `a * b`.
#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// One Philox round: two 32x32 -> 64-bit products, the high halves xored
/// with the other counter words and the round key, the words permuted.
#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(PHILOX_M0, c[0]);
    let (hi1, lo1) = mulhilo(PHILOX_M1, c[2]);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32 with 10 rounds: four random 32-bit words from a 128-bit
/// counter and a 64-bit key. The key is bumped by `(W0, W1)` (wrapping)
/// before every round but the first.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for r in 0..10 {
        if r > 0 {
            k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
        }
        c = round(c, k);
    }
    c
}

/// A random word mapped to `((x >> 9) + 0.5) * 2^-23`, in (0, 1) exclusive.
#[inline(always)]
pub(crate) fn uniform(x: u32) -> f32 {
    const SCALE: f32 = 1.0 / (1u32 << 23) as f32;
    ((x >> 9) as f32 + 0.5) * SCALE
}

/// Standard Gumbel noise `-ln(-ln u)` of a uniform `u` in (0, 1).
#[inline(always)]
pub(crate) fn gumbel<M: math::MulAdd>(u: f32) -> f32 {
    -math::ln::<M>(-math::ln::<M>(u))
}

/// The random stream of one row at one decoding step (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowStream {
    key: [u32; 2],
    row: u32,
    step: [u32; 2],
}

impl RowStream {
    /// The stream of row `row` at step `step` under `seed`.
    pub fn new(seed: u64, row: u32, step: u64) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            row,
            step: [step as u32, (step >> 32) as u32],
        }
    }

    /// The Philox counter holding vocabulary indices `4n .. 4n + 4`.
    #[inline(always)]
    pub fn counter(&self, n: u32) -> [u32; 4] {
        [n, self.row, self.step[0], self.step[1]]
    }

    /// The random word of vocabulary index `j`.
    pub fn bits(&self, j: u32) -> u32 {
        philox4x32_10(self.counter(j / 4), self.key)[(j % 4) as usize]
    }

    /// The uniform of vocabulary index `j`.
    pub fn uniform(&self, j: u32) -> f32 {
        uniform(self.bits(j))
    }

    /// The Gumbel noise of vocabulary index `j`.
    pub fn gumbel(&self, j: u32) -> f32 {
        gumbel::<math::Baseline>(self.uniform(j))
    }

    /// The words of the 64 vocabulary indices from `64 * block`: `out[i]` is
    /// index `64 * block + i`. The 16 counters run side by side (one array per
    /// counter word), so the rounds vectorize.
    #[inline(always)]
    pub(crate) fn bits_block(&self, block: u32, out: &mut [u32; BLOCK_TOKENS]) {
        let first = block.wrapping_mul(BLOCK_COUNTERS as u32);
        let [mut c0, mut c1, mut c2, mut c3] = [
            std::array::from_fn(|i| first.wrapping_add(i as u32)),
            [self.row; BLOCK_COUNTERS],
            [self.step[0]; BLOCK_COUNTERS],
            [self.step[1]; BLOCK_COUNTERS],
        ];
        let mut k = self.key;
        for r in 0..10 {
            if r > 0 {
                k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
            }
            for (((w0, w1), w2), w3) in c0.iter_mut().zip(&mut c1).zip(&mut c2).zip(&mut c3) {
                [*w0, *w1, *w2, *w3] = round([*w0, *w1, *w2, *w3], k);
            }
        }
        for (i, words) in out.chunks_exact_mut(4).enumerate() {
            words.copy_from_slice(&[c0[i], c1[i], c2[i], c3[i]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_equals_scalar_stream() {
        let s = RowStream::new(0x0123_4567_89ab_cdef, 7, (5u64 << 32) | 11);
        let mut out = [0u32; BLOCK_TOKENS];
        for block in [0u32, 1, 1000, u32::MAX / 64] {
            s.bits_block(block, &mut out);
            for (i, &w) in out.iter().enumerate() {
                assert_eq!(w, s.bits(block * 64 + i as u32), "block {block} index {i}");
            }
        }
    }

    #[test]
    fn gumbel_stays_below_its_bound() {
        let (lo, hi) = (
            gumbel::<math::Unfused>(uniform(0)),
            gumbel::<math::Fused>(uniform(u32::MAX)),
        );
        assert!(hi < GUMBEL_MAX && hi > 16.6, "{hi}");
        assert!(lo > -2.9 && lo < -2.8, "{lo}");
        assert!(uniform(u32::MAX) < 1.0 && uniform(0) > 0.0);
    }
}
