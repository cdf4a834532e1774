//! Scene-graph data: what a sample is, where samples come from (the
//! synthetic generator of the demo, R1-SGG's JSONL export and its Hugging
//! Face parquet shards), the answer format the model writes, and the scene
//! graphs themselves.
//!
//! - [`scene`]: objects with boxes, relation triplets, vocabularies, box geometry;
//! - [`format`](mod@format): the prompt, the answer text, and parsing a model's answer;
//! - [`prompt`]: R1-SGG's chat prompts and SFT target, for a chat model (Qwen2-VL);
//! - [`synthetic`]: the demo's generated scenes and their splits;
//! - [`jsonl`]: reading and writing R1-SGG's JSONL layout;
//! - [`parquet`](mod@parquet): reading (streaming) and writing R1-SGG's Hugging Face parquet shards;
//! - [`source`]: what `--data` names (a JSONL file, shards, a folder, a glob) and loading it;
//! - [`stream`]: the training set streamed in a seeded, resumable order with bounded memory;
//! - [`dataset`]: the synthetic dataset written in either layout, with its README;
//! - [`preview`]: a grid of images with their boxes, to look at.

use std::path::PathBuf;

use image::{imageops, RgbImage};

use scene::SceneGraph;

pub mod dataset;
pub mod format;
pub mod jsonl;
pub mod parquet;
pub mod preview;
pub mod prompt;
pub(crate) mod record;
pub mod scene;
pub mod source;
pub mod stream;
pub mod synthetic;

/// One image and its scene graph.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Unique name (`"train-000042"`, or the record's `image_id`).
    pub id: String,
    /// The RGB image.
    pub image: RgbImage,
    /// Its scene graph, boxes normalized to the image.
    pub graph: SceneGraph,
}

impl Sample {
    /// The same sample with its image resized to `width x height` (boxes are
    /// normalized, so the graph is unchanged).
    pub fn resized(&self, width: u32, height: u32) -> Sample {
        Sample {
            id: self.id.clone(),
            image: imageops::resize(&self.image, width, height, imageops::FilterType::Triangle),
            graph: self.graph.clone(),
        }
    }
}

/// Why a real-data file could not be loaded or a dataset written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A data file (JSONL, parquet shard, folder) could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line is not a valid record.
    #[error("{}:{line}: {reason}", path.display())]
    Record {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A record's image is missing or cannot be decoded.
    #[error("{}:{line}: image {}: {reason}", path.display(), image.display())]
    Image {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The image file, as resolved.
        image: PathBuf,
        /// What the decoder or the OS said.
        reason: String,
    },
    /// A row of a parquet shard is not a valid record: bad JSON, a bad box,
    /// a missing or undecodable image, a column of the wrong type, or a row
    /// group that cannot be decoded.
    #[error("{}: row {row}: {reason}", shard.display())]
    Row {
        /// The parquet shard.
        shard: PathBuf,
        /// 0-based row in the shard (as pyarrow and `datasets` count them).
        row: usize,
        /// What is wrong.
        reason: String,
    },
    /// A parquet shard cannot be read at all: not parquet, or compressed
    /// with a codec this build lacks.
    #[error("{}: {reason}", shard.display())]
    Shard {
        /// The file.
        shard: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// What `--data` names is no dataset: an unknown extension, a folder
    /// without shards, a glob matching nothing.
    #[error("{}: {reason}", path.display())]
    Source {
        /// As given.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A row index past the end of a dataset.
    #[error("row {index} asked of a dataset of {len} rows")]
    OutOfRange {
        /// The index asked for.
        index: usize,
        /// The dataset's rows.
        len: usize,
    },
    /// A file or folder of a dataset being written could not be created.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What the OS (or the PNG encoder) said.
        source: std::io::Error,
    },
}

impl DataError {
    /// Whether this is one bad record (a JSONL line, a parquet row), which
    /// [`BadRows::Skip`] skips, rather than a file that cannot be read.
    pub fn is_bad_record(&self) -> bool {
        matches!(
            self,
            DataError::Record { .. } | DataError::Image { .. } | DataError::Row { .. }
        )
    }
}

/// What a reader does with a malformed record (`--skip-bad-rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRows {
    /// Stop with its error, naming the file and the line or row.
    #[default]
    Fail,
    /// Skip it, and count it in [`Skipped`].
    Skip,
}

/// The malformed records skipped under [`BadRows::Skip`].
#[derive(Debug, Default)]
pub struct Skipped {
    /// How many.
    pub count: usize,
    /// The first one's error, to show what was wrong.
    pub first: Option<DataError>,
}

impl BadRows {
    /// A reader's item under this policy: a sample passes as `Some`; a bad
    /// record ([`DataError::is_bad_record`]) is counted in `skipped` and
    /// becomes `None` when skipping; any other error is returned.
    pub fn filter<T>(
        self,
        item: Result<T, DataError>,
        skipped: &mut Skipped,
    ) -> Result<Option<T>, DataError> {
        match item {
            Ok(value) => Ok(Some(value)),
            Err(e) if self == BadRows::Skip && e.is_bad_record() => {
                skipped.count += 1;
                skipped.first.get_or_insert(e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
/// Asserts `loaded` is `written` read back: ids, images, object ids,
/// categories, boxes (within 1e-6) and relations.
pub(crate) fn assert_same(written: &[Sample], loaded: &[Sample]) {
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
