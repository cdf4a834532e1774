//! Pillow's image resampling with the BICUBIC filter, bit for bit, for 8-bit RGB images.
//!
//! transformers' PIL image processors resize with `PIL.Image.resize(size, BICUBIC)`, which runs
//! `ImagingResample` (Pillow's `src/libImaging/Resample.c`). This module follows that
//! algorithm so the resized pixels equal Pillow's:
//!
//! - two separable passes, horizontal first (over only the rows the vertical pass reads), then
//!   vertical; a pass whose size does not change is skipped;
//! - the cubic convolution kernel with `a = -0.5` and support 2, widened by the downscale factor
//!   (`support * max(in / out, 1)`), evaluated at `(x + 0.5 - center) / filterscale` where
//!   `center = (out_x + 0.5) * in / out`;
//! - per output pixel, the taps `[round(center - support), round(center + support))` clipped
//!   to the image, and the weights divided by their sum;
//! - for 8-bit images the weights become fixed point with 22 fractional bits (rounded half away
//!   from zero), each pass accumulates `pixel * weight` from `1 << 21` (so the shift rounds half
//!   up) and clips `sum >> 22` to `0..=255`; the horizontal pass's 8-bit output is the vertical
//!   pass's input.

use image::RgbImage;

/// Fractional bits of the fixed-point weights (Pillow's `PRECISION_BITS = 32 - 8 - 2`: 8 bits of
/// pixel, 2 of headroom for weights summing above 1 or below 0).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The bicubic kernel's support at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// Pillow's `bicubic_filter`: cubic convolution with `a = -0.5` (Keys' kernel).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one pass: for output pixel `i`, input pixels `first[i] .. first[i] + count[i]`
/// with weights `weights[i * ksize ..][.. count[i]]`.
struct Taps {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
}

impl Taps {
    /// Pillow's `precompute_coeffs` for the whole input (`box = (0, in_size)`) followed by
    /// `normalize_coeffs_8bpc`.
    fn new(in_size: u32, out_size: u32) -> Self {
        // `box` is float in Pillow; sizes below 2^24 are exact either way.
        let scale = f64::from(in_size) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let out = out_size as usize;
        let mut taps = Self {
            ksize,
            first: Vec::with_capacity(out),
            count: Vec::with_capacity(out),
            weights: vec![0; out * ksize],
        };
        let mut k = vec![0.0f64; ksize];
        for xx in 0..out {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's `(int)` truncates toward zero; a negative start is clipped to 0 right after.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let count = (xmax - xmin).max(0) as usize;
            let mut sum = 0.0;
            for (x, w) in k.iter_mut().take(count).enumerate() {
                // Same operation order as Pillow: ((x + xmin) - center + 0.5) * ss.
                *w = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                sum += *w;
            }
            let row = &mut taps.weights[xx * ksize..][..count];
            for (fixed, &w) in row.iter_mut().zip(&k) {
                let w = if sum != 0.0 { w / sum } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                // `(int)(±0.5 + w * 2^22)`: round half away from zero.
                *fixed = if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            taps.first.push(xmin as usize);
            taps.count.push(count);
        }
        taps
    }

    fn of(&self, i: usize) -> (usize, &[i32]) {
        (self.first[i], &self.weights[i * self.ksize..][..self.count[i]])
    }
}

/// `clip8`: the accumulated fixed-point sum to a byte.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's rounding bias, 0.5 in fixed point.
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// `img.resize((width, height), Image.BICUBIC)` of Pillow for an RGB image, bit for bit
/// (`ImagingResample` with the whole image as the box). A zero target size gives an empty image.
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    if width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let (in_w, in_h) = src.dimensions();
    let vertical = (height != in_h).then(|| Taps::new(in_h, height));
    // The horizontal pass only produces the source rows the vertical pass reads.
    let (row_lo, row_hi) = match &vertical {
        Some(taps) => {
            let (last_first, last_weights) = taps.of(height as usize - 1);
            (taps.first[0], last_first + last_weights.len())
        }
        None => (0, in_h as usize),
    };
    let resized_rows = (width != in_w).then(|| horizontal_pass(src, &Taps::new(in_w, width), row_lo, row_hi));
    match (vertical, resized_rows) {
        (None, None) => src.clone(),
        (None, Some(rows)) => rows,
        (Some(taps), Some(rows)) => vertical_pass(&rows, row_lo, &taps),
        (Some(taps), None) => vertical_pass(src, 0, &taps),
    }
}

/// Resamples rows `row_lo..row_hi` of `src` to the width of `taps`.
fn horizontal_pass(src: &RgbImage, taps: &Taps, row_lo: usize, row_hi: usize) -> RgbImage {
    let width = taps.first.len() as u32;
    let mut out = RgbImage::new(width, (row_hi - row_lo) as u32);
    let src_stride = src.width() as usize * 3;
    for (y, out_row) in out.chunks_exact_mut(width as usize * 3).enumerate() {
        let row = &src.as_raw()[(row_lo + y) * src_stride..][..src_stride];
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (first, weights) = taps.of(xx);
            let mut acc = [HALF; 3];
            for (x, &w) in weights.iter().enumerate() {
                let p = &row[(first + x) * 3..][..3];
                for c in 0..3 {
                    acc[c] += i64::from(p[c]) * i64::from(w);
                }
            }
            for c in 0..3 {
                px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Resamples the columns of `rows` (whose first row is source row `row0`) to the height of
/// `taps`.
fn vertical_pass(rows: &RgbImage, row0: usize, taps: &Taps) -> RgbImage {
    let stride = rows.width() as usize * 3;
    let mut out = RgbImage::new(rows.width(), taps.first.len() as u32);
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (first, weights) = taps.of(yy);
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let mut acc = [HALF; 3];
            for (y, &w) in weights.iter().enumerate() {
                let p = &rows.as_raw()[(first + y - row0) * stride + xx * 3..][..3];
                for c in 0..3 {
                    acc[c] += i64::from(p[c]) * i64::from(w);
                }
            }
            for c in 0..3 {
                px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::Rgb;
    use safetensors::SafeTensors;

    /// Pillow's outputs (`scripts/pillow_fixture.py`).
    pub(crate) const PILLOW_FIXTURE: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/pillow/pillow.safetensors");

    /// A u8 tensor of the fixture: shape and bytes.
    pub(crate) fn fixture_u8(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<u8>) {
        let view = st.tensor(name).unwrap();
        (view.shape().to_vec(), view.data().to_vec())
    }

    #[test]
    fn is_bit_exact_with_pillow() {
        let bytes = std::fs::read(PILLOW_FIXTURE).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let cases = st.names().iter().filter(|n| n.starts_with("src_")).count();
        assert_eq!(cases, 8);
        for k in 0..cases {
            let (shape, src) = fixture_u8(&st, &format!("src_{k}"));
            let (out_shape, expected) = fixture_u8(&st, &format!("out_{k}"));
            let src = RgbImage::from_raw(shape[1] as u32, shape[0] as u32, src).unwrap();
            let ours = resize_bicubic(&src, out_shape[1] as u32, out_shape[0] as u32);
            assert_eq!(ours.into_raw(), expected, "case {k}: {shape:?} -> {out_shape:?}");
        }
    }

    /// A deterministic pseudo-random image (SplitMix64 bytes).
    fn noise_image(width: u32, height: u32, seed: u64) -> RgbImage {
        let mut state = seed;
        RgbImage::from_fn(width, height, |_, _| {
            let mut next = || {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) >> 56) as u8
            };
            Rgb([next(), next(), next()])
        })
    }

    /// The normalized kernel weights of every input pixel for one output pixel, computed over
    /// the whole input line without Pillow's tap window (zero outside the support).
    fn naive_weights(in_size: u32, out_size: u32, out_x: usize) -> Vec<f64> {
        let scale = f64::from(in_size) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let center = (out_x as f64 + 0.5) * scale;
        let w: Vec<f64> = (0..in_size)
            .map(|x| bicubic((f64::from(x) + 0.5 - center) / filterscale))
            .collect();
        let sum: f64 = w.iter().sum();
        w.iter().map(|v| v / sum).collect()
    }

    /// Rounds half up and clips to a byte, as Pillow's `clip8` does with its bias.
    fn to_byte(v: f64) -> u8 {
        (v + 0.5).floor().clamp(0.0, 255.0) as u8
    }

    /// A naive f64 two-pass resize with the same kernel: floating-point weights (no fixed
    /// point) over the whole line, with the horizontal result rounded to bytes as Pillow does
    /// (intermediate clipping changes the output wherever the kernel overshoots, so an
    /// unrounded reference would differ by more than rounding on noisy images).
    fn naive_resize(src: &RgbImage, width: u32, height: u32) -> RgbImage {
        let (in_w, in_h) = src.dimensions();
        let mid = if width == in_w {
            src.clone()
        } else {
            RgbImage::from_fn(width, in_h, |x, y| {
                let w = naive_weights(in_w, width, x as usize);
                let mut px = [0u8; 3];
                for (c, out) in px.iter_mut().enumerate() {
                    *out = to_byte(
                        (0..in_w)
                            .map(|i| w[i as usize] * f64::from(src.get_pixel(i, y)[c]))
                            .sum(),
                    );
                }
                Rgb(px)
            })
        };
        if height == in_h {
            return mid;
        }
        RgbImage::from_fn(width, height, |x, y| {
            let w = naive_weights(in_h, height, y as usize);
            let mut px = [0u8; 3];
            for (c, out) in px.iter_mut().enumerate() {
                *out = to_byte(
                    (0..in_h)
                        .map(|i| w[i as usize] * f64::from(mid.get_pixel(x, i)[c]))
                        .sum(),
                );
            }
            Rgb(px)
        })
    }

    fn max_diff(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
        assert_eq!(a.dimensions(), b.dimensions());
        let diffs = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y));
        diffs.fold((0, 0), |(m, n), d| (m.max(d), n + usize::from(d > 0)))
    }

    #[test]
    fn kernel_matches_keys_cubic() {
        // Values of the a = -0.5 cubic: 1 at 0, 0 at the integers, 0.5625 at 0.5, -0.0625 at 1.5.
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(-2.0), 0.0);
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(-1.5), -0.0625);
        assert_eq!(bicubic(2.5), 0.0);
    }

    #[test]
    fn fixed_point_taps_sum_to_one() {
        for (n_in, n_out) in [(100, 84), (84, 100), (300, 196), (7, 56), (1000, 28), (28, 28)] {
            let taps = Taps::new(n_in, n_out);
            for i in 0..n_out as usize {
                let (first, w) = taps.of(i);
                assert!(first + w.len() <= n_in as usize);
                let sum: i64 = w.iter().map(|&v| i64::from(v)).sum();
                // Each weight rounds by at most half a unit.
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                    "{n_in}->{n_out} at {i}: {sum}"
                );
            }
        }
    }

    #[test]
    fn matches_naive_convolution() {
        // Up, down, non-integer and integer factors, one axis only, extreme shrink.
        let cases = [
            (37, 23, 56, 28),
            (150, 100, 112, 84),
            (200, 300, 140, 224),
            (30, 40, 30, 84),
            (45, 20, 90, 20),
            (300, 7, 28, 56),
            (13, 13, 28, 28),
        ];
        for (k, (w, h, ow, oh)) in cases.into_iter().enumerate() {
            let src = noise_image(w, h, k as u64);
            let ours = resize_bicubic(&src, ow, oh);
            let naive = naive_resize(&src, ow, oh);
            let (max, count) = max_diff(&ours, &naive);
            // Fixed-point weights differ from f64 ones by 2^-23 each, which can only flip a
            // rounding that falls (almost) exactly on .5.
            assert!(max <= 1, "{w}x{h} -> {ow}x{oh}: max diff {max}");
            assert!(
                count * 1000 <= ours.as_raw().len(),
                "{w}x{h} -> {ow}x{oh}: {count} bytes differ"
            );
        }
    }

    #[test]
    fn same_size_is_a_copy_and_constant_stays_constant() {
        let src = noise_image(20, 10, 7);
        assert_eq!(resize_bicubic(&src, 20, 10), src);
        let flat = RgbImage::from_pixel(33, 17, Rgb([200, 3, 77]));
        for (w, h) in [(56, 28), (14, 9), (33, 40), (70, 17)] {
            let out = resize_bicubic(&flat, w, h);
            assert!(out.pixels().all(|p| *p == Rgb([200, 3, 77])), "{w}x{h}");
        }
        assert_eq!(resize_bicubic(&src, 0, 5).dimensions(), (0, 5));
    }
}
