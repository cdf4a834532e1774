//! Comparing two evaluations of the same images.

use super::mean;

/// The relative change of a mean between two evaluations of the same
/// images, `gain = mean(after) / mean(before) - 1`, with a 95% interval.
///
/// The interval is `gain +- 1.96 se` by the delta method for a ratio of
/// means (Cochran, *Sampling Techniques*, 3rd ed., 1977, sec. 6.3): with
/// `r = mean(after) / mean(before)` and the linearized terms
/// `z_i = (after_i - r before_i) / mean(before)` (which sum to 0),
/// `se^2 = sum z_i^2 / (n (n - 1))`. Pairing matters: both checkpoints
/// find the same easy images, so the per-image terms cancel much of the
/// spread that two independent means would carry. The interval is
/// symmetric; when only a few dozen triplets are recalled at all, the
/// true one is skewed upward (a bootstrap over images shows it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelativeGain {
    /// `mean(after) / mean(before) - 1`.
    pub gain: f64,
    /// Half-width of the 95% interval, `1.96 se`.
    pub half_width: f64,
}

impl RelativeGain {
    /// Compares `after` with `before`, image by image. `None` when the two
    /// differ in length, hold fewer than two images, or `before`'s mean is
    /// not positive (no relative change is defined).
    pub fn paired(before: &[f64], after: &[f64]) -> Option<Self> {
        let n = before.len();
        let base = mean(before);
        if n != after.len() || n < 2 || base.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return None;
        }
        let ratio = mean(after) / base;
        let squares: f64 = before
            .iter()
            .zip(after)
            .map(|(b, a)| ((a - ratio * b) / base).powi(2))
            .sum();
        Some(Self {
            gain: ratio - 1.0,
            half_width: 1.96 * (squares / (n * (n - 1)) as f64).sqrt(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::tests::close;
    use crate::util::rng::Rng;

    #[test]
    fn relative_gain_by_hand() {
        // Means 0.5 -> 0.75: r = 1.5; z = (a - 1.5 b) / 0.5 = -1, 2, -1, 0;
        // se^2 = (1 + 4 + 1) / (4 * 3) = 0.5.
        let g = RelativeGain::paired(&[1.0, 0.0, 1.0, 0.0], &[1.0, 1.0, 1.0, 0.0]).unwrap();
        close(g.gain, 0.5);
        close(g.half_width, 1.96 * 0.5f64.sqrt());
        // Identical evaluations: no change, no spread.
        let same = RelativeGain::paired(&[0.2, 0.5, 0.0], &[0.2, 0.5, 0.0]).unwrap();
        assert_eq!((same.gain, same.half_width), (0.0, 0.0));
        for (before, after) in [
            (&[1.0, 0.0][..], &[1.0][..]),
            (&[1.0][..], &[1.0][..]),
            (&[0.0, 0.0][..], &[1.0, 0.0][..]),
            (&[f64::NAN, 1.0][..], &[1.0, 0.0][..]),
            (&[][..], &[][..]),
        ] {
            assert_eq!(
                RelativeGain::paired(before, after),
                None,
                "{before:?} -> {after:?}"
            );
        }
    }

    /// The delta-method interval against a percentile bootstrap (plain f64,
    /// resampling images with replacement) on recall-like data: mostly 0,
    /// correlated between the two evaluations.
    #[test]
    fn relative_gain_interval_agrees_with_a_bootstrap() {
        let mut rng = Rng::new(7);
        let levels = [0.0, 1.0 / 3.0, 0.5, 1.0];
        let n = 777;
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let b = if rng.uniform() < 0.15 {
                levels[1 + rng.below(3)]
            } else {
                0.0
            };
            let a = if rng.uniform() < 0.7 {
                b
            } else if rng.uniform() < 0.2 {
                levels[1 + rng.below(3)]
            } else {
                0.0
            };
            before.push(b);
            after.push(a);
        }
        let g = RelativeGain::paired(&before, &after).unwrap();
        let ratio = after.iter().sum::<f64>() / before.iter().sum::<f64>();
        close(g.gain, ratio - 1.0);
        let mut gains: Vec<f64> = (0..4000)
            .map(|_| {
                let (mut sb, mut sa) = (0.0, 0.0);
                for _ in 0..n {
                    let i = rng.below(n);
                    sb += before[i];
                    sa += after[i];
                }
                sa / sb - 1.0
            })
            .collect();
        gains.sort_by(f64::total_cmp);
        let (lo, hi) = (gains[100], gains[3899]);
        let boot_half = (hi - lo) / 2.0;
        assert!(
            (g.half_width / boot_half - 1.0).abs() < 0.15,
            "delta method +-{:.4}, bootstrap +-{boot_half:.4}",
            g.half_width
        );
        assert!(
            g.half_width > 0.02,
            "a spread this data must show: {}",
            g.half_width
        );
    }
}
