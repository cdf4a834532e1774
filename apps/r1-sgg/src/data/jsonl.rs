//! R1-SGG's data on disk. [`load_jsonl`] reads the layout R1-SGG's data is exported
//! to: a JSONL file beside its image folder, one record per line (see its
//! docs for the fields); boxes are absolute `xyxy` pixels there and are
//! normalized here. [`write_jsonl`] writes samples back in that layout and
//! [`write_dataset`] writes the whole synthetic dataset with it, so it can be
//! inspected and fed back with `--data`.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use image::{ImageFormat, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::preview::render_preview;
use super::scene::{Object, Relation, SceneGraph, SYNTHETIC};
use super::synthetic::{generate, Layout, Split, BIGGER, JITTER, NEAR, SHAPES};
use super::{DataError, Sample};
use crate::util::fs::write_atomically;

/// Loads R1-SGG-style scene-graph data: a JSONL file, one record per
/// non-blank line, beside the images it names.
///
/// A record is a JSON object with
/// - `"image"`: the image's path, relative to the JSONL file's folder;
/// - `"image_id"` (optional, string or number): the sample's id, else
///   `"line N"`;
/// - `"width"`, `"height"` (optional, both or neither): the pixel frame the
///   boxes are written in, when the stored image was resized; else the
///   image's own size;
/// - `"objects"`: `[{"id": "man.1", "bbox": [x1, y1, x2, y2]}, ...]`,
///   absolute pixel boxes;
/// - `"relationships"`: `[{"subject": "man.1", "predicate": "riding",
///   "object": "horse.2"}, ...]`.
///
/// `objects` and `relationships` may also be JSON-encoded strings, as in
/// R1-SGG's Hugging Face datasets. Boxes are normalized by the frame and
/// clipped to it; a box with `x2 < x1` or `y2 < y1`, a duplicated id or a
/// relation naming an undefined object is an error naming the line.
pub fn load_jsonl(path: &Path) -> Result<Vec<Sample>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let folder = path.parent().unwrap_or(Path::new("."));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| load_record(path, folder, n + 1, l))
        .collect()
}

fn load_record(path: &Path, folder: &Path, line: usize, text: &str) -> Result<Sample, DataError> {
    let bad = |reason: String| DataError::Record {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let record: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let image_name = record
        .get("image")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing string field \"image\"".into()))?;
    let image_path = folder.join(image_name);
    let image = image::open(&image_path)
        .map_err(|e| DataError::Image {
            path: path.to_path_buf(),
            line,
            image: image_path.clone(),
            reason: e.to_string(),
        })?
        .to_rgb8();
    let id = match record.get("image_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("line {line}"),
    };
    let frame = match (record.get("width"), record.get("height")) {
        (None, None) => (image.width() as f64, image.height() as f64),
        (Some(w), Some(h)) => match (w.as_f64(), h.as_f64()) {
            (Some(w), Some(h)) if w > 0.0 && h > 0.0 => (w, h),
            _ => return Err(bad(format!("width {w} and height {h} must be positive numbers"))),
        },
        _ => return Err(bad("\"width\" and \"height\" must come together".into())),
    };
    let objects = embedded_list(&record, "objects")
        .map_err(&bad)?
        .iter()
        .enumerate()
        .map(|(i, o)| read_object(o, frame).map_err(|e| bad(format!("objects[{i}]: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let relations = embedded_list(&record, "relationships")
        .map_err(&bad)?
        .iter()
        .enumerate()
        .map(|(i, r)| read_relation(r).map_err(|e| bad(format!("relationships[{i}]: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let graph = SceneGraph { objects, relations };
    graph.check().map_err(bad)?;
    Ok(Sample { id, image, graph })
}

/// A list field, written either as a JSON array or as a string holding one.
pub(crate) fn embedded_list(record: &Value, key: &str) -> Result<Vec<Value>, String> {
    match record.get(key) {
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(Value::String(s)) => match serde_json::from_str(s) {
            Ok(Value::Array(items)) => Ok(items),
            Ok(_) => Err(format!("\"{key}\" holds a string that is not a JSON array")),
            Err(e) => Err(format!("\"{key}\" holds invalid JSON: {e}")),
        },
        Some(_) => Err(format!("\"{key}\" must be an array")),
        None => Err(format!("missing field \"{key}\"")),
    }
}

pub(crate) fn read_object(o: &Value, (w, h): (f64, f64)) -> Result<Object, String> {
    let id = o
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("needs a non-empty string \"id\"")?;
    let coords: Vec<f64> = match o.get("bbox").and_then(Value::as_array) {
        Some(b) if b.len() == 4 => b.iter().filter_map(Value::as_f64).collect(),
        _ => Vec::new(),
    };
    let &[x1, y1, x2, y2] = coords.as_slice() else {
        return Err(format!("{id:?} needs \"bbox\": [x1, y1, x2, y2] of 4 numbers"));
    };
    if x2 < x1 || y2 < y1 {
        return Err(format!("{id:?} has an inverted box {coords:?}"));
    }
    let norm = |v: f64, side: f64| (v / side).clamp(0.0, 1.0) as f32;
    Ok(Object::from_id(
        id,
        [norm(x1, w), norm(y1, h), norm(x2, w), norm(y2, h)],
    ))
}

pub(crate) fn read_relation(r: &Value) -> Result<Relation, String> {
    let field = |k: &str| {
        r.get(k).and_then(Value::as_str).ok_or(format!(
            "needs string fields \"subject\", \"predicate\", \"object\"; {k:?} is not"
        ))
    };
    Ok(Relation::new(
        field("subject")?,
        field("predicate")?,
        field("object")?,
    ))
}

/// One record as [`load_jsonl`] reads it, fields in the order written.
#[derive(Serialize)]
struct RecordOut<'a> {
    image_id: &'a str,
    image: String,
    width: u32,
    height: u32,
    objects: Vec<ObjectOut<'a>>,
    relationships: Vec<RelationOut<'a>>,
}

#[derive(Serialize)]
struct ObjectOut<'a> {
    id: &'a str,
    bbox: [Value; 4],
}

#[derive(Serialize)]
struct RelationOut<'a> {
    subject: &'a str,
    predicate: &'a str,
    object: &'a str,
}

/// A normalized coordinate as an absolute one on a `side`-pixel axis: the
/// nearest whole pixel when [`load_jsonl`] maps it back to the very same
/// `f32` (always so for the synthetic boxes, which are whole pixels), else
/// the exact product as a float. The float also comes back bit for bit:
/// `v * side` is exact in `f64` (a 24-bit mantissa times a side below
/// 2^29), JSON numbers round-trip exactly, and dividing by `side` gives `v`.
fn pixel(v: f32, side: u32) -> Value {
    let side = side as f64;
    let p = v as f64 * side;
    let whole = p.round();
    // The loader's arithmetic, exactly.
    if whole.abs() < 1e15 && (whole / side).clamp(0.0, 1.0) as f32 == v {
        Value::from(whole as i64)
    } else {
        Value::from(p)
    }
}

/// A safe, portable file stem for an id: ASCII letters, digits, `-`, `_`
/// and `.` are kept, anything else becomes `_`; a leading `.` becomes `_`
/// (no hidden files, no `..`); at most 100 characters; never empty nor a
/// reserved Windows device name (`con`, `nul`, `com1`, ...).
fn file_stem(id: &str) -> String {
    let mut stem: String = id
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.starts_with('.') {
        stem.replace_range(..1, "_");
    }
    let base = stem.split('.').next().unwrap_or("").to_ascii_lowercase();
    let reserved = matches!(base.as_str(), "con" | "prn" | "aux" | "nul")
        || ((base.starts_with("com") || base.starts_with("lpt"))
            && base.len() == 4
            && base.as_bytes()[3].is_ascii_digit());
    if reserved {
        stem.insert(0, '_');
    }
    if stem.is_empty() {
        stem.push_str("image");
    }
    stem
}

/// [`file_stem`] made unique among `used` (compared case-insensitively, for
/// case-insensitive file systems) by a `-2`, `-3`, ... suffix, and recorded.
pub(crate) fn unique_stem(id: &str, used: &mut HashSet<String>) -> String {
    let stem = file_stem(id);
    let mut name = stem.clone();
    let mut k = 1;
    while !used.insert(name.to_ascii_lowercase()) {
        k += 1;
        name = format!("{stem}-{k}");
    }
    name
}

/// Encodes `image` as PNG into `path`.
fn write_png(image: &RgbImage, path: &Path) -> Result<(), DataError> {
    let fail = |source| DataError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
        .map_err(|e| fail(std::io::Error::other(e)))?;
    std::fs::write(path, png).map_err(fail)
}

/// Writes one split in R1-SGG's layout, a chunk of samples at a time:
/// images as they come, the JSONL file at the end.
struct SplitWriter {
    /// `dir/<split>.jsonl`.
    jsonl: PathBuf,
    /// `dir/images/<split>`.
    images: PathBuf,
    /// `images/<split>`, as written in records.
    relative: String,
    /// Lowercased file stems already taken.
    used: HashSet<String>,
    /// The records so far, one per line.
    lines: String,
    /// What was written so far.
    counts: Counts,
}

/// Samples, objects, relations and relations by predicate written.
#[derive(Debug, Clone, Default)]
struct Counts {
    samples: usize,
    objects: usize,
    relations: usize,
    predicates: BTreeMap<String, usize>,
}

impl SplitWriter {
    fn new(dir: &Path, split: &str) -> Result<Self, DataError> {
        let split = file_stem(split);
        let images = dir.join("images").join(&split);
        std::fs::create_dir_all(&images).map_err(|source| DataError::Write {
            path: images.clone(),
            source,
        })?;
        Ok(SplitWriter {
            jsonl: dir.join(format!("{split}.jsonl")),
            images,
            relative: format!("images/{split}"),
            used: HashSet::new(),
            lines: String::new(),
            counts: Counts::default(),
        })
    }

    /// Writes the images of `samples` (in parallel, ticking `progress` once
    /// per image) and keeps their records.
    fn add(&mut self, samples: &[Sample], progress: &ProgressBar) -> Result<(), DataError> {
        let names: Vec<String> = samples
            .iter()
            .map(|s| unique_stem(&s.id, &mut self.used))
            .collect();
        let lines = samples
            .par_iter()
            .zip(names.par_iter())
            .map(|(s, name)| {
                write_png(&s.image, &self.images.join(format!("{name}.png")))?;
                progress.inc(1);
                Ok(record_line(s, format!("{}/{name}.png", self.relative)))
            })
            .collect::<Result<Vec<String>, DataError>>()?;
        for line in lines {
            self.lines.push_str(&line);
            self.lines.push('\n');
        }
        for s in samples {
            self.counts.samples += 1;
            self.counts.objects += s.graph.objects.len();
            self.counts.relations += s.graph.relations.len();
            for r in &s.graph.relations {
                *self.counts.predicates.entry(r.predicate.clone()).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Writes the JSONL file (atomically) and returns its path.
    fn finish(self) -> Result<PathBuf, DataError> {
        write_atomically(&self.jsonl, self.lines.as_bytes()).map_err(|source| DataError::Write {
            path: self.jsonl.clone(),
            source,
        })?;
        Ok(self.jsonl)
    }
}

/// The JSONL line of a sample whose image is at `image` (relative to the
/// JSONL file).
fn record_line(s: &Sample, image: String) -> String {
    let (w, h) = s.image.dimensions();
    let record = RecordOut {
        image_id: &s.id,
        image,
        width: w,
        height: h,
        objects: s
            .graph
            .objects
            .iter()
            .map(|o| ObjectOut {
                id: &o.id,
                bbox: [
                    pixel(o.bbox[0], w),
                    pixel(o.bbox[1], h),
                    pixel(o.bbox[2], w),
                    pixel(o.bbox[3], h),
                ],
            })
            .collect(),
        relationships: s
            .graph
            .relations
            .iter()
            .map(|r| RelationOut {
                subject: &r.subject,
                predicate: &r.predicate,
                object: &r.object,
            })
            .collect(),
    };
    // Plain structs of strings, integers and JSON values always serialize.
    serde_json::to_string(&record).expect("a record serializes")
}

/// Writes samples in R1-SGG's layout, the one [`load_jsonl`] reads: each
/// image as `dir/images/<split>/<image_id>.png` and one record per sample,
/// in order, to `dir/<split>.jsonl`; returns that file's path.
///
/// A record holds the sample's id as `"image_id"`, the image path relative
/// to the JSONL file, `"width"` and `"height"` (the image's size), the
/// objects with absolute pixel `xyxy` boxes (integers when exact, as for the
/// synthetic scenes, else floats) and the relationships. Loading the file
/// gives back the same samples: ids, images (PNG is lossless), objects and
/// boxes (bit for bit) and relations, provided each object's id names its
/// category (`"circle.1"`), as the loader reads the category from the id,
/// and the graph passes [`SceneGraph::check`].
///
/// Image file names are the ids made safe (ASCII letters, digits, `-`, `_`,
/// `.`; anything else `_`; no leading dot; at most 100 characters) and
/// unique (a `-2`, `-3`, ... suffix, compared case-insensitively); `split`
/// is made safe the same way. Folders are created as needed and existing
/// files are overwritten; the JSONL file is written to a temporary file and
/// renamed, so it is never seen half-written. A file or folder that cannot
/// be written is a [`DataError::Write`] naming it.
pub fn write_jsonl(samples: &[Sample], dir: &Path, split: &str) -> Result<PathBuf, DataError> {
    let mut writer = SplitWriter::new(dir, split)?;
    writer.add(samples, &ProgressBar::hidden())?;
    writer.finish()
}

/// Generates the synthetic dataset and writes it to `dir` in R1-SGG's
/// layout (see [`write_jsonl`]), to inspect it or train on it with
/// `--data dir/train.jsonl`.
///
/// For each `(split, count)` of `sizes`, in order, samples `0..count` of the
/// split (the same as [`generate_split`](super::synthetic::generate_split)`(split, count, seed)`, generated a
/// chunk at a time to bound memory) are written to `dir/<split>.jsonl` and
/// `dir/images/<split>/`, and the first 16 of them, boxes outlined, to
/// `dir/preview_<split>.png` ([`render_preview`]). Then `dir/README.md`
/// describes the layout, the [`SYNTHETIC`] vocabulary and each split's
/// statistics ([`Split::config`] and the counts written). A progress bar
/// on stderr counts the images. Returns the JSONL paths, in the order of
/// `sizes`; errors are [`DataError::Write`] naming the file or folder.
pub fn write_dataset(dir: &Path, sizes: &[(Split, usize)], seed: u64) -> Result<Vec<PathBuf>, DataError> {
    const CHUNK: usize = 256;
    const PREVIEW: usize = 16;
    let bar = ProgressBar::new(sizes.iter().map(|&(_, n)| n as u64).sum());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>7} [{bar:30}] {pos}/{len} images {elapsed_precise} (eta {eta})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut paths = Vec::with_capacity(sizes.len());
    let mut written = Vec::with_capacity(sizes.len());
    let mut example = None;
    for &(split, count) in sizes {
        bar.set_prefix(split.name());
        let mut writer = SplitWriter::new(dir, split.name())?;
        let mut preview = Vec::new();
        for start in (0..count).step_by(CHUNK) {
            let chunk: Vec<Sample> = (start..(start + CHUNK).min(count))
                .into_par_iter()
                .map(|i| generate(split, i, seed))
                .collect();
            writer.add(&chunk, &bar)?;
            if start == 0 {
                preview = chunk[..chunk.len().min(PREVIEW)].to_vec();
            }
        }
        if example.is_none() {
            example = writer.lines.lines().next().map(|l| (split, l.to_string()));
        }
        if !preview.is_empty() {
            write_png(
                &render_preview(&preview, 4, 2),
                &dir.join(format!("preview_{}.png", split.name())),
            )?;
        }
        written.push((split, writer.counts.clone()));
        paths.push(writer.finish()?);
    }
    bar.finish();
    let readme = dataset_readme(seed, &written, example.as_ref());
    let readme_path = dir.join("README.md");
    write_atomically(&readme_path, readme.as_bytes()).map_err(|source| DataError::Write {
        path: readme_path,
        source,
    })?;
    Ok(paths)
}

/// The README of a written dataset: `written` holds what was written of
/// each split; `example` a split and its first record.
fn dataset_readme(seed: u64, written: &[(Split, Counts)], example: Option<&(Split, String)>) -> String {
    let mut md = String::new();
    // Writing to a String cannot fail.
    let mut line = |text: &str| {
        let _ = writeln!(md, "{text}");
    };
    line("# Synthetic scene graphs in R1-SGG's layout");
    line("");
    line(&format!(
        "Written by the `r1_sgg` example's `data` subcommand with seed {seed}. Sample `i` of a \
         split is generated from `(seed, split, i)` alone, so the same seed writes the same files. \
         Train or evaluate on a split with `--data <this folder>/<split>.jsonl`."
    ));
    line("");
    line("## Layout");
    line("");
    line("```text");
    line("README.md                    this file");
    for (split, counts) in written {
        let name = split.name();
        let row = |path: String, what: &str| format!("{path:<28} {what}");
        line(&row(format!("{name}.jsonl"), "one record per line"));
        line(&row(
            format!("images/{name}/"),
            "the images, named after their image_id",
        ));
        if counts.samples > 0 {
            line(&row(
                format!("preview_{name}.png"),
                "its first samples, boxes outlined",
            ));
        }
    }
    line("```");
    line("");
    line("Each record is one JSON object:");
    line("");
    line("- `image_id`: the sample's name (`train-000042`);");
    line("- `image`: the image's path, relative to the JSONL file;");
    line("- `width`, `height`: the image's size in pixels, the frame of the boxes;");
    line(
        "- `objects`: `[{\"id\": \"circle.1\", \"bbox\": [x1, y1, x2, y2]}, ...]`, ids `category.N` \
         numbered in reading order (top to bottom, then left to right), boxes in absolute pixels \
         (`x2`, `y2` exclusive: the shape covers pixels `x1..x2`);",
    );
    line(
        "- `relationships`: `[{\"subject\": \"star.2\", \"predicate\": \"inside\", \"object\": \
         \"square.1\"}, ...]`, naming objects by id, sorted by subject then object.",
    );
    if let Some((split, record)) = example {
        line("");
        line(&format!("The first record of `{}.jsonl`:", split.name()));
        line("");
        line("```json");
        line(record);
        line("```");
    }
    line("");
    line(&format!("## Vocabulary (`{}`)", SYNTHETIC.name));
    line("");
    line(&format!(
        "{} object categories, each the shape of its name drawn in its own colour (each channel \
         jittered by up to {JITTER}) on a dark noisy background; every shape reaches all four sides \
         of its box:",
        SYNTHETIC.objects.len()
    ));
    line("");
    line("| category | base colour (RGB) |");
    line("|---|---|");
    for (name, (_, [r, g, b])) in SYNTHETIC.objects.iter().zip(SHAPES) {
        line(&format!("| {name} | {r}, {g}, {b} |"));
    }
    line("");
    line(&format!(
        "{} predicates, computed from geometry and drawing order for the closest pairs of objects \
         (by centre distance); a pair gets the first that holds:",
        SYNTHETIC.predicates.len()
    ));
    line("");
    line("| predicate | holds when | subject |");
    line("|---|---|---|");
    for predicate in SYNTHETIC.predicates {
        let (when, subject) = match *predicate {
            "inside" => ("one box contains the other".to_string(), "the contained one"),
            "on" => ("the boxes overlap".to_string(), "the one drawn on top"),
            "near" => (
                format!("the gap between the boxes is at most {NEAR} of the side"),
                "the left one, or the upper one if the pair is more vertical",
            ),
            "bigger than" => (
                format!("one area is at least {BIGGER} times the other"),
                "the bigger one",
            ),
            "left of" => (
                "the pair is more horizontal than vertical".to_string(),
                "the left one",
            ),
            "above" => ("otherwise".to_string(), "the upper one"),
            _ => ("see `data.rs`".to_string(), "see `data.rs`"),
        };
        line(&format!("| {predicate} | {when} | {subject} |"));
    }
    line("");
    line("## Splits");
    line("");
    line(
        "Train, val and test share one distribution (disjoint seeds); shifted draws from other \
         statistics to measure out-of-distribution generalization.",
    );
    line("");
    line(
        "| split | images | objects / image | relations / image | canvas | objects tried | object side \
         | layout | P(inside) | max overlap | max relations |",
    );
    line("|---|---|---|---|---|---|---|---|---|---|---|");
    for (split, counts) in written {
        let cfg = split.config();
        let mean = |n: usize| match counts.samples {
            0 => "-".to_string(),
            images => format!("{:.2}", n as f64 / images as f64),
        };
        let layout = match cfg.layout {
            Layout::Uniform => "uniform".to_string(),
            Layout::Clustered { spread } => {
                format!("within {:.0}% of the side of a random point", spread * 100.0)
            }
        };
        line(&format!(
            "| {} | {} | {} | {} | {c}x{c} | {}-{} | {:.0}%-{:.0}% of the side | {layout} | {} | {} | {} |",
            split.name(),
            counts.samples,
            mean(counts.objects),
            mean(counts.relations),
            cfg.objects.0,
            cfg.objects.1,
            cfg.size.0 * 100.0,
            cfg.size.1 * 100.0,
            cfg.inside_prob,
            cfg.max_overlap,
            cfg.max_relations,
            c = cfg.canvas,
        ));
    }
    line("");
    line("Relations by predicate, as a share of each split's relations:");
    line("");
    line(&format!("| split | {} |", SYNTHETIC.predicates.join(" | ")));
    line(&format!("|---|{}", "---|".repeat(SYNTHETIC.predicates.len())));
    for (split, counts) in written {
        let shares: Vec<String> = SYNTHETIC
            .predicates
            .iter()
            .map(|p| match counts.relations {
                0 => "-".to_string(),
                total => {
                    let n = counts.predicates.get(*p).copied().unwrap_or(0);
                    format!("{:.1}%", 100.0 * n as f64 / total as f64)
                }
            })
            .collect();
        line(&format!("| {} | {} |", split.name(), shares.join(" | ")));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::generate_split;
    use crate::util::fs::temp_dir;
    use image::Rgb;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
    }

    #[test]
    fn loads_the_fixture() {
        let samples = load_jsonl(&fixture("scenes.jsonl")).unwrap();
        assert_eq!(samples.len(), 3);
        // Line 1: image 48x32, man.1 at [6, 4, 24, 28] px.
        let s = &samples[0];
        assert_eq!(s.id, "2343");
        assert_eq!(s.image.dimensions(), (48, 32));
        let man = &s.graph.objects[0];
        assert_eq!((man.id.as_str(), man.category.as_str()), ("man.1", "man"));
        assert_eq!(man.bbox, [6.0 / 48.0, 4.0 / 32.0, 24.0 / 48.0, 28.0 / 32.0]);
        assert_eq!(s.graph.relations[0], Relation::new("man.1", "riding", "horse.2"));
        // Line 2 stores objects and relationships as JSON strings, with a
        // numeric image id and a box past the right edge (clipped to 1).
        let s = &samples[1];
        assert_eq!(s.id, "17");
        assert_eq!(s.graph.objects.len(), 3);
        assert_eq!(s.graph.objects[2].bbox[2], 1.0);
        assert_eq!(s.graph.relations.len(), 2);
        // Line 3 gives a 96x64 frame for a 48x32 image: boxes halve.
        let s = &samples[2];
        assert_eq!(s.graph.objects[0].bbox, [0.25, 0.25, 0.5, 0.75]);
        for s in &samples {
            s.graph.check().unwrap();
        }
    }

    /// Writes `lines` as a JSONL file in a fresh temporary folder holding a
    /// copy of the fixture images, and loads it.
    fn load_lines(name: &str, lines: &[&str]) -> Result<Vec<Sample>, DataError> {
        let dir = std::env::temp_dir().join(format!("r1_sgg_data_{name}_{}", std::process::id()));
        std::fs::create_dir_all(dir.join("images")).unwrap();
        for f in std::fs::read_dir(fixture("images")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join("images").join(f.file_name().unwrap())).unwrap();
        }
        std::fs::write(dir.join("images/corrupt.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        std::fs::write(dir.join("data.jsonl"), lines.join("\n")).unwrap();
        let result = load_jsonl(&dir.join("data.jsonl"));
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let missing = load_jsonl(Path::new("/nonexistent/r1_sgg.jsonl")).unwrap_err();
        assert!(matches!(missing, DataError::Io { .. }), "{missing}");
        assert!(missing.to_string().contains("/nonexistent/r1_sgg.jsonl"));

        let ok = r#"{"image": "images/1.png", "objects": [{"id": "a.1", "bbox": [1, 1, 5, 5]}], "relationships": []}"#;
        let cases: &[(&str, &str)] = &[
            (
                r#"{"image": "images/nope.png", "objects": [], "relationships": []}"#,
                "nope.png",
            ),
            (
                r#"{"image": "images/corrupt.png", "objects": [], "relationships": []}"#,
                "corrupt.png",
            ),
            (r#"{"image": "images/1.png", "objects": [}"#, "invalid JSON"),
            (r#"{"objects": [], "relationships": []}"#, "\"image\""),
            (
                r#"{"image": "images/1.png", "relationships": []}"#,
                "missing field \"objects\"",
            ),
            (
                r#"{"image": "images/1.png", "objects": "[{", "relationships": []}"#,
                "\"objects\" holds invalid JSON",
            ),
            (
                r#"{"image": "images/1.png", "objects": 3, "relationships": []}"#,
                "must be an array",
            ),
            (
                r#"{"image": "images/1.png", "objects": [{"bbox": [1, 1, 5, 5]}], "relationships": []}"#,
                "objects[0]",
            ),
            (
                r#"{"image": "images/1.png", "objects": [{"id": "a.1", "bbox": [1, 1, 5]}], "relationships": []}"#,
                "4 numbers",
            ),
            (
                r#"{"image": "images/1.png", "objects": [{"id": "a.1", "bbox": [1, "1", 5, 5]}], "relationships": []}"#,
                "4 numbers",
            ),
            (
                r#"{"image": "images/1.png", "objects": [{"id": "a.1", "bbox": [5, 1, 1, 5]}], "relationships": []}"#,
                "inverted",
            ),
            (
                r#"{"image": "images/1.png", "objects": [{"id": "a.1", "bbox": [1, 1, 5, 5]}, {"id": "a.1", "bbox": [1, 1, 5, 5]}], "relationships": []}"#,
                "share the id",
            ),
            (
                r#"{"image": "images/1.png", "objects": [{"id": "a.1", "bbox": [1, 1, 5, 5]}], "relationships": [{"subject": "a.1", "predicate": "on", "object": "b.2"}]}"#,
                "undefined object \"b.2\"",
            ),
            (
                r#"{"image": "images/1.png", "objects": [{"id": "a.1", "bbox": [1, 1, 5, 5]}], "relationships": [{"subject": "a.1", "object": "a.1"}]}"#,
                "\"predicate\"",
            ),
            (
                r#"{"image": "images/1.png", "width": 10, "objects": [], "relationships": []}"#,
                "together",
            ),
            (
                r#"{"image": "images/1.png", "width": 0, "height": 5, "objects": [], "relationships": []}"#,
                "positive",
            ),
        ];
        for (k, (line, needle)) in cases.iter().enumerate() {
            // The bad record is on line 2, after a good one.
            let err = load_lines(&format!("case{k}"), &[ok, line]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(":2:") && msg.contains(needle), "case {k}: {msg}");
        }
        let image_err = load_lines(
            "image",
            &[r#"{"image": "images/nope.png", "objects": [], "relationships": []}"#],
        );
        assert!(matches!(image_err, Err(DataError::Image { line: 1, .. })));
        assert_eq!(load_lines("blank", &["", ok, "   "]).unwrap().len(), 1);
    }

    /// Asserts `loaded` is `written` read back: ids, images, object ids,
    /// categories, boxes (within 1e-6) and relations.
    fn assert_same(written: &[Sample], loaded: &[Sample]) {
        assert_eq!(written.len(), loaded.len());
        for (a, b) in written.iter().zip(loaded) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.image, b.image, "{}: pixels differ", a.id);
            assert_eq!(a.graph.objects.len(), b.graph.objects.len(), "{}", a.id);
            for (x, y) in a.graph.objects.iter().zip(&b.graph.objects) {
                assert_eq!((&x.id, &x.category), (&y.id, &y.category), "{}", a.id);
                for (u, v) in x.bbox.iter().zip(y.bbox) {
                    assert!(
                        (u - v).abs() <= 1e-6,
                        "{}: {} box {:?} vs {:?}",
                        a.id,
                        x.id,
                        x.bbox,
                        y.bbox
                    );
                }
            }
            assert_eq!(a.graph.relations, b.graph.relations, "{}", a.id);
        }
    }

    #[test]
    fn written_splits_load_back_unchanged() {
        let dir = temp_dir("round_trip");
        for split in Split::ALL {
            let samples = generate_split(split, 40, 9);
            let path = write_jsonl(&samples, &dir, split.name()).unwrap();
            assert_eq!(path, dir.join(format!("{}.jsonl", split.name())));
            let loaded = load_jsonl(&path).unwrap();
            assert_same(&samples, &loaded);
            // Synthetic boxes are whole pixels, written as integers, and
            // come back bit for bit.
            assert!(samples.iter().zip(&loaded).all(|(a, b)| a.graph == b.graph));
            let first = std::fs::read_to_string(&path).unwrap();
            let first: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
            assert_eq!(first["image"], format!("images/{0}/{0}-000000.png", split.name()));
            // Every coordinate is a whole number.
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let record: Value = serde_json::from_str(line).unwrap();
                for o in record["objects"].as_array().unwrap() {
                    assert!(o["bbox"].as_array().unwrap().iter().all(Value::is_u64), "{line}");
                }
            }
            assert_eq!(first["width"], split.config().canvas);
        }
        // Rewriting replaces the file; no temporary file is left behind.
        write_jsonl(&generate_split(Split::Val, 3, 1), &dir, "val").unwrap();
        assert_eq!(load_jsonl(&dir.join("val.jsonl")).unwrap().len(), 3);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn odd_ids_and_fractional_boxes_round_trip() {
        let dir = temp_dir("odd_ids");
        let ids = [
            "a/b",
            "a_b",
            "A_B",
            "../escape",
            "",
            ".hidden",
            "con",
            "COM1.x",
            "héllo wörld",
            "x:y*z?",
            "same",
            "same",
            "same-2",
        ];
        let long = "x".repeat(300);
        let samples: Vec<Sample> = ids
            .iter()
            .copied()
            .chain([long.as_str()])
            .enumerate()
            .map(|(k, id)| {
                let mut s = generate(Split::Train, k, 4).resized(37, 23);
                s.id = id.to_string();
                // Boxes that are no whole pixel on a 37x23 image.
                s.graph.objects[0].bbox = [0.123_456_7, 1.0 / 3.0, 0.987_654_3, 0.999_999_9];
                s
            })
            .collect();
        let path = write_jsonl(&samples, &dir, "odd/split").unwrap();
        assert_eq!(path, dir.join("odd_split.jsonl"));
        let loaded = load_jsonl(&path).unwrap();
        assert_same(&samples, &loaded);
        assert!(samples.iter().zip(&loaded).all(|(a, b)| a.graph == b.graph));
        let first = std::fs::read_to_string(&path).unwrap();
        let first: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        assert!(first["objects"][0]["bbox"][0].is_f64(), "{first}");
        assert_eq!(first["image_id"], "a/b");
        assert_eq!(first["image"], "images/odd_split/a_b.png");
        // One safe, distinct file per sample, all inside the split's folder.
        let files: Vec<String> = std::fs::read_dir(dir.join("images/odd_split"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), samples.len(), "{files:?}");
        let lower: HashSet<String> = files.iter().map(|f| f.to_ascii_lowercase()).collect();
        assert_eq!(lower.len(), files.len(), "{files:?}");
        for f in &files {
            assert!(
                !f.starts_with('.') && f.ends_with(".png") && f.len() <= 110,
                "{f}"
            );
            assert!(
                f.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "{f}"
            );
        }
        assert_eq!(file_stem("a/b"), "a_b");
        assert_eq!(file_stem("../escape"), "_._escape");
        assert_eq!(file_stem(""), "image");
        assert_eq!(file_stem("nul"), "_nul");
        assert_eq!(file_stem("Com3.txt"), "_Com3.txt");
        assert_eq!(file_stem("com"), "com");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_folders_give_typed_errors() {
        let dir = temp_dir("blocked");
        std::fs::create_dir_all(&dir).unwrap();
        // A plain file where a folder should go: fails even for root.
        let blocker = dir.join("file");
        std::fs::write(&blocker, b"not a folder").unwrap();
        let target = blocker.join("data");
        let samples = generate_split(Split::Train, 2, 1);
        let err = write_jsonl(&samples, &target, "train").unwrap_err();
        assert!(
            matches!(&err, DataError::Write { path, .. } if path.starts_with(&target)),
            "{err:?}"
        );
        assert!(err.to_string().contains(&*target.to_string_lossy()), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        let err = write_dataset(&target, &[(Split::Train, 2)], 1).unwrap_err();
        assert!(matches!(err, DataError::Write { .. }), "{err:?}");
        // A folder where the JSONL file should go: the rename fails.
        let dir2 = dir.join("ok");
        std::fs::create_dir_all(dir2.join("train.jsonl/inner")).unwrap();
        let err = write_jsonl(&samples, &dir2, "train").unwrap_err();
        assert!(
            matches!(&err, DataError::Write { path, .. } if path.ends_with("train.jsonl")),
            "{err:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_a_dataset_with_readme_and_previews() {
        let dir = temp_dir("dataset");
        let sizes = [
            (Split::Train, 300),
            (Split::Val, 3),
            (Split::Test, 0),
            (Split::Shifted, 5),
        ];
        let paths = write_dataset(&dir, &sizes, 21).unwrap();
        let names: Vec<PathBuf> = Split::ALL
            .iter()
            .map(|s| dir.join(format!("{}.jsonl", s.name())))
            .collect();
        assert_eq!(paths, names);
        for (&(split, count), path) in sizes.iter().zip(&paths) {
            // Written in chunks, the same as generated at once.
            assert_same(&generate_split(split, count, 21), &load_jsonl(path).unwrap());
            let preview = dir.join(format!("preview_{}.png", split.name()));
            if count > 0 {
                let img = image::open(&preview).unwrap().to_rgb8();
                let want = render_preview(&generate_split(split, count.min(16), 21), 4, 2);
                assert_eq!(img, want);
            } else {
                assert!(!preview.exists());
            }
        }
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        for word in SYNTHETIC.objects.iter().chain(SYNTHETIC.predicates) {
            assert!(readme.contains(&format!("| {word} |")), "{word}");
        }
        assert!(readme.contains("seed 21"));
        assert!(readme.contains("| train | 300 |"), "{readme}");
        assert!(readme.contains("| shifted | 5 |") && readme.contains("96x96"));
        assert!(readme.contains("images/val/") && readme.contains("preview_val.png"));
        assert!(readme.contains("images/test/") && !readme.contains("preview_test.png"));
        assert!(readme.contains("\"image_id\":\"train-000000\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Rewrites the fixture images (run with `--ignored` after changing them).
    #[test]
    #[ignore]
    fn write_fixture_images() {
        let dir = fixture("images");
        std::fs::create_dir_all(&dir).unwrap();
        let rect = |img: &mut RgbImage, [x0, y0, x1, y1]: [u32; 4], c: [u8; 3]| {
            for y in y0..y1.min(img.height()) {
                for x in x0..x1.min(img.width()) {
                    img.put_pixel(x, y, Rgb(c));
                }
            }
        };
        let mut a = RgbImage::from_pixel(48, 32, Rgb([120, 170, 90]));
        rect(&mut a, [20, 14, 46, 30], [110, 70, 30]); // horse
        rect(&mut a, [6, 4, 24, 28], [200, 160, 140]); // man
        a.save(dir.join("1.png")).unwrap();
        let mut b = RgbImage::from_pixel(40, 40, Rgb([150, 190, 230]));
        rect(&mut b, [2, 20, 30, 38], [140, 100, 60]); // table
        rect(&mut b, [8, 10, 16, 20], [240, 240, 240]); // cup
        rect(&mut b, [30, 5, 40, 35], [200, 40, 40]); // chair, past the edge
        b.save(dir.join("2.png")).unwrap();
        let mut c = RgbImage::from_pixel(48, 32, Rgb([60, 60, 70]));
        rect(&mut c, [12, 8, 24, 24], [230, 200, 40]); // lamp, in a 96x64 frame
        c.save(dir.join("3.png")).unwrap();
    }
}
