//! R1-SGG's datasets as its authors publish them: Hugging Face `datasets`
//! parquet shards (JosephZ/vg150_train_sgg_prompt, vg150_val_sgg_prompt,
//! psg_train_sg, psg_test_sg; loaded by open_r1/grpo.py and src/sft_sgg.py).
//! A shard's columns:
//!
//! | column | type | holds |
//! |---|---|---|
//! | `image` | struct `{bytes: binary, path: string}` | `datasets`' Image feature: the encoded image (JPEG, PNG) embedded, and its original file name |
//! | `image_id` | string (an integer is accepted) | the sample's id |
//! | `objects` | string | JSON `[{"id": "man.1", "bbox": [x1, y1, x2, y2]}, ...]`, absolute pixels of the image |
//! | `relationships` | string | JSON `[{"subject": "man.1", "predicate": "riding", "object": "horse.2"}, ...]` |
//! | `prompt_open`, `prompt_close` | string, VG150 sets only | R1-SGG's open- and closed-vocabulary prompts, kept as stored |
//!
//! Other columns are not read. `datasets` writes snappy-compressed shards
//! (pyarrow's default) in row groups of 100 rows for image datasets.
//!
//! [`ParquetDataset`] reads them lazily: opening reads only the shards'
//! footers; a sample is decoded from its row group when asked for, a few
//! row groups held at a time ([`ParquetDataset::set_cached_groups`]; the
//! training stream, `data/stream.rs`, holds its shuffle window), so a
//! 56k-image training set is never in memory at once. Boxes are normalized by the decoded image's size, as R1-SGG does
//! (`image.size` of the PIL image), through the same record rules as the
//! JSONL reader (`data/record.rs`). [`write_parquet`] writes samples in this
//! layout (the synthetic dataset's `--format parquet`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, BinaryArray, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use image::ImageFormat;
use indicatif::ProgressBar;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use rayon::prelude::*;
use serde_json::{json, Value};

use super::jsonl::file_stem;
use super::record::{objects_out, relations_out, scene_graph};
use super::scene::add_labels;
use super::{DataError, Sample};
use crate::util::fs::AtomicFile;

/// The columns read; any others in a shard are skipped undecoded.
const COLUMNS: [&str; 6] = [
    "image",
    "image_id",
    "objects",
    "relationships",
    "prompt_open",
    "prompt_close",
];

/// Rows per row group written: `datasets`' own size for image datasets
/// (`PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS`), so a written shard reads
/// like a published one.
pub const ROW_GROUP_ROWS: usize = 100;

/// One row of a shard: the sample, and R1-SGG's prompts where the shard has
/// them (VG150), as stored (R1-SGG strips their `of size (W x H) ` and turns
/// their `<answer>` tags into a JSON fence when it builds a prompt).
#[derive(Debug, Clone)]
pub struct Record {
    /// The image, its id and its scene graph (boxes normalized).
    pub sample: Sample,
    /// `prompt_open`: the open-vocabulary prompt.
    pub prompt_open: Option<String>,
    /// `prompt_close`: the prompt listing the dataset's categories.
    pub prompt_close: Option<String>,
}

/// Parquet shards in R1-SGG's Hugging Face layout (see the module docs),
/// read as one sequence of rows, shard after shard, decoding a row group
/// only when one of its rows is asked for and keeping the last ones decoded
/// (one unless [`set_cached_groups`](Self::set_cached_groups) says more).
///
/// Opening reads the footers: the row count ([`len`](Self::len)) and the
/// row groups ([`row_groups`](Self::row_groups)) are known without
/// decoding anything. [`get`](Self::get) fetches any row;
/// [`iter`](Self::iter) reads them in order, each row group once. A
/// malformed row is a [`DataError::Row`] naming its shard and row, never a
/// panic; [`BadRows`](super::BadRows) skips and counts such rows instead.
#[derive(Debug)]
pub struct ParquetDataset {
    shards: Vec<Shard>,
    /// Global index of each shard's first row, then the total row count.
    starts: Vec<usize>,
    /// The row groups decoded last, least recently used first.
    cache: Mutex<VecDeque<Arc<Group>>>,
    /// How many decoded row groups `cache` keeps (at least 1).
    cached_groups: usize,
    /// Row groups decoded so far.
    groups_read: AtomicUsize,
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    metadata: ArrowReaderMetadata,
    /// The [`COLUMNS`] the shard has.
    projection: ProjectionMask,
    /// Its `objects` and `relationships` columns only (no image bytes read).
    labels_projection: ProjectionMask,
    /// Index in the shard of each row group's first row, then its row count.
    group_starts: Vec<usize>,
}

/// A decoded row group, or why it could not be decoded.
#[derive(Debug)]
struct Group {
    shard: usize,
    group: usize,
    batches: Result<Vec<RecordBatch>, String>,
}

impl ParquetDataset {
    /// Opens `shards`, in this order, reading each one's footer. A file that
    /// cannot be opened is a [`DataError::Io`]; one that is not parquet, or
    /// is compressed with a codec this build does not read (snappy and
    /// uncompressed only, as `datasets` writes), a [`DataError::Shard`].
    /// Columns are not checked here: a missing or mistyped column makes
    /// each row a [`DataError::Row`] when read, so `--skip-bad-rows` can
    /// skip such a shard like any other bad rows.
    pub fn open(shards: &[PathBuf]) -> Result<Self, DataError> {
        let mut opened = Vec::with_capacity(shards.len());
        let mut starts = vec![0usize];
        for path in shards {
            let shard = Shard::open(path)?;
            let end = starts[starts.len() - 1]
                .checked_add(shard.rows())
                .ok_or_else(|| DataError::Shard {
                    shard: path.clone(),
                    reason: "the shards' row counts overflow".into(),
                })?;
            starts.push(end);
            opened.push(shard);
        }
        Ok(ParquetDataset {
            shards: opened,
            starts,
            cache: Mutex::new(VecDeque::new()),
            cached_groups: 1,
            groups_read: AtomicUsize::new(0),
        })
    }

    /// Rows in all shards (bad ones included).
    pub fn len(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The global row indices of each row group, in order: reading the rows
    /// of one range costs one row group decode, so a trainer that shuffles
    /// groups, then rows within a group, streams the data at that cost.
    pub fn row_groups(&self) -> Vec<Range<usize>> {
        self.shards
            .iter()
            .zip(&self.starts)
            .flat_map(|(shard, &start)| {
                shard
                    .group_starts
                    .windows(2)
                    .map(move |w| start + w[0]..start + w[1])
            })
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// Keeps the last `groups` decoded row groups (at least 1; 1 when
    /// opened), so reading rows of up to that many groups in any order
    /// decodes each group once. Each holds its rows' encoded images (about
    /// 100 rows of `datasets`' shards): the memory this costs.
    pub fn set_cached_groups(&mut self, groups: usize) {
        self.cached_groups = groups.max(1);
        let cache = self.cache.get_mut().unwrap_or_else(PoisonError::into_inner);
        while cache.len() > self.cached_groups {
            cache.pop_front();
        }
    }

    /// Every object category and predicate of every row, normalized
    /// ([`add_labels`]), read from the `objects` and `relationships` columns
    /// alone (no image is read or decoded): what choosing the data's
    /// vocabulary needs. Rows and row groups that cannot be read are left
    /// out here; reading their samples reports them.
    pub fn labels(&self, labels: &mut HashSet<String>) {
        for shard in &self.shards {
            for group in 0..shard.group_starts.len() - 1 {
                let Ok(batches) = shard.read_group(group, &shard.labels_projection) else {
                    continue;
                };
                for batch in &batches {
                    for i in 0..batch.num_rows() {
                        let field = |name| -> Option<Value> {
                            text(batch, name, i)
                                .ok()
                                .flatten()
                                .map(|s| Value::String(s.to_string()))
                        };
                        // Boxes are not needed: any frame serves.
                        let graph = scene_graph(
                            field("objects").as_ref(),
                            field("relationships").as_ref(),
                            (1.0, 1.0),
                        );
                        if let Ok(graph) = graph {
                            add_labels(&graph, labels);
                        }
                    }
                }
            }
        }
    }

    /// Row groups decoded so far (each decode reads and decompresses one
    /// row group of one shard).
    pub fn row_groups_read(&self) -> usize {
        self.groups_read.load(Ordering::Relaxed)
    }

    /// Row `index` (`0..len()`, shard after shard), decoding its row group
    /// unless it is one of those kept ([`set_cached_groups`](Self::set_cached_groups)). A malformed row, or one of a row
    /// group that cannot be decoded, is a [`DataError::Row`]; an index past
    /// the end, [`DataError::OutOfRange`].
    pub fn get(&self, index: usize) -> Result<Record, DataError> {
        if index >= self.len() {
            return Err(DataError::OutOfRange {
                index,
                len: self.len(),
            });
        }
        let shard_index = self.starts.partition_point(|&s| s <= index) - 1;
        let shard = &self.shards[shard_index];
        let row = index - self.starts[shard_index];
        let group_index = shard.group_starts.partition_point(|&s| s <= row) - 1;
        let group = self.group(shard_index, group_index);
        let offset = row - shard.group_starts[group_index];
        let record = match &group.batches {
            Ok(batches) => record_at(batches, offset, shard, row),
            Err(reason) => Err(format!("its row group {group_index} cannot be read: {reason}")),
        };
        record.map_err(|reason| DataError::Row {
            shard: shard.path.clone(),
            row,
            reason,
        })
    }

    /// Every row in order, each row group decoded once.
    pub fn iter(&self) -> impl Iterator<Item = Result<Record, DataError>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Row group `group` of shard `shard`: a cached one (then the most
    /// recently used), or decoded now and cached, the least recently used
    /// dropped past [`set_cached_groups`](Self::set_cached_groups). The lock
    /// is not held while decoding; two threads asking for the same new group
    /// may both decode it.
    fn group(&self, shard: usize, group: usize) -> Arc<Group> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(k) = cache.iter().position(|g| g.shard == shard && g.group == group) {
                let hit = cache.remove(k).expect("a position found in the cache");
                cache.push_back(hit.clone());
                return hit;
            }
        }
        self.groups_read.fetch_add(1, Ordering::Relaxed);
        let decoded = Arc::new(Group {
            shard,
            group,
            batches: self.shards[shard].read_group(group, &self.shards[shard].projection),
        });
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.push_back(decoded.clone());
        while cache.len() > self.cached_groups {
            cache.pop_front();
        }
        decoded
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::Shard {
            shard: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
        let parquet = metadata.metadata();
        for group in parquet.row_groups() {
            for column in group.columns() {
                // The codecs this build has (the `snap` feature); any other
                // would fail at decode time, row by row, far from the cause.
                let codec = column.compression();
                if !matches!(codec, Compression::UNCOMPRESSED | Compression::SNAPPY) {
                    return Err(bad(format!(
                        "column {} is compressed with {codec}; this build reads snappy \
                         (what Hugging Face datasets write) and uncompressed shards only",
                        column.column_path()
                    )));
                }
            }
        }
        let schema = parquet.file_metadata().schema_descr();
        let roots = |wanted: &[&str]| {
            let roots: Vec<usize> = schema
                .root_schema()
                .get_fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| wanted.contains(&f.name()))
                .map(|(i, _)| i)
                .collect();
            ProjectionMask::roots(schema, roots)
        };
        let projection = roots(&COLUMNS);
        let labels_projection = roots(&["objects", "relationships"]);
        let mut group_starts = vec![0usize];
        for group in parquet.row_groups() {
            let end = usize::try_from(group.num_rows())
                .ok()
                .and_then(|rows| group_starts[group_starts.len() - 1].checked_add(rows))
                .ok_or_else(|| bad(format!("a row group claims {} rows", group.num_rows())))?;
            group_starts.push(end);
        }
        Ok(Shard {
            path: path.to_path_buf(),
            metadata,
            projection,
            labels_projection,
            group_starts,
        })
    }

    fn rows(&self) -> usize {
        self.group_starts[self.group_starts.len() - 1]
    }

    /// Reads and decompresses row group `group`, the columns of `projection` only.
    fn read_group(&self, group: usize, projection: &ProjectionMask) -> Result<Vec<RecordBatch>, String> {
        // Batches are sized by the footer's row count, which a damaged file
        // could inflate: capped, so a bad count never sizes an allocation.
        const MAX_BATCH: usize = 1024;
        let file = File::open(&self.path).map_err(|e| e.to_string())?;
        let rows = self.group_starts[group + 1] - self.group_starts[group];
        ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone())
            .with_projection(projection.clone())
            .with_row_groups(vec![group])
            .with_batch_size(rows.clamp(1, MAX_BATCH))
            .build()
            .map_err(|e| e.to_string())?
            .map(|batch| batch.map_err(|e| e.to_string()))
            .collect()
    }
}

/// The record at `offset` of a row group decoded as `batches`, row `row`
/// of `shard`; `Err` says what is wrong with it.
fn record_at(batches: &[RecordBatch], offset: usize, shard: &Shard, row: usize) -> Result<Record, String> {
    let mut i = offset;
    let mut batches = batches.iter();
    let batch = loop {
        match batches.next() {
            Some(b) if i < b.num_rows() => break b,
            Some(b) => i -= b.num_rows(),
            None => return Err("its row group holds fewer rows than its footer says".into()),
        }
    };
    let image = decode_image(batch, i)?;
    let id = match batch.column_by_name("image_id") {
        Some(column) => image_id(column, i)?,
        None => None,
    };
    // No id: the shard's file name and the row, unique across shards.
    let id = id.unwrap_or_else(|| format!("{}:{row}", file_name(&shard.path)));
    let field = |name| -> Result<Option<Value>, String> {
        Ok(text(batch, name, i)?.map(|s| Value::String(s.to_string())))
    };
    let frame = (image.width() as f64, image.height() as f64);
    let graph = scene_graph(
        field("objects")?.as_ref(),
        field("relationships")?.as_ref(),
        frame,
    )?;
    Ok(Record {
        sample: Sample { id, image, graph },
        prompt_open: text(batch, "prompt_open", i)?.map(str::to_string),
        prompt_close: text(batch, "prompt_close", i)?.map(str::to_string),
    })
}

/// The image of row `i`: the `image` struct's `bytes`, decoded (JPEG or
/// PNG) and converted to RGB as R1-SGG's `.convert('RGB')` (alpha dropped).
fn decode_image(batch: &RecordBatch, i: usize) -> Result<image::RgbImage, String> {
    let column = batch.column_by_name("image").ok_or("no column \"image\"")?;
    let image = column.as_struct_opt().ok_or_else(|| {
        format!(
            "column \"image\" is {}, not a struct of bytes and path (datasets' Image feature)",
            column.data_type()
        )
    })?;
    if image.is_null(i) {
        return Err("no image (\"image\" is null)".into());
    }
    let bytes = image
        .column_by_name("bytes")
        .ok_or("column \"image\" has no field \"bytes\"")?;
    let data = binary(bytes, i).ok_or_else(|| {
        format!(
            "field \"bytes\" of column \"image\" is {}, not binary",
            bytes.data_type()
        )
    })?;
    let Some(data) = data else {
        let path = match image.column_by_name("path") {
            Some(p) => match string(p, i) {
                Some(Some(p)) => format!(" (path {p:?}; images are read from the shard only)"),
                _ => String::new(),
            },
            None => String::new(),
        };
        return Err(format!("the image has no bytes{path}"));
    };
    image::load_from_memory(data)
        .map(|img| img.to_rgb8())
        .map_err(|e| format!("cannot decode the image: {e}"))
}

/// The `image_id` of row `i`: a string, or an integer written in decimal;
/// `None` when null.
fn image_id(column: &ArrayRef, i: usize) -> Result<Option<String>, String> {
    if let Some(s) = string(column, i) {
        return Ok(s.map(str::to_string));
    }
    let number = match column.data_type() {
        DataType::Int32 => column
            .as_primitive_opt::<Int32Type>()
            .map(|a| a.value(i).to_string()),
        DataType::Int64 => column
            .as_primitive_opt::<Int64Type>()
            .map(|a| a.value(i).to_string()),
        DataType::UInt32 => column
            .as_primitive_opt::<UInt32Type>()
            .map(|a| a.value(i).to_string()),
        DataType::UInt64 => column
            .as_primitive_opt::<UInt64Type>()
            .map(|a| a.value(i).to_string()),
        _ => None,
    };
    match number {
        Some(n) if column.is_valid(i) => Ok(Some(n)),
        Some(_) => Ok(None),
        None => Err(format!(
            "column \"image_id\" is {}, not a string or an integer",
            column.data_type()
        )),
    }
}

/// The string column `name` at row `i`: `None` when the column is absent or
/// the value null; `Err` when the column holds something else.
fn text<'a>(batch: &'a RecordBatch, name: &str, i: usize) -> Result<Option<&'a str>, String> {
    match batch.column_by_name(name) {
        None => Ok(None),
        Some(column) => string(column, i)
            .ok_or_else(|| format!("column {name:?} is {}, not a string", column.data_type())),
    }
}

/// Row `i` of a string array of any layout (`Some(None)` when null), or
/// `None` when the array is not of strings.
fn string(column: &ArrayRef, i: usize) -> Option<Option<&str>> {
    let value = if let Some(a) = column.as_string_opt::<i32>() {
        a.value(i)
    } else if let Some(a) = column.as_string_opt::<i64>() {
        a.value(i)
    } else if let Some(a) = column.as_string_view_opt() {
        a.value(i)
    } else {
        return None;
    };
    Some(column.is_valid(i).then_some(value))
}

/// Row `i` of a binary array of any layout (`Some(None)` when null), or
/// `None` when the array is not binary.
fn binary(column: &ArrayRef, i: usize) -> Option<Option<&[u8]>> {
    let value = if let Some(a) = column.as_binary_opt::<i32>() {
        a.value(i)
    } else if let Some(a) = column.as_binary_opt::<i64>() {
        a.value(i)
    } else if let Some(a) = column.as_binary_view_opt() {
        a.value(i)
    } else {
        return None;
    };
    Some(column.is_valid(i).then_some(value))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Writes samples as one parquet shard in R1-SGG's Hugging Face layout
/// (the module's table, without the prompt columns: see
/// [`write_parquet`]), through an [`AtomicFile`]: nothing appears at the
/// path until [`finish`](Self::finish) succeeds.
pub(crate) struct ShardWriter {
    path: PathBuf,
    writer: ArrowWriter<AtomicFile>,
    schema: Arc<Schema>,
}

impl ShardWriter {
    pub(crate) fn create(path: &Path) -> Result<Self, DataError> {
        let fail = |source| DataError::Write {
            path: path.to_path_buf(),
            source,
        };
        // `datasets` reads its features from this key, so `load_dataset`
        // decodes `image` as an Image, as it does R1-SGG's shards.
        let features = json!({"info": {"features": {
            "image": {"_type": "Image"},
            "image_id": {"dtype": "string", "_type": "Value"},
            "objects": {"dtype": "string", "_type": "Value"},
            "relationships": {"dtype": "string", "_type": "Value"},
        }}});
        let schema = Arc::new(Schema::new_with_metadata(
            vec![
                Field::new("image", DataType::Struct(image_fields()), true),
                Field::new("image_id", DataType::Utf8, true),
                Field::new("objects", DataType::Utf8, true),
                Field::new("relationships", DataType::Utf8, true),
            ],
            HashMap::from([("huggingface".to_string(), features.to_string())]),
        ));
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            // Encoded images never repeat: a dictionary would only be built to be dropped.
            .set_column_dictionary_enabled(ColumnPath::from(vec!["image".into(), "bytes".into()]), false)
            .build();
        let file = AtomicFile::create(path).map_err(fail)?;
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties))
            .map_err(|e| fail(std::io::Error::other(e)))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            writer,
            schema,
        })
    }

    /// Appends `samples` (their PNGs encoded in parallel, ticking
    /// `progress` once per image).
    pub(crate) fn add(&mut self, samples: &[Sample], progress: &ProgressBar) -> Result<(), DataError> {
        let fail = |e: String| DataError::Write {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        };
        let pngs = samples
            .par_iter()
            .map(|s| {
                let mut png = Vec::new();
                s.image
                    .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
                    .map_err(|e| e.to_string())?;
                progress.inc(1);
                Ok(png)
            })
            .collect::<Result<Vec<Vec<u8>>, String>>()
            .map_err(fail)?;
        let json = |s: &Sample| {
            let objects = serde_json::to_string(&objects_out(s))?;
            Ok((objects, serde_json::to_string(&relations_out(s))?))
        };
        let (objects, relationships): (Vec<String>, Vec<String>) = samples
            .iter()
            .map(json)
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| fail(e.to_string()))?
            .into_iter()
            .unzip();
        let paths: Vec<String> = samples
            .iter()
            .map(|s| format!("{}.png", file_stem(&s.id)))
            .collect();
        let image = StructArray::try_new(
            image_fields(),
            vec![
                Arc::new(BinaryArray::from_iter_values(&pngs)) as ArrayRef,
                Arc::new(StringArray::from(paths)),
            ],
            None,
        )
        .map_err(|e| fail(e.to_string()))?;
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(image),
                Arc::new(StringArray::from_iter_values(samples.iter().map(|s| &s.id))),
                Arc::new(StringArray::from(objects)),
                Arc::new(StringArray::from(relationships)),
            ],
        )
        .map_err(|e| fail(e.to_string()))?;
        self.writer.write(&batch).map_err(|e| fail(e.to_string()))
    }

    /// Writes the footer and puts the shard in place; returns its path.
    pub(crate) fn finish(self) -> Result<PathBuf, DataError> {
        let fail = |source| DataError::Write {
            path: self.path.clone(),
            source,
        };
        let file = self
            .writer
            .into_inner()
            .map_err(|e| fail(std::io::Error::other(e)))?;
        file.commit().map_err(fail)?;
        Ok(self.path)
    }
}

/// `datasets`' Image feature as arrow stores it.
fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// Writes samples as `dir/<split>.parquet`, one shard in R1-SGG's Hugging
/// Face layout (see the module docs), the one [`ParquetDataset`] reads:
/// `image` as `{bytes: PNG, path: "<image_id>.png"}`, `image_id`, and
/// `objects` / `relationships` as JSON strings with absolute pixel boxes
/// (whole pixels as integers, as in [`write_jsonl`](super::jsonl::write_jsonl));
/// snappy-compressed, [`ROW_GROUP_ROWS`] rows a row group, with the
/// `huggingface` schema metadata `datasets` reads its features from.
/// Reading it back gives the same samples as writing and reading JSONL.
///
/// There are no `prompt_open` / `prompt_close` columns (the PSG sets'
/// layout): the demo's model reads no prompt, and this crate's prompt
/// ([`prompt`](super::format::prompt)) is a closed-vocabulary one only, so
/// a `prompt_open` could not be rendered. `split` is made a safe file name
/// as in `write_jsonl`; the file is written atomically; a failure is a
/// [`DataError::Write`] naming it.
pub fn write_parquet(samples: &[Sample], dir: &Path, split: &str) -> Result<PathBuf, DataError> {
    let mut writer = ShardWriter::create(&dir.join(format!("{}.parquet", file_stem(split))))?;
    writer.add(samples, &ProgressBar::hidden())?;
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::format::BoxRounding;
    use crate::data::jsonl::{load_jsonl, write_jsonl};
    use crate::data::source::{load_samples, DataSource};
    use crate::data::synthetic::{generate, generate_split, Split};
    use crate::data::{assert_same, BadRows};
    use crate::util::fs::temp_dir;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/parquet")
            .join(name)
    }

    /// What scripts/parquet_fixture.py wrote.
    fn expected() -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
    }

    fn good() -> ParquetDataset {
        match DataSource::resolve(&fixture("good")).unwrap() {
            DataSource::Parquet(shards) => ParquetDataset::open(&shards).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_the_fixture_as_written() {
        let expected = expected();
        let shards = expected["shards"].as_array().unwrap();
        let rows: Vec<&Value> = shards
            .iter()
            .flat_map(|s| s["rows"].as_array().unwrap())
            .collect();
        let data = good();
        assert_eq!(data.len(), rows.len());
        // Shards in file-name order, each in row groups of 2.
        let mut groups = Vec::new();
        let mut start = 0;
        for shard in shards {
            for n in shard["row_groups"].as_array().unwrap() {
                let n = n.as_u64().unwrap() as usize;
                groups.push(start..start + n);
                start += n;
            }
        }
        assert_eq!(data.row_groups(), groups);
        let mut vg150 = 0;
        for (index, want) in rows.iter().enumerate() {
            let record = data.get(index).unwrap();
            let s = &record.sample;
            assert_eq!(s.id, want["image_id"].as_str().unwrap());
            let (w, h) = (want["width"].as_u64().unwrap(), want["height"].as_u64().unwrap());
            assert_eq!(s.image.dimensions(), (w as u32, h as u32), "{}", s.id);
            // PNG decodes exactly; JPEG decoders may differ by a level or two.
            let tolerance = if want["format"] == "png" { 0 } else { 3 };
            for p in want["pixels"].as_array().unwrap() {
                let (x, y) = (p[0].as_u64().unwrap() as u32, p[1].as_u64().unwrap() as u32);
                let got = s.image.get_pixel(x, y).0;
                for (c, v) in got.iter().zip(p[2].as_array().unwrap()) {
                    let v = v.as_u64().unwrap() as i32;
                    assert!(
                        (*c as i32 - v).abs() <= tolerance,
                        "{} ({x}, {y}): {got:?} vs {p}",
                        s.id
                    );
                }
            }
            let objects = want["objects"].as_array().unwrap();
            assert_eq!(s.graph.objects.len(), objects.len());
            for ((o, want), units) in s
                .graph
                .objects
                .iter()
                .zip(objects)
                .zip(want["units"].as_array().unwrap())
            {
                assert_eq!(o.id, want["id"].as_str().unwrap());
                assert_eq!(o.category, o.id.split('.').next().unwrap());
                let bbox: Vec<f64> = want["bbox"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                let sides = [w, h, w, h].map(|v| v as f64);
                for k in 0..4 {
                    // Normalized by the image's size and clipped to it.
                    assert_eq!(o.bbox[k], (bbox[k] / sides[k]).clamp(0.0, 1.0) as f32, "{}", o.id);
                    // R1-SGG's SFT target: int(x / iw * 1000).
                    let units = units[k].as_u64().unwrap() as u32;
                    assert_eq!(BoxRounding::Truncate.units(o.bbox[k]), units, "{} {k}", o.id);
                }
            }
            let relations: Vec<(String, String, String)> = s
                .graph
                .relations
                .iter()
                .map(|r| (r.subject.clone(), r.predicate.clone(), r.object.clone()))
                .collect();
            let want_relations: Vec<(String, String, String)> = want["relationships"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let f = |k: &str| r[k].as_str().unwrap().to_string();
                    (f("subject"), f("predicate"), f("object"))
                })
                .collect();
            assert_eq!(relations, want_relations);
            assert_eq!(record.prompt_open.as_deref(), want["prompt_open"].as_str());
            assert_eq!(record.prompt_close.as_deref(), want["prompt_close"].as_str());
            vg150 += usize::from(record.prompt_close.is_some());
        }
        assert_eq!(vg150, 3);
        // A box past the image's edge is clipped (the bear of the second PSG row).
        assert_eq!(data.get(1).unwrap().sample.graph.objects[0].bbox[2], 1.0);
        assert!(matches!(
            data.get(rows.len()),
            Err(DataError::OutOfRange { index: 6, len: 6 })
        ));
    }

    #[test]
    fn a_sample_decodes_only_its_row_group() {
        let data = good();
        // Opening reads the footers only.
        assert_eq!(data.row_groups_read(), 0);
        // Row 2 is alone in the PSG shard's second row group.
        assert_eq!(data.get(2).unwrap().sample.id, "000000000632");
        assert_eq!(data.row_groups_read(), 1);
        // The same group again is the cached one.
        data.get(2).unwrap();
        assert_eq!(data.row_groups_read(), 1);
        // Rows 3 and 4 share the VG150 shard's first group: one decode.
        assert_eq!(data.get(3).unwrap().sample.id, "2343");
        assert_eq!(data.get(4).unwrap().sample.id, "2344");
        assert_eq!(data.row_groups_read(), 2);
        // In order, every group is decoded once.
        let fresh = good();
        let ids: Vec<String> = fresh.iter().map(|r| r.unwrap().sample.id).collect();
        assert_eq!(ids.len(), 6);
        assert_eq!(fresh.row_groups_read(), fresh.row_groups().len());
    }

    #[test]
    fn each_malformed_row_is_an_error_naming_its_shard_and_row() {
        let expected = expected();
        let path = fixture(expected["bad_rows"]["file"].as_str().unwrap());
        let data = ParquetDataset::open(std::slice::from_ref(&path)).unwrap();
        let reasons = expected["bad_rows"]["reasons"].as_array().unwrap();
        assert_eq!(data.len(), reasons.len());
        for (row, reason) in reasons.iter().enumerate() {
            match (data.get(row), reason.as_str()) {
                (Ok(record), None) => assert_eq!(record.sample.id, "2343"),
                (Err(err), Some(needle)) => {
                    let DataError::Row {
                        shard,
                        row: r,
                        reason,
                    } = &err
                    else {
                        panic!("row {row}: {err:?}");
                    };
                    assert_eq!((shard, *r), (&path, row));
                    assert!(reason.contains(needle), "row {row}: {reason}");
                    let text = err.to_string();
                    assert!(
                        text.starts_with(&format!("{}: row {row}: ", path.display())),
                        "{text}"
                    );
                    assert!(err.is_bad_record());
                }
                (got, want) => panic!("row {row}: {got:?}, expected {want:?}"),
            }
        }
        // A column of the wrong type: every row of the shard.
        let types = &expected["bad_types"];
        let path = fixture(types["file"].as_str().unwrap());
        let data = ParquetDataset::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(data.len() as u64, types["rows"].as_u64().unwrap());
        for (row, item) in data.iter().enumerate() {
            let err = item.unwrap_err();
            assert!(
                matches!(&err, DataError::Row { row: r, .. } if *r == row),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(types["reason"].as_str().unwrap()) && text.contains("Int64"),
                "{text}"
            );
        }
    }

    #[test]
    fn unreadable_shards_are_errors_when_opened() {
        let zstd = fixture(expected()["zstd"]["file"].as_str().unwrap());
        let err = ParquetDataset::open(std::slice::from_ref(&zstd)).unwrap_err();
        assert!(
            matches!(&err, DataError::Shard { shard, .. } if *shard == zstd),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("ZSTD") && err.to_string().contains("snappy"),
            "{err}"
        );
        assert!(!err.is_bad_record());

        let dir = temp_dir("parquet_unreadable");
        let junk = dir.join("junk.parquet");
        std::fs::write(&junk, b"PAR1 but not really a parquet file").unwrap();
        let err = ParquetDataset::open(&[junk]).unwrap_err();
        assert!(err.to_string().contains("not a readable parquet file"), "{err}");
        let err = ParquetDataset::open(&[dir.join("missing.parquet")]).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");

        // Pages overwritten with zeros: the footer still reads, the row
        // group does not, and each of its rows says so.
        let shard = fixture("good/psg-00000.parquet");
        let mut bytes = std::fs::read(&shard).unwrap();
        let n = bytes.len();
        bytes[4..n / 2].fill(0);
        let damaged = dir.join("damaged.parquet");
        std::fs::write(&damaged, bytes).unwrap();
        let data = ParquetDataset::open(std::slice::from_ref(&damaged)).unwrap();
        for row in 0..2 {
            let err = data.get(row).unwrap_err();
            assert!(
                matches!(&err, DataError::Row { row: r, .. } if *r == row),
                "{err:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn skipping_bad_rows_counts_them() {
        let expected = expected();
        let bad = fixture(expected["bad_rows"]["file"].as_str().unwrap());
        let types = fixture(expected["bad_types"]["file"].as_str().unwrap());
        let source = DataSource::Parquet(vec![fixture("good/vg150-00000.parquet"), bad.clone(), types]);
        let (samples, skipped) = load_samples(&source, BadRows::Skip, |s| s).unwrap();
        // Three VG150 rows and the good row of the bad shard.
        let ids: Vec<&str> = samples.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["2343", "2344", "2345", "2343"]);
        assert_eq!(skipped.count, 9 + 2);
        assert!(
            matches!(&skipped.first, Some(DataError::Row { shard, row: 1, .. }) if *shard == bad),
            "{:?}",
            skipped.first
        );
        // Without skipping, the first bad row stops the load.
        let err = load_samples(&source, BadRows::Fail, |s| s).unwrap_err();
        assert!(matches!(&err, DataError::Row { row: 1, .. }), "{err:?}");
        // A shard that cannot be opened is never skipped.
        let zstd = DataSource::Parquet(vec![fixture("bad/zstd.parquet")]);
        assert!(load_samples(&zstd, BadRows::Skip, |s| s).is_err());
        // `keep` sees each sample as it is read.
        let (small, _) = load_samples(&source, BadRows::Skip, |s| s.resized(8, 8)).unwrap();
        assert!(small.iter().all(|s| s.image.dimensions() == (8, 8)));
    }

    #[test]
    fn a_row_group_larger_than_a_batch_is_read_whole() {
        // 1100 rows in one row group: decoded as more than one batch.
        let dir = temp_dir("parquet_big_group");
        let path = dir.join("big.parquet");
        let mut png = Vec::new();
        image::RgbImage::new(1, 1)
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let n = 1100;
        let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let image = StructArray::try_new(
            image_fields(),
            vec![
                Arc::new(BinaryArray::from_iter_values(std::iter::repeat_n(&png, n))) as ArrayRef,
                Arc::new(StringArray::from(vec![None::<&str>; n])),
            ],
            None,
        )
        .unwrap();
        let empty = || Arc::new(StringArray::from(vec!["[]"; n])) as ArrayRef;
        let batch = RecordBatch::try_from_iter([
            ("image", Arc::new(image) as ArrayRef),
            ("image_id", Arc::new(StringArray::from(ids)) as ArrayRef),
            ("objects", empty()),
            ("relationships", empty()),
        ])
        .unwrap();
        let mut writer = ArrowWriter::try_new(File::create(&path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let data = ParquetDataset::open(std::slice::from_ref(&path)).unwrap();
        let groups = data.row_groups();
        assert_eq!((groups.len(), groups[0].clone()), (1, 0..n));
        for i in [0, 1023, 1024, n - 1] {
            assert_eq!(data.get(i).unwrap().sample.id, i.to_string());
        }
        assert_eq!(data.row_groups_read(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn written_shards_read_back_as_jsonl_does() {
        let dir = temp_dir("parquet_round_trip");
        let samples = generate_split(Split::Train, 250, 3);
        let shard = write_parquet(&samples, &dir, "train").unwrap();
        assert_eq!(shard, dir.join("train.parquet"));
        let data = ParquetDataset::open(std::slice::from_ref(&shard)).unwrap();
        // Row groups of datasets' size for images.
        let sizes: Vec<usize> = data.row_groups().iter().map(|r| r.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        let from_parquet: Vec<Sample> = data.iter().map(|r| r.unwrap().sample).collect();
        let from_jsonl = load_jsonl(&write_jsonl(&samples, &dir, "train").unwrap()).unwrap();
        assert_same(&samples, &from_parquet);
        assert_same(&from_jsonl, &from_parquet);
        // Whole-pixel boxes come back bit for bit.
        assert!(samples.iter().zip(&from_parquet).all(|(a, b)| a.graph == b.graph));

        // Fractional boxes and odd ids too, as in the JSONL layout.
        let odd: Vec<Sample> = ["a/b", "", "héllo wörld"]
            .iter()
            .enumerate()
            .map(|(k, id)| {
                let mut s = generate(Split::Train, k, 4).resized(37, 23);
                s.id = id.to_string();
                s.graph.objects[0].bbox = [0.123_456_7, 1.0 / 3.0, 0.987_654_3, 0.999_999_9];
                s
            })
            .collect();
        let shard = write_parquet(&odd, &dir, "odd/split").unwrap();
        assert_eq!(shard, dir.join("odd_split.parquet"));
        let data = ParquetDataset::open(&[shard]).unwrap();
        let back: Vec<Sample> = data.iter().map(|r| r.unwrap().sample).collect();
        assert!(odd
            .iter()
            .zip(&back)
            .all(|(a, b)| a.graph == b.graph && a.id == b.id));
        let record = data.get(0).unwrap();
        assert_eq!((record.prompt_open, record.prompt_close), (None, None));
        // Nothing half-written is left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
