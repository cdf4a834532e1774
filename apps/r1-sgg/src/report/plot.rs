//! Line charts as PNG files, drawn with `plotters`' bitmap backend and encoded
//! with `image`. Text is set in the Ubuntu Light font that the
//! `epaint_default_fonts` crate embeds, so no font (and no system library) is
//! looked up at run time.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One named series of `(x, y)` points; non-finite points are skipped when drawn.
pub struct Series<'a> {
    /// The name shown in the legend.
    pub name: &'a str,
    /// The points, in drawing order (normally by increasing `x`).
    pub points: Vec<(f64, f64)>,
}

/// One chart of a [`panels_png`] grid.
pub struct Panel<'a> {
    /// The chart's caption.
    pub title: &'a str,
    /// The label under the x axis.
    pub x_label: &'a str,
    /// The label beside the y axis.
    pub y_label: &'a str,
    /// The curves, one color each.
    pub series: Vec<Series<'a>>,
}

/// The size of one chart in pixels.
const CHART: (u32, u32) = (800, 450);
/// The height of the band holding a [`panels_png`] title.
const TITLE_BAND: u32 = 44;
/// The family name the embedded font is registered under.
const FONT: &str = "sans-serif";
/// Series colors (matplotlib's "tab10").
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Writes a line chart of `series` as an 800x450 PNG at `path`: axes with
/// labels, one colored curve per series (with markers when it has few
/// points) and a legend. Empty series and non-finite points are skipped, so
/// an empty or all-NaN chart is still written (with blank axes).
pub fn line_chart_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    render(path, CHART, |root| {
        draw_chart(root, title, x_label, y_label, series)
    })
}

/// Writes `panels` as a grid of line charts (two per row, each 800x450 like
/// [`line_chart_png`]) under a common `title`, as one PNG at `path`.
pub fn panels_png(path: &Path, title: &str, panels: &[Panel<'_>]) -> anyhow::Result<()> {
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(cols).max(1);
    let size = (CHART.0 * cols as u32, TITLE_BAND + CHART.1 * rows as u32);
    render(path, size, |root| {
        let (band, body) = root.split_vertically(TITLE_BAND);
        band.draw_text(
            title,
            &(FONT, 26)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Center)),
            (size.0 as i32 / 2, TITLE_BAND as i32 / 2),
        )?;
        for (panel, cell) in panels.iter().zip(body.split_evenly((rows, cols))) {
            draw_chart(&cell, panel.title, panel.x_label, panel.y_label, &panel.series)?;
        }
        Ok(())
    })
}

/// A moving average over `window` points (for noisy per-step curves).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    (0..points.len())
        .map(|i| {
            let from = i.saturating_sub(w - 1);
            let ys = &points[from..=i];
            (points[i].0, ys.iter().map(|p| p.1).sum::<f64>() / ys.len() as f64)
        })
        .collect()
}

type Area<'b> = DrawingArea<BitMapBackend<'b>, Shift>;

/// Registers the embedded font with plotters (once per process).
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow::anyhow!("the embedded font could not be parsed"))
    }
}

/// Draws on a white RGB canvas of `size` pixels and saves it as PNG.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    register_font()?;
    let mut pixels = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    let img = image::RgbImage::from_raw(size.0, size.1, pixels)
        .ok_or_else(|| anyhow::anyhow!("pixel buffer has the wrong size"))?;
    img.save_with_format(path, image::ImageFormat::Png)?;
    Ok(())
}

/// The finite points of `s`.
fn finite(s: &Series<'_>) -> Vec<(f64, f64)> {
    s.points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect()
}

/// Axis ranges covering the finite points, never empty, with 5% head room in y.
fn ranges(series: &[Series<'_>]) -> ((f64, f64), (f64, f64)) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in series.iter().flat_map(finite) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    if x1 - x0 < 1e-9 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = 0.05 * (y1 - y0);
    ((x0, x1), (y0 - pad, y1 + pad))
}

/// Formats the ticks of an axis spanning `span` with as many decimals as its
/// tick spacing needs, trailing zeros trimmed ("20", not "20.0").
fn tick_format(span: f64) -> impl Fn(&f64) -> String {
    let decimals = (-(span / 10.0).log10().floor()).clamp(0.0, 9.0) as usize;
    move |v| {
        let s = format!("{v:.decimals$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            &s
        };
        if s == "-0" {
            "0".to_string()
        } else {
            s.to_string()
        }
    }
}

/// The legend corner that hides the fewest points (like matplotlib's "best").
fn legend_corner(series: &[Series<'_>], (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> SeriesLabelPosition {
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let hidden = |right: bool, upper: bool| {
        series
            .iter()
            .flat_map(finite)
            .filter(|&(x, y)| {
                let (fx, fy) = ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
                (if right { fx > 0.6 } else { fx < 0.4 }) && (if upper { fy > 0.6 } else { fy < 0.4 })
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, right, upper)| hidden(right, upper))
        .map_or(SeriesLabelPosition::UpperRight, |c| c.0)
}

/// Draws one chart (caption, mesh, axis labels, curves, legend) filling `area`.
fn draw_chart(
    area: &Area<'_>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    let (xr, yr) = ranges(series);
    let (x_ticks, y_ticks) = (tick_format(xr.1 - xr.0), tick_format(yr.1 - yr.0));
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&x_ticks)
        .y_label_formatter(&y_ticks)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(BLACK.mix(0.04))
        .draw()?;
    let mut labelled = false;
    for (i, s) in series.iter().enumerate() {
        let points = finite(s);
        if points.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 22, y)], color.stroke_width(3)));
        if points.len() < 12 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        labelled = true;
    }
    if labelled {
        chart
            .configure_series_labels()
            .position(legend_corner(series, xr, yr))
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .margin(10)
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh scratch directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("r1_sgg_plot_{}_{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Decodes the PNG at `path`, checks its size and that it is not blank.
    fn check_png(path: &Path, size: (u32, u32)) {
        let img = image::open(path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), size);
        let first = *img.get_pixel(0, 0);
        assert!(
            img.pixels().any(|p| *p != first),
            "{} is a single color",
            path.display()
        );
    }

    fn noisy(n: usize, f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                (
                    i as f64,
                    f(i as f64) + 0.05 * ((i * 7919 % 13) as f64 - 6.0) / 6.0,
                )
            })
            .collect()
    }

    #[test]
    fn line_chart_png_writes_a_valid_picture() {
        let dir = scratch("line");
        let reward = noisy(200, |x| 1.0 - (-x / 60.0).exp());
        let series = [
            Series {
                name: "reward",
                points: reward.clone(),
            },
            Series {
                name: "mean of 20",
                points: smooth(&reward, 20),
            },
            Series {
                name: "failure rate",
                points: noisy(200, |x| (-x / 40.0).exp()),
            },
        ];
        let path = dir.join("chart.png");
        line_chart_png(&path, "GRPO: reward", "step", "reward", &series).unwrap();
        check_png(&path, CHART);
        // The curve colors are in the picture.
        let img = image::open(&path).unwrap().to_rgb8();
        for c in &COLORS[..3] {
            assert!(
                img.pixels().any(|p| p.0 == [c.0, c.1, c.2]),
                "color {c:?} missing"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn panels_png_lays_charts_out_in_a_grid() {
        let dir = scratch("panels");
        let panel = |title, f: fn(f64) -> f64| Panel {
            title,
            x_label: "step",
            y_label: title,
            series: vec![Series {
                name: title,
                points: noisy(100, f),
            }],
        };
        let panels = [
            panel("reward", |x| x / 100.0),
            panel("failure rate", |x| 1.0 - x / 100.0),
            panel("recall", |x| (x / 100.0).sqrt()),
        ];
        let path = dir.join("panels.png");
        panels_png(&path, "GRPO over training", &panels).unwrap();
        check_png(&path, (2 * CHART.0, TITLE_BAND + 2 * CHART.1));
        let path = dir.join("one.png");
        panels_png(&path, "one", &panels[..1]).unwrap();
        check_png(&path, (CHART.0, TITLE_BAND + CHART.1));
        let path = dir.join("none.png");
        panels_png(&path, "none", &[]).unwrap();
        check_png(&path, (CHART.0, TITLE_BAND + CHART.1));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn degenerate_input_does_not_fail() {
        let dir = scratch("degenerate");
        let cases: [Vec<Series<'_>>; 5] = [
            vec![],
            vec![Series {
                name: "empty",
                points: vec![],
            }],
            vec![Series {
                name: "one point",
                points: vec![(3.0, 2.0)],
            }],
            vec![Series {
                name: "flat & <odd> name",
                points: vec![(0.0, 1.0), (1.0, 1.0)],
            }],
            vec![
                Series {
                    name: "nan",
                    points: vec![(f64::NAN, 1.0), (1.0, f64::NAN), (2.0, f64::INFINITY)],
                },
                Series {
                    name: "some nan",
                    points: vec![(0.0, 0.5), (1.0, f64::NAN), (2.0, 0.7)],
                },
            ],
        ];
        for (i, series) in cases.iter().enumerate() {
            let path = dir.join(format!("{i}.png"));
            line_chart_png(&path, "", "", "", series).unwrap();
            check_png(&path, CHART);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn ticks_get_the_decimals_they_need() {
        let f = tick_format(200.0);
        assert_eq!([f(&0.0), f(&20.0), f(&-0.2)], ["0", "20", "0"]);
        let f = tick_format(1.1);
        assert_eq!([f(&0.2), f(&1.0), f(&-0.4)], ["0.2", "1", "-0.4"]);
        let f = tick_format(0.22);
        assert_eq!([f(&0.5), f(&0.52)], ["0.5", "0.52"]);
        assert_eq!(tick_format(1e-5)(&3e-6), "0.000003");
    }

    #[test]
    fn smooth_is_a_trailing_mean() {
        let s = smooth(&[(0.0, 0.0), (1.0, 2.0), (2.0, 4.0)], 2);
        assert_eq!(s, vec![(0.0, 0.0), (1.0, 1.0), (2.0, 3.0)]);
        assert_eq!(smooth(&[(0.0, 1.0)], 0), vec![(0.0, 1.0)]);
        assert!(smooth(&[], 5).is_empty());
    }
}
