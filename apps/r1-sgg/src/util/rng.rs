//! The one seeded generator of the crate: data, augmentation, sampling
//! seeds and weight initialization all draw from it, so a run is
//! reproducible from its seed on any platform.

/// SplitMix64 (Steele, Lea and Flood, 2014): a small seeded generator, so
/// data and augmentation are reproducible from a seed on any platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for a stream named by `parts` (e.g. seed, split, index):
    /// each part is mixed in, so nearby tuples give unrelated streams.
    pub fn derive(parts: &[u64]) -> Self {
        let mut state = 0x243F_6A88_85A3_08D3; // digits of pi: any odd constant
        for &p in parts {
            state = Rng(state ^ p).next_u64();
        }
        Self(state)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        // Multiply-shift: unbiased enough for n far below 2^32.
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spread() {
        let mut a = Rng::derive(&[7, 1, 2]);
        let mut b = Rng::derive(&[7, 1, 2]);
        let mut c = Rng::derive(&[7, 2, 1]);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..8).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs, (0..8).map(|_| c.next_u64()).collect::<Vec<_>>());
        let mut counts = [0usize; 5];
        for _ in 0..5000 {
            counts[a.below(5)] += 1;
            let u = a.uniform();
            assert!((0.0..1.0).contains(&u));
        }
        assert!(counts.iter().all(|&n| (850..1150).contains(&n)), "{counts:?}");
        let mut perm: Vec<usize> = (0..10).collect();
        a.shuffle(&mut perm);
        let mut sorted = perm.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }
}
