//! Scene-graph data: what a sample is, where samples come from (the
//! synthetic generator of the demo, R1-SGG's JSONL layout), the answer
//! format the model writes, and the scene graphs themselves.
//!
//! - [`scene`]: objects with boxes, relation triplets, vocabularies, box geometry;
//! - [`format`](mod@format): the prompt, the answer text, and parsing a model's answer;
//! - [`prompt`]: R1-SGG's chat prompts and SFT target, for a chat model (Qwen2-VL);
//! - [`synthetic`]: the demo's generated scenes and their splits;
//! - [`jsonl`]: reading and writing R1-SGG's layout;
//! - [`preview`]: a grid of images with their boxes, to look at.

use std::path::PathBuf;

use image::{imageops, RgbImage};

use scene::SceneGraph;

pub mod format;
pub mod jsonl;
pub mod preview;
pub mod prompt;
pub mod scene;
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
    /// The JSONL file itself could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The JSONL file.
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
    /// A file or folder of a dataset being written could not be created.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What the OS (or the PNG encoder) said.
        source: std::io::Error,
    },
}
