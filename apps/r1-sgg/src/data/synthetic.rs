//! The synthetic scenes of the demo (no download). Each image holds a few objects of the
//! [`SYNTHETIC`] vocabulary: eight shapes, each in its own colour
//! (circle red, square blue, triangle green, diamond yellow, cross magenta,
//! ring cyan, star orange, frame white), on a dark noisy background. Each
//! shape reaches all four sides of its box. Relations are computed from
//! geometry and drawing order for the `max_relations` closest pairs (by
//! centre distance); each pair gets the first predicate that holds, in this
//! order:
//!
//! | predicate | holds when | subject |
//! |---|---|---|
//! | `inside` | one box contains the other | the contained one |
//! | `on` | the boxes overlap | the one drawn on top |
//! | `near` | the gap between the boxes is at most [`NEAR`] (normalized) | left one, or upper one if the pair is more vertical |
//! | `bigger than` | one area is at least [`BIGGER`] times the other | the bigger one |
//! | `left of` | the pair is more horizontal than vertical | the left one |
//! | `above` | otherwise | the upper one |
//!
//! Objects are listed in reading order (top to bottom, then left to right)
//! and numbered from 1 in that order (`"circle.1"`, `"star.2"`, ...);
//! relations are sorted by subject then object.
//!
//! Everything is deterministic: sample `i` of a split is generated from
//! `(seed, split, i)` alone, so a split is the same at any length and on any
//! number of threads. [`Split::Shifted`] draws from other statistics (a
//! larger canvas, more and smaller objects clustered around a point, more
//! containment) to measure out-of-distribution generalization.

use image::{Rgb, RgbImage};
use rayon::prelude::*;

use super::scene::{Object, Relation, SceneGraph, SYNTHETIC};
use super::Sample;
use crate::util::rng::Rng;

/// Two boxes at most this far apart (normalized, along the axis that
/// separates them most) are `near`.
pub const NEAR: f32 = 0.08;
/// An area at least this many times another's is `bigger than` it.
pub const BIGGER: f32 = 2.5;

/// The dataset splits. Train, val and test share one distribution (with
/// disjoint seeds); shifted uses other statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training data.
    Train,
    /// Validation data, same distribution as train.
    Val,
    /// Test data, same distribution as train.
    Test,
    /// Out-of-distribution test data (see [`Split::config`]).
    Shifted,
}

impl Split {
    /// All splits.
    pub const ALL: [Split; 4] = [Split::Train, Split::Val, Split::Test, Split::Shifted];

    /// Lowercase name, used in sample ids.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::Shifted => "shifted",
        }
    }

    /// Scene statistics of the split: 64x64 canvases with 2-5 objects of
    /// 20-42% of the side spread uniformly for train/val/test; 96x96
    /// canvases with 4-7 objects of 12-30% of the side clustered around a
    /// random point, with twice the containment, for shifted.
    pub fn config(self) -> SceneConfig {
        match self {
            Split::Train | Split::Val | Split::Test => SceneConfig {
                canvas: 64,
                objects: (2, 5),
                size: (0.2, 0.42),
                layout: Layout::Uniform,
                inside_prob: 0.15,
                max_overlap: 0.2,
                max_relations: 4,
            },
            Split::Shifted => SceneConfig {
                canvas: 96,
                objects: (4, 7),
                size: (0.12, 0.3),
                layout: Layout::Clustered { spread: 0.3 },
                inside_prob: 0.3,
                max_overlap: 0.3,
                max_relations: 6,
            },
        }
    }
}

/// Where objects are placed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layout {
    /// Anywhere on the canvas.
    Uniform,
    /// Centres within `spread` (a fraction of the side) of a random point.
    Clustered {
        /// Half-width of the cluster, as a fraction of the canvas side.
        spread: f32,
    },
}

/// Statistics of generated scenes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SceneConfig {
    /// Image width and height in pixels.
    pub canvas: u32,
    /// Inclusive range of the number of objects attempted (fewer are
    /// placed if the canvas is too crowded, never fewer than one).
    pub objects: (usize, usize),
    /// Range of an object's side, as a fraction of the canvas side.
    pub size: (f32, f32),
    /// Placement of free objects.
    pub layout: Layout,
    /// Probability that a new object is placed inside an existing one.
    pub inside_prob: f32,
    /// A new object may cover at most this fraction of an existing one.
    pub max_overlap: f32,
    /// Relations per image: those of the closest pairs.
    pub max_relations: usize,
}

/// Pixel box `[x0, y0, x1, y1)`, in drawing order.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Placed {
    category: usize,
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
}

impl Placed {
    fn area(&self) -> u32 {
        (self.x1 - self.x0) * (self.y1 - self.y0)
    }

    fn intersection(&self, o: &Placed) -> u32 {
        let w = self.x1.min(o.x1).saturating_sub(self.x0.max(o.x0));
        let h = self.y1.min(o.y1).saturating_sub(self.y0.max(o.y0));
        w * h
    }

    fn contains(&self, o: &Placed) -> bool {
        self.x0 <= o.x0 && o.x1 <= self.x1 && self.y0 <= o.y0 && o.y1 <= self.y1
    }

    /// Centre, doubled so it stays an integer.
    fn centre2(&self) -> (i64, i64) {
        ((self.x0 + self.x1) as i64, (self.y0 + self.y1) as i64)
    }
}

/// The shape of each [`SYNTHETIC`] category, in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    Cross,
    Ring,
    Star,
    Frame,
}

/// Each object's colour varies by up to this much per channel.
pub(crate) const JITTER: usize = 15;

/// Shape and base colour of each category. Colours are at least 120 apart
/// (summed over channels), more than jitter can close (6 * 15), so colour
/// alone names the category, and so does shape.
pub(crate) const SHAPES: [(Shape, [u8; 3]); 8] = [
    (Shape::Circle, [220, 50, 50]),
    (Shape::Square, [50, 90, 230]),
    (Shape::Triangle, [50, 190, 70]),
    (Shape::Diamond, [230, 210, 50]),
    (Shape::Cross, [210, 60, 210]),
    (Shape::Ring, [60, 210, 220]),
    (Shape::Star, [250, 120, 20]),
    (Shape::Frame, [235, 235, 235]),
];

/// A five-pointed star, point up, scaled to touch all four sides of
/// `[-1, 1]^2`.
fn star_vertices() -> [(f32, f32); 10] {
    let (inner, half_width, bottom) = (0.45f32, 18f32.to_radians().cos(), 36f32.to_radians().cos());
    std::array::from_fn(|k| {
        let r = if k % 2 == 0 { 1.0 } else { inner };
        let angle = (-90.0 + 36.0 * k as f32).to_radians();
        let (x, y) = (r * angle.cos(), r * angle.sin());
        (x / half_width, (y + 1.0) / (1.0 + bottom) * 2.0 - 1.0)
    })
}

/// Even-odd point-in-polygon test.
fn in_polygon(vertices: &[(f32, f32)], u: f32, v: f32) -> bool {
    let mut inside = false;
    for (i, &(xi, yi)) in vertices.iter().enumerate() {
        let (xj, yj) = vertices[(i + vertices.len() - 1) % vertices.len()];
        if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
            inside = !inside;
        }
    }
    inside
}

impl Shape {
    /// Whether the point `(u, v)` of the box, mapped to `[-1, 1]^2` (`v`
    /// down), is painted.
    fn covers(self, u: f32, v: f32, star: &[(f32, f32)]) -> bool {
        match self {
            Shape::Circle => u * u + v * v <= 1.0,
            Shape::Square => true,
            Shape::Triangle => u.abs() <= (v + 1.0) / 2.0,
            Shape::Diamond => u.abs() + v.abs() <= 1.0,
            Shape::Cross => u.abs() <= 0.3 || v.abs() <= 0.3,
            Shape::Ring => (0.3..=1.0).contains(&(u * u + v * v)),
            Shape::Star => in_polygon(star, u, v),
            Shape::Frame => u.abs().max(v.abs()) >= 0.6,
        }
    }
}

/// Generates the `index`-th sample of a split.
pub fn generate(split: Split, index: usize, seed: u64) -> Sample {
    let mut rng = Rng::derive(&[seed, split as u64, index as u64]);
    let id = format!("{}-{index:06}", split.name());
    generate_scene(&split.config(), &mut rng, id)
}

/// Samples `0..count` of a split, generated in parallel.
pub fn generate_split(split: Split, count: usize, seed: u64) -> Vec<Sample> {
    (0..count)
        .into_par_iter()
        .map(|i| generate(split, i, seed))
        .collect()
}

/// One scene with the given statistics, drawn from `rng`.
pub fn generate_scene(cfg: &SceneConfig, rng: &mut Rng, id: String) -> Sample {
    let placed = place_objects(cfg, rng);
    let image = render(cfg.canvas, &placed, rng);
    let graph = describe(cfg, &placed);
    Sample { id, image, graph }
}

/// Draws object boxes until `cfg.objects` are placed or attempts run out.
fn place_objects(cfg: &SceneConfig, rng: &mut Rng) -> Vec<Placed> {
    let (lo, hi) = cfg.objects;
    let wanted = lo + rng.below(hi.saturating_sub(lo) + 1);
    let canvas = cfg.canvas as f32;
    let cluster = (rng.range(0.3, 0.7) * canvas, rng.range(0.3, 0.7) * canvas);
    let mut placed: Vec<Placed> = Vec::with_capacity(wanted);
    for _ in 0..50 * wanted.max(1) {
        if placed.len() >= wanted {
            break;
        }
        let category = rng.below(SHAPES.len());
        // Containers must leave room for a child of at least 5 pixels.
        let containers: Vec<usize> = (0..placed.len())
            .filter(|&i| (placed[i].x1 - placed[i].x0).min(placed[i].y1 - placed[i].y0) >= 12)
            .collect();
        let candidate = if !containers.is_empty() && rng.uniform() < cfg.inside_prob {
            let parent = placed[containers[rng.below(containers.len())]];
            let side = (parent.x1 - parent.x0).min(parent.y1 - parent.y0) as f32;
            let child = ((side * rng.range(0.35, 0.55)).round() as u32).max(5);
            let x0 = parent.x0 + 1 + rng.below((parent.x1 - parent.x0 - child - 1) as usize) as u32;
            let y0 = parent.y0 + 1 + rng.below((parent.y1 - parent.y0 - child - 1) as usize) as u32;
            let child = Placed {
                category,
                x0,
                y0,
                x1: x0 + child,
                y1: y0 + child,
            };
            // Inside its parent, clear of everything else.
            let clear = placed
                .iter()
                .all(|p| *p == parent || p.intersection(&child) == 0 || p.contains(&parent));
            clear.then_some(child)
        } else {
            let side = rng.range(cfg.size.0, cfg.size.1) * canvas;
            let aspect = rng.range(0.8, 1.25).sqrt();
            let w = ((side * aspect).round() as u32).clamp(5, cfg.canvas);
            let h = ((side / aspect).round() as u32).clamp(5, cfg.canvas);
            let (x0, y0) = match cfg.layout {
                Layout::Uniform => (
                    rng.below((cfg.canvas - w + 1) as usize) as u32,
                    rng.below((cfg.canvas - h + 1) as usize) as u32,
                ),
                Layout::Clustered { spread } => {
                    let jitter = spread * canvas;
                    let cx = cluster.0 + rng.range(-jitter, jitter);
                    let cy = cluster.1 + rng.range(-jitter, jitter);
                    let x0 = (cx - w as f32 / 2.0).round().clamp(0.0, (cfg.canvas - w) as f32);
                    let y0 = (cy - h as f32 / 2.0).round().clamp(0.0, (cfg.canvas - h) as f32);
                    (x0 as u32, y0 as u32)
                }
            };
            let new = Placed {
                category,
                x0,
                y0,
                x1: x0 + w,
                y1: y0 + h,
            };
            // Drawn on top, it must leave every earlier object mostly visible.
            let visible = placed
                .iter()
                .all(|p| p.intersection(&new) as f32 <= cfg.max_overlap * p.area() as f32);
            visible.then_some(new)
        };
        placed.extend(candidate);
    }
    placed
}

/// Paints the background and the objects in drawing order.
fn render(canvas: u32, placed: &[Placed], rng: &mut Rng) -> RgbImage {
    let base = 25 + rng.below(35) as i32;
    let mut image = RgbImage::from_fn(canvas, canvas, |_, _| {
        let v = (base + rng.below(13) as i32 - 6) as u8;
        Rgb([v, v, v])
    });
    let star = star_vertices();
    for p in placed {
        let (shape, colour) = SHAPES[p.category];
        let colour =
            colour.map(|c| (c as i32 + rng.below(2 * JITTER + 1) as i32 - JITTER as i32).clamp(0, 255) as u8);
        let (cx, cy) = ((p.x0 + p.x1) as f32 / 2.0, (p.y0 + p.y1) as f32 / 2.0);
        let (hw, hh) = ((p.x1 - p.x0) as f32 / 2.0, (p.y1 - p.y0) as f32 / 2.0);
        for y in p.y0..p.y1 {
            for x in p.x0..p.x1 {
                // Pixel centres map to (-1, 1).
                let u = (x as f32 + 0.5 - cx) / hw;
                let v = (y as f32 + 0.5 - cy) / hh;
                if shape.covers(u, v, &star) {
                    image.put_pixel(x, y, Rgb(colour));
                }
            }
        }
    }
    image
}

/// The scene graph of placed objects: reading-order ids and the relations
/// of the closest pairs (see the module docs for the rules).
fn describe(cfg: &SceneConfig, placed: &[Placed]) -> SceneGraph {
    let mut order: Vec<usize> = (0..placed.len()).collect();
    order.sort_by_key(|&i| (placed[i].y0, placed[i].x0, i));
    let mut rank = vec![0; placed.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    let canvas = cfg.canvas as f32;
    let objects: Vec<Object> = order
        .iter()
        .enumerate()
        .map(|(r, &i)| {
            let p = placed[i];
            let name = SYNTHETIC.objects[p.category];
            Object {
                id: format!("{name}.{}", r + 1),
                category: name.to_string(),
                bbox: [p.x0, p.y0, p.x1, p.y1].map(|v| v as f32 / canvas),
            }
        })
        .collect();

    let mut pairs: Vec<(i64, usize, usize)> = Vec::new();
    for a in 0..placed.len() {
        for b in a + 1..placed.len() {
            let ((ax, ay), (bx, by)) = (placed[a].centre2(), placed[b].centre2());
            pairs.push(((ax - bx).pow(2) + (ay - by).pow(2), a, b));
        }
    }
    pairs.sort_unstable();
    let mut triplets: Vec<(usize, &str, usize)> = pairs
        .iter()
        .take(cfg.max_relations)
        .map(|&(_, a, b)| {
            let (s, predicate, o) = relate(placed, a, b, cfg.canvas);
            (rank[s], predicate, rank[o])
        })
        .collect();
    triplets.sort_unstable_by_key(|&(s, _, o)| (s, o));
    let relations = triplets
        .into_iter()
        .map(|(s, predicate, o)| Relation::new(&objects[s].id, predicate, &objects[o].id))
        .collect();
    SceneGraph { objects, relations }
}

/// The predicate of a pair (drawing indices, `a` drawn before `b`) and
/// which one is its subject.
fn relate(placed: &[Placed], a: usize, b: usize, canvas: u32) -> (usize, &'static str, usize) {
    let (pa, pb) = (&placed[a], &placed[b]);
    if pb.contains(pa) {
        return (a, "inside", b);
    }
    if pa.contains(pb) {
        return (b, "inside", a);
    }
    if pa.intersection(pb) > 0 {
        return (b, "on", a); // b is drawn over a
    }
    let ((ax, ay), (bx, by)) = (pa.centre2(), pb.centre2());
    let horizontal = (ax - bx).abs() >= (ay - by).abs();
    let (first, second) = if (horizontal && ax <= bx) || (!horizontal && ay <= by) {
        (a, b)
    } else {
        (b, a)
    };
    let gap_x = pa.x0.max(pb.x0).saturating_sub(pa.x1.min(pb.x1));
    let gap_y = pa.y0.max(pb.y0).saturating_sub(pa.y1.min(pb.y1));
    if gap_x.max(gap_y) as f32 <= NEAR * canvas as f32 {
        return (first, "near", second);
    }
    let (area_a, area_b) = (pa.area() as f32, pb.area() as f32);
    if area_a >= BIGGER * area_b {
        return (a, "bigger than", b);
    }
    if area_b >= BIGGER * area_a {
        return (b, "bigger than", a);
    }
    (first, if horizontal { "left of" } else { "above" }, second)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scene::iou;

    #[test]
    fn shapes_match_the_vocabulary() {
        assert_eq!(SHAPES.len(), SYNTHETIC.objects.len());
        // Every shape reaches all four sides of its box (to within 3%, the
        // star's sharp tips), so boxes are tight.
        let star = star_vertices();
        for (shape, _) in SHAPES {
            // Points along the line u = `at` (or v = `at`, if `horizontal`).
            let touches = |at: f32, horizontal: bool| {
                (-1000..=1000).any(|t| {
                    let t = t as f32 / 1000.0;
                    let (u, v) = if horizontal { (t, at) } else { (at, t) };
                    shape.covers(u, v, &star)
                })
            };
            assert!(touches(-0.97, false), "{shape:?} left");
            assert!(touches(0.97, false), "{shape:?} right");
            assert!(touches(-0.97, true), "{shape:?} top");
            assert!(touches(0.97, true), "{shape:?} bottom");
        }
        for (i, (_, a)) in SHAPES.iter().enumerate() {
            for (_, b) in &SHAPES[i + 1..] {
                let d: i32 = a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs()).sum();
                assert!(d >= 120, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn generation_is_deterministic_and_well_formed() {
        for split in Split::ALL {
            let cfg = split.config();
            let samples = generate_split(split, 200, 11);
            assert_eq!(samples[17].image, generate(split, 17, 11).image);
            assert_eq!(samples[17].graph, generate(split, 17, 11).graph);
            assert_ne!(samples[17].graph, generate(split, 17, 12).graph);
            let mut predicates = std::collections::BTreeSet::new();
            for s in &samples {
                assert_eq!(s.image.dimensions(), (cfg.canvas, cfg.canvas));
                s.graph.check().unwrap();
                let n = s.graph.objects.len();
                assert!((1..=cfg.objects.1).contains(&n), "{} objects", n);
                assert!(s.graph.relations.len() <= cfg.max_relations.min(n * (n - 1) / 2));
                for o in &s.graph.objects {
                    assert!(SYNTHETIC.has_object(&o.category));
                }
                for r in &s.graph.relations {
                    assert!(SYNTHETIC.has_predicate(&r.predicate));
                    predicates.insert(r.predicate.clone());
                }
                // Reading order: tops never decrease.
                assert!(s.graph.objects.windows(2).all(|w| w[0].bbox[1] <= w[1].bbox[1]));
            }
            // 200 scenes exercise every predicate.
            assert_eq!(
                predicates.len(),
                SYNTHETIC.predicates.len(),
                "{split:?}: {predicates:?}"
            );
            let mean = samples.iter().map(|s| s.graph.objects.len()).sum::<usize>() as f32 / 200.0;
            let (lo, hi) = cfg.objects;
            assert!(
                mean >= lo as f32 + 0.5 * (hi - lo) as f32 - 0.6,
                "{split:?}: {mean} objects"
            );
        }
        let train = generate_split(Split::Train, 50, 3);
        let val = generate_split(Split::Val, 50, 3);
        assert!(train.iter().zip(&val).all(|(a, b)| a.image != b.image));
    }

    #[test]
    fn pixels_show_the_objects_and_relations_follow_the_rules() {
        for i in 0..100 {
            let s = generate(Split::Train, i, 5);
            let (w, h) = s.image.dimensions();
            for o in &s.graph.objects {
                // The box's centre row holds pixels of the object's colour
                // (unless a later object covers them: a majority check would
                // be too strict, so look for any).
                let (_, colour) = SHAPES[SYNTHETIC.objects.iter().position(|c| *c == o.category).unwrap()];
                let y = (((o.bbox[1] + o.bbox[3]) / 2.0) * h as f32) as u32;
                let (x0, x1) = ((o.bbox[0] * w as f32) as u32, (o.bbox[2] * w as f32) as u32);
                let near_colour = (x0..x1).any(|x| {
                    let p = s.image.get_pixel(x, y).0;
                    p.iter()
                        .zip(colour)
                        .all(|(a, b)| (*a as i32 - b as i32).abs() <= JITTER as i32)
                });
                assert!(near_colour, "{}: {} not visible", s.id, o.id);
            }
            for t in s.graph.triplets() {
                let (a, b) = (&s.graph.objects[t.subject].bbox, &s.graph.objects[t.object].bbox);
                match t.predicate {
                    "inside" => assert!(b[0] <= a[0] && a[2] <= b[2] && b[1] <= a[1] && a[3] <= b[3]),
                    "on" => assert!(iou(a, b) > 0.0),
                    "left of" => assert!(a[0] + a[2] <= b[0] + b[2]),
                    "above" => assert!(a[1] + a[3] <= b[1] + b[3]),
                    "bigger than" => {
                        assert!(crate::data::scene::area(a) >= 2.4 * crate::data::scene::area(b))
                    }
                    "near" => assert_eq!(iou(a, b), 0.0),
                    other => panic!("unexpected predicate {other}"),
                }
            }
        }
    }

    #[test]
    fn relation_rules_by_hand() {
        // On a 100-pixel canvas `near` means a gap of at most 8 pixels.
        let p = |[x0, y0, x1, y1]: [u32; 4]| Placed {
            category: 0,
            x0,
            y0,
            x1,
            y1,
        };
        let rel = |first: [u32; 4], second: [u32; 4]| relate(&[p(first), p(second)], 0, 1, 100);
        // Containment, whichever is drawn first.
        assert_eq!(rel([10, 10, 50, 50], [20, 20, 30, 30]), (1, "inside", 0));
        assert_eq!(rel([20, 20, 30, 30], [10, 10, 50, 50]), (0, "inside", 1));
        // Overlap: the later one is on the earlier one.
        assert_eq!(rel([10, 10, 50, 50], [40, 40, 70, 70]), (1, "on", 0));
        assert_eq!(rel([40, 40, 70, 70], [10, 10, 50, 50]), (1, "on", 0));
        // Boxes touching along an edge do not overlap: gap 0, near.
        assert_eq!(rel([10, 10, 30, 30], [30, 10, 50, 30]), (0, "near", 1));
        // Gap 8: near; gap 9: equal sizes, so left of.
        assert_eq!(rel([38, 10, 58, 30], [10, 10, 30, 30]), (1, "near", 0));
        assert_eq!(rel([39, 10, 59, 30], [10, 10, 30, 30]), (1, "left of", 0));
        // Vertical pairs: above, the upper one first.
        assert_eq!(rel([10, 60, 30, 80], [10, 10, 30, 30]), (1, "above", 0));
        assert_eq!(rel([10, 10, 30, 30], [12, 40, 32, 60]), (0, "above", 1));
        // Areas 2500 and 1000: ratio 2.5, bigger than; 2500 and 1050: not.
        assert_eq!(rel([80, 0, 100, 50], [0, 0, 50, 50]), (1, "bigger than", 0));
        assert_eq!(rel([79, 0, 100, 50], [0, 0, 50, 50]), (1, "left of", 0));
        // Near wins over bigger than.
        assert_eq!(rel([0, 0, 50, 50], [55, 0, 65, 10]), (0, "near", 1));
    }

    #[test]
    fn five_thousand_samples_in_seconds() {
        let start = std::time::Instant::now();
        let samples = generate_split(Split::Train, 5000, 1);
        let elapsed = start.elapsed();
        assert_eq!(samples.len(), 5000);
        // Debug builds are ~10x slower than release; both stay in seconds.
        assert!(elapsed.as_secs_f32() < 20.0, "{elapsed:?}");
    }

    #[test]
    fn resizing_keeps_the_graph() {
        let s = generate(Split::Shifted, 0, 1);
        let r = s.resized(64, 64);
        assert_eq!(r.image.dimensions(), (64, 64));
        assert_eq!(r.graph, s.graph);
    }
}
