//! R1-SGG's data exported to JSONL. [`load_jsonl`] reads the layout R1-SGG's
//! data is exported to: a JSONL file beside its image folder, one record per
//! line (see its docs for the fields); boxes are absolute `xyxy` pixels there
//! and are normalized here. [`write_jsonl`] writes samples back in that
//! layout (as does [`write_dataset`](super::dataset::write_dataset) for the
//! whole synthetic dataset), so they can be inspected and fed back with
//! `--data`.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use image::{ImageFormat, RgbImage};
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::record::{objects_out, relations_out, scene_graph, ObjectOut, RelationOut};
use super::scene::add_labels;
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
/// relation naming an undefined object is an error naming the line (the
/// record rules of `data/record.rs`, which the parquet reader shares).
pub fn load_jsonl(path: &Path) -> Result<Vec<Sample>, DataError> {
    read_jsonl(path)?.collect()
}

/// [`load_jsonl`] one record at a time, through a [`JsonlIndex`]: each
/// record's line and image are read when the iterator reaches it, so a
/// consumer that keeps only a resized copy never holds every full-size
/// image at once. An unreadable file is the outer error; a bad record is an
/// item's ([`DataError::Record`] or [`DataError::Image`], naming the line).
pub fn read_jsonl(path: &Path) -> Result<impl Iterator<Item = Result<Sample, DataError>>, DataError> {
    let index = JsonlIndex::open(path)?;
    Ok((0..index.len()).map(move |i| index.get(i)))
}

/// Where each record of a JSONL file starts, found in one pass over the
/// file (12 bytes a record: its byte offset and line number), so any record
/// is read on demand ([`get`](Self::get)): its line, then its image. What
/// the training stream (`data/stream.rs`) reads a JSONL set through.
#[derive(Debug)]
pub struct JsonlIndex {
    path: PathBuf,
    folder: PathBuf,
    /// Byte offset of each record's line.
    offsets: Vec<u64>,
    /// Its 1-based line number.
    lines: Vec<u32>,
    /// The open file and the offset its reader stands at (sequential reads
    /// do not seek, so they keep the reader's buffer).
    file: Mutex<(BufReader<File>, u64)>,
}

impl JsonlIndex {
    /// Indexes the non-blank lines of `path` (reading it once, a buffer at
    /// a time). A file that cannot be opened or read is a [`DataError::Io`];
    /// records are not parsed here.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut reader = BufReader::with_capacity(1 << 16, File::open(path).map_err(io)?);
        let (mut offsets, mut lines) = (Vec::new(), Vec::new());
        let (mut offset, mut line) = (0u64, 0u32);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            line = line.checked_add(1).ok_or_else(|| DataError::Source {
                path: path.to_path_buf(),
                reason: "more than 4,294,967,295 lines".into(),
            })?;
            if !String::from_utf8_lossy(&buf).trim().is_empty() {
                offsets.push(offset);
                lines.push(line);
            }
            offset += n as u64;
        }
        let file = File::open(path).map_err(io)?;
        Ok(JsonlIndex {
            path: path.to_path_buf(),
            folder: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            offsets,
            lines,
            file: Mutex::new((BufReader::new(file), 0)),
        })
    }

    /// Records (non-blank lines), bad ones included.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The JSONL file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record `index`'s line, as text, and its line number. A line that is
    /// not UTF-8 is a [`DataError::Record`]; a read failure, [`DataError::Io`].
    fn line(&self, index: usize) -> Result<(usize, String), DataError> {
        let Some(&offset) = self.offsets.get(index) else {
            return Err(DataError::OutOfRange {
                index,
                len: self.len(),
            });
        };
        let line = self.lines[index] as usize;
        let io = |source| DataError::Io {
            path: self.path.clone(),
            source,
        };
        let mut buf = Vec::new();
        {
            let mut guard = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            let (reader, at) = &mut *guard;
            if *at != offset {
                reader.seek(SeekFrom::Start(offset)).map_err(io)?;
            }
            let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
            *at = offset + n as u64;
        }
        while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
            buf.pop();
        }
        let text = String::from_utf8(buf).map_err(|_| DataError::Record {
            path: self.path.clone(),
            line,
            reason: "the line is not UTF-8".into(),
        })?;
        Ok((line, text))
    }

    /// Record `index` (`0..len()`, in file order): its line read and parsed,
    /// its image read and decoded, as [`load_jsonl`] reads it. A bad record
    /// is a [`DataError::Record`] or [`DataError::Image`] naming its line;
    /// an index past the end, [`DataError::OutOfRange`].
    pub fn get(&self, index: usize) -> Result<Sample, DataError> {
        let (line, text) = self.line(index)?;
        load_record(&self.path, &self.folder, line, &text)
    }

    /// Every record's object categories and predicates, normalized
    /// ([`add_labels`]), from the lines alone (no image is read): what
    /// choosing the data's vocabulary needs. Records that cannot be read are
    /// left out here; reading their samples reports them.
    pub fn labels(&self, labels: &mut HashSet<String>) {
        for index in 0..self.len() {
            let Ok((_, text)) = self.line(index) else {
                continue;
            };
            let Ok(record) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            // Boxes are not needed: any frame serves.
            let graph = scene_graph(record.get("objects"), record.get("relationships"), (1.0, 1.0));
            if let Ok(graph) = graph {
                add_labels(&graph, labels);
            }
        }
    }
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
    let graph = scene_graph(record.get("objects"), record.get("relationships"), frame).map_err(bad)?;
    Ok(Sample { id, image, graph })
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

/// A safe, portable file stem for an id: ASCII letters, digits, `-`, `_`
/// and `.` are kept, anything else becomes `_`; a leading `.` becomes `_`
/// (no hidden files, no `..`); at most 100 characters; never empty nor a
/// reserved Windows device name (`con`, `nul`, `com1`, ...).
pub(super) fn file_stem(id: &str) -> String {
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
pub(super) fn write_png(image: &RgbImage, path: &Path) -> Result<(), DataError> {
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
pub(super) struct SplitWriter {
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
}

impl SplitWriter {
    pub(super) fn new(dir: &Path, split: &str) -> Result<Self, DataError> {
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
        })
    }

    /// Writes the images of `samples` (in parallel, ticking `progress` once
    /// per image) and keeps their records.
    pub(super) fn add(&mut self, samples: &[Sample], progress: &ProgressBar) -> Result<(), DataError> {
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
        Ok(())
    }

    /// The first record written, if any.
    pub(super) fn first_line(&self) -> Option<&str> {
        self.lines.lines().next()
    }

    /// Writes the JSONL file (atomically) and returns its path.
    pub(super) fn finish(self) -> Result<PathBuf, DataError> {
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
    let (width, height) = s.image.dimensions();
    let record = RecordOut {
        image_id: &s.id,
        image,
        width,
        height,
        objects: objects_out(s),
        relationships: relations_out(s),
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
/// and the graph passes [`SceneGraph::check`](super::scene::SceneGraph::check).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::assert_same;
    use crate::data::scene::Relation;
    use crate::data::synthetic::{generate, generate_split, Split};
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
