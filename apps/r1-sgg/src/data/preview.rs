//! A grid of images with their boxes outlined: the dataset's previews and
//! the pictures of a model's predictions.

use image::{imageops, Rgb, RgbImage};

use super::Sample;

/// A grid of samples, each scaled `scale` times (nearest neighbour) with
/// its boxes outlined in white, `cols` per row, for eyeballing the data.
pub fn render_preview(samples: &[Sample], cols: usize, scale: u32) -> RgbImage {
    const GAP: u32 = 4;
    let cols = cols.clamp(1, samples.len().max(1));
    let rows = samples.len().div_ceil(cols).max(1);
    let tile = samples
        .iter()
        .map(|s| s.image.width().max(s.image.height()))
        .max()
        .unwrap_or(1)
        * scale;
    let mut grid = RgbImage::from_pixel(
        cols as u32 * (tile + GAP) + GAP,
        rows as u32 * (tile + GAP) + GAP,
        Rgb([90, 90, 90]),
    );
    for (k, s) in samples.iter().enumerate() {
        let (w, h) = (s.image.width() * scale, s.image.height() * scale);
        let big = imageops::resize(&s.image, w, h, imageops::FilterType::Nearest);
        let (ox, oy) = (
            GAP + (k % cols) as u32 * (tile + GAP),
            GAP + (k / cols) as u32 * (tile + GAP),
        );
        imageops::replace(&mut grid, &big, ox as i64, oy as i64);
        for o in &s.graph.objects {
            let to_px = |v: f32, side: u32| ((v * side as f32).round() as u32).min(side.max(1) - 1);
            let [x0, x1] = [o.bbox[0], o.bbox[2]].map(|v| ox + to_px(v, w));
            let [y0, y1] = [o.bbox[1], o.bbox[3]].map(|v| oy + to_px(v, h));
            for x in x0..=x1 {
                grid.put_pixel(x, y0, Rgb([255, 255, 255]));
                grid.put_pixel(x, y1, Rgb([255, 255, 255]));
            }
            for y in y0..=y1 {
                grid.put_pixel(x0, y, Rgb([255, 255, 255]));
                grid.put_pixel(x1, y, Rgb([255, 255, 255]));
            }
        }
    }
    grid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{generate_split, Split};

    #[test]
    fn preview_grid_has_the_expected_size() {
        let samples = generate_split(Split::Train, 5, 2);
        let grid = render_preview(&samples, 3, 2);
        // 3 columns and 2 rows of 128-pixel tiles with 4-pixel gaps.
        assert_eq!(grid.dimensions(), (3 * 132 + 4, 2 * 132 + 4));
        assert!(render_preview(&[], 3, 2).width() > 0);
    }
}
