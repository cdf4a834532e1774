//! The synthetic dataset written to disk in either of R1-SGG's layouts
//! ([`DatasetFormat`]): every split, a preview of each, and a README with
//! the layout, the vocabulary and each split's statistics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use super::jsonl::{write_png, SplitWriter};
use super::parquet::{ShardWriter, ROW_GROUP_ROWS};
use super::preview::render_preview;
use super::record::{objects_out, relations_out};
use super::scene::SYNTHETIC;
use super::synthetic::{generate, Layout, Split, BIGGER, JITTER, NEAR, SHAPES};
use super::{DataError, Sample};
use crate::util::fs::write_atomically;

/// The layout [`write_dataset`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DatasetFormat {
    /// R1-SGG's JSONL export: `<split>.jsonl` beside `images/<split>/*.png`
    /// ([`write_jsonl`](super::jsonl::write_jsonl)).
    #[default]
    Jsonl,
    /// R1-SGG's Hugging Face layout: one `<split>.parquet` shard per split,
    /// images embedded ([`write_parquet`](super::parquet::write_parquet)).
    Parquet,
}

/// Samples, objects, relations and relations by predicate written.
#[derive(Debug, Clone, Default)]
struct Counts {
    samples: usize,
    objects: usize,
    relations: usize,
    predicates: BTreeMap<String, usize>,
}

impl Counts {
    fn add(&mut self, samples: &[Sample]) {
        for s in samples {
            self.samples += 1;
            self.objects += s.graph.objects.len();
            self.relations += s.graph.relations.len();
            for r in &s.graph.relations {
                *self.predicates.entry(r.predicate.clone()).or_default() += 1;
            }
        }
    }
}

/// One split being written, in either layout.
enum Sink {
    Jsonl(SplitWriter),
    // Boxed: the arrow writer is large, and a split has one sink.
    Parquet(Box<ShardWriter>),
}

impl Sink {
    fn create(dir: &Path, split: Split, format: DatasetFormat) -> Result<Self, DataError> {
        Ok(match format {
            DatasetFormat::Jsonl => Sink::Jsonl(SplitWriter::new(dir, split.name())?),
            DatasetFormat::Parquet => {
                let path = dir.join(format!("{}.parquet", split.name()));
                Sink::Parquet(Box::new(ShardWriter::create(&path)?))
            }
        })
    }

    fn add(&mut self, samples: &[Sample], progress: &ProgressBar) -> Result<(), DataError> {
        match self {
            Sink::Jsonl(w) => w.add(samples, progress),
            Sink::Parquet(w) => w.add(samples, progress),
        }
    }

    fn finish(self) -> Result<PathBuf, DataError> {
        match self {
            Sink::Jsonl(w) => w.finish(),
            Sink::Parquet(w) => w.finish(),
        }
    }
}

/// How the README shows a split's first sample: its JSONL record, or its
/// parquet row's columns (the image's bytes left out).
fn example_text(sink: &Sink, first: &Sample) -> String {
    match sink {
        Sink::Jsonl(w) => w.first_line().unwrap_or_default().to_string(),
        Sink::Parquet(_) => {
            let json = |v: Result<String, serde_json::Error>| v.unwrap_or_default();
            format!(
                "image_id: {}\nobjects: {}\nrelationships: {}",
                first.id,
                json(serde_json::to_string(&objects_out(first))),
                json(serde_json::to_string(&relations_out(first))),
            )
        }
    }
}

/// Generates the synthetic dataset and writes it to `dir` in one of
/// R1-SGG's layouts, to inspect it or train on it with
/// `--data dir/train.jsonl` or `--data dir/train.parquet`.
///
/// For each `(split, count)` of `sizes`, in order, samples `0..count` of the
/// split (the same as [`generate_split`](super::synthetic::generate_split)`(split, count, seed)`, generated a
/// chunk at a time to bound memory) are written to `dir/<split>.jsonl` and
/// `dir/images/<split>/` ([`DatasetFormat::Jsonl`]) or to
/// `dir/<split>.parquet` ([`DatasetFormat::Parquet`]), and the first 16 of
/// them, boxes outlined, to `dir/preview_<split>.png` ([`render_preview`]).
/// Then `dir/README.md` describes the layout, the [`SYNTHETIC`] vocabulary
/// and each split's statistics ([`Split::config`] and the counts written).
/// A progress bar on stderr counts the images. Returns the written split
/// files' paths, in the order of `sizes`; errors are [`DataError::Write`]
/// naming the file or folder.
pub fn write_dataset(
    dir: &Path,
    sizes: &[(Split, usize)],
    seed: u64,
    format: DatasetFormat,
) -> Result<Vec<PathBuf>, DataError> {
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
        let mut sink = Sink::create(dir, split, format)?;
        let mut counts = Counts::default();
        let mut preview = Vec::new();
        for start in (0..count).step_by(CHUNK) {
            let chunk: Vec<Sample> = (start..(start + CHUNK).min(count))
                .into_par_iter()
                .map(|i| generate(split, i, seed))
                .collect();
            sink.add(&chunk, &bar)?;
            counts.add(&chunk);
            if start == 0 {
                preview = chunk[..chunk.len().min(PREVIEW)].to_vec();
            }
        }
        if let (None, Some(first)) = (&example, preview.first()) {
            example = Some((split, example_text(&sink, first)));
        }
        if !preview.is_empty() {
            write_png(
                &render_preview(&preview, 4, 2),
                &dir.join(format!("preview_{}.png", split.name())),
            )?;
        }
        written.push((split, counts));
        paths.push(sink.finish()?);
    }
    bar.finish();
    let readme = dataset_readme(seed, format, &written, example.as_ref());
    let readme_path = dir.join("README.md");
    write_atomically(&readme_path, readme.as_bytes()).map_err(|source| DataError::Write {
        path: readme_path,
        source,
    })?;
    Ok(paths)
}

/// The README of a written dataset: `written` holds what was written of
/// each split; `example` a split and its first record.
fn dataset_readme(
    seed: u64,
    format: DatasetFormat,
    written: &[(Split, Counts)],
    example: Option<&(Split, String)>,
) -> String {
    let mut md = String::new();
    // Writing to a String cannot fail.
    let mut line = |text: &str| {
        let _ = writeln!(md, "{text}");
    };
    let ext = match format {
        DatasetFormat::Jsonl => "jsonl",
        DatasetFormat::Parquet => "parquet",
    };
    line("# Synthetic scene graphs in R1-SGG's layout");
    line("");
    line(&format!(
        "Written by the `r1_sgg` example's `data` subcommand with seed {seed}. Sample `i` of a \
         split is generated from `(seed, split, i)` alone, so the same seed writes the same files. \
         Train or evaluate on a split with `--data <this folder>/<split>.{ext}`."
    ));
    line("");
    line("## Layout");
    line("");
    line("```text");
    line("README.md                    this file");
    for (split, counts) in written {
        let name = split.name();
        let row = |path: String, what: &str| format!("{path:<28} {what}");
        match format {
            DatasetFormat::Jsonl => {
                line(&row(format!("{name}.jsonl"), "one record per line"));
                line(&row(
                    format!("images/{name}/"),
                    "the images, named after their image_id",
                ));
            }
            DatasetFormat::Parquet => {
                line(&row(
                    format!("{name}.parquet"),
                    "one row per image, the image embedded",
                ));
            }
        }
        if counts.samples > 0 {
            line(&row(
                format!("preview_{name}.png"),
                "its first samples, boxes outlined",
            ));
        }
    }
    line("```");
    line("");
    match format {
        DatasetFormat::Jsonl => {
            line("Each record is one JSON object:");
            line("");
            line("- `image_id`: the sample's name (`train-000042`);");
            line("- `image`: the image's path, relative to the JSONL file;");
            line("- `width`, `height`: the image's size in pixels, the frame of the boxes;");
        }
        DatasetFormat::Parquet => {
            line(&format!(
                "The layout of R1-SGG's Hugging Face datasets (as its PSG sets: no prompt columns), \
                 snappy-compressed, {ROW_GROUP_ROWS} rows a row group, with the `huggingface` schema \
                 metadata `datasets` reads its features from. Each row:"
            ));
            line("");
            line("- `image`: `{bytes, path}`, the PNG's bytes and a file name (`datasets`' Image feature);");
            line("- `image_id`: the sample's name (`train-000042`), a string;");
            line("- `objects` and `relationships`: strings holding the JSON below; boxes are in pixels of the image;");
        }
    }
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
        line(&format!("The first record of `{}.{ext}`:", split.name()));
        line("");
        line(match format {
            DatasetFormat::Jsonl => "```json",
            DatasetFormat::Parquet => "```text",
        });
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
    use crate::data::source::{load_samples, DataSource};
    use crate::data::synthetic::generate_split;
    use crate::data::{assert_same, BadRows};
    use crate::util::fs::temp_dir;

    #[test]
    fn writes_a_dataset_with_readme_and_previews() {
        for format in [DatasetFormat::Jsonl, DatasetFormat::Parquet] {
            writes_a_dataset_as(format);
        }
    }

    fn writes_a_dataset_as(format: DatasetFormat) {
        let dir = temp_dir("dataset");
        let ext = match format {
            DatasetFormat::Jsonl => "jsonl",
            DatasetFormat::Parquet => "parquet",
        };
        let sizes = [
            (Split::Train, 300),
            (Split::Val, 3),
            (Split::Test, 0),
            (Split::Shifted, 5),
        ];
        let paths = write_dataset(&dir, &sizes, 21, format).unwrap();
        let names: Vec<PathBuf> = Split::ALL
            .iter()
            .map(|s| dir.join(format!("{}.{ext}", s.name())))
            .collect();
        assert_eq!(paths, names);
        for (&(split, count), path) in sizes.iter().zip(&paths) {
            // Written in chunks, the same as generated at once.
            let (loaded, skipped) =
                load_samples(&DataSource::resolve(path).unwrap(), BadRows::Fail, |s| s).unwrap();
            assert_same(&generate_split(split, count, 21), &loaded);
            assert_eq!(skipped.count, 0);
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
        assert!(readme.contains("preview_val.png") && !readme.contains("preview_test.png"));
        assert!(readme.contains(&format!("--data <this folder>/<split>.{ext}")));
        match format {
            DatasetFormat::Jsonl => {
                assert!(readme.contains("images/val/") && readme.contains("images/test/"));
                assert!(readme.contains("\"image_id\":\"train-000000\""));
            }
            DatasetFormat::Parquet => {
                assert!(readme.contains("val.parquet") && !readme.contains("images/"));
                assert!(readme.contains("image_id: train-000000\nobjects: [{\"id\":"));
                assert!(readme.contains("100 rows a row group"));
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_folders_give_typed_errors() {
        let dir = temp_dir("dataset_blocked");
        // A plain file where a folder should go: fails even for root.
        let blocker = dir.join("file");
        std::fs::write(&blocker, b"not a folder").unwrap();
        for format in [DatasetFormat::Jsonl, DatasetFormat::Parquet] {
            let err = write_dataset(&blocker.join("data"), &[(Split::Train, 2)], 1, format).unwrap_err();
            assert!(matches!(err, DataError::Write { .. }), "{err:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
