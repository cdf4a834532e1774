//! The files R1-SGG's evaluation passes along, read and written:
//!
//! - **per-image records**, one JSON file per image in a folder, as
//!   `src/sgg_inference_vllm.py` writes them (`OUT/{image_id}.json`):
//!   `{"image_id", "response", "gt_objects", "gt_relationships",
//!   "box_scale"}`, the ground truth as the dataset's JSON strings (boxes in
//!   pixels), `box_scale` the units of the answer's boxes (`[1000, 1000]`
//!   for Qwen2-VL; absent means that, as in `sgg_gather_preds.py`). This
//!   crate adds `"width"` and `"height"`, the image's size, which R1-SGG
//!   reads from the dataset's image instead. A JSONL file with one record a
//!   line is read too.
//! - **the gathered predictions** `sgg_pred_results.json`, as
//!   `src/sgg_gather_preds.py` writes them for `src/vg150_eval.py`
//!   ([`write_gathered`], [`read_gathered`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{Dataset, Gathered, Prediction, R1SggEval};
use crate::data::format::parse_answer;
use crate::data::jsonl::unique_stem;
use crate::data::record::scene_graph;
use crate::data::scene::Vocabulary;
use crate::eval::{EvalSummary, Evaluator};
use crate::train::FORM;
use crate::util::fs::write_atomically;

/// One image's answer and ground truth, as R1-SGG's inference script writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The dataset's image id (a JSON number is read as its digits).
    pub image_id: String,
    /// The model's answer, as generated.
    pub response: String,
    /// The ground truth's objects: a JSON list, or a string holding one.
    pub gt_objects: Value,
    /// The ground truth's relationships, likewise.
    pub gt_relationships: Value,
    /// Units of the answer's boxes: `[1000, 1000]` for Qwen2-VL.
    pub box_scale: [f64; 2],
    /// The image's width and height in pixels, when the record holds them.
    pub size: Option<(f64, f64)>,
}

/// Why records could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file's content is not what the layout says.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file (and line, for JSONL).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> RecordError {
    RecordError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Record {
    /// A record of `response` for the image `image_id` of `size` pixels,
    /// with its ground truth (lists or JSON strings, boxes in pixels) and
    /// the answer's box units. The model-driven evaluation builds these
    /// from its decoded answers.
    pub fn new(
        image_id: impl Into<String>,
        response: impl Into<String>,
        gt_objects: Value,
        gt_relationships: Value,
        box_scale: [f64; 2],
        size: (f64, f64),
    ) -> Self {
        Self {
            image_id: image_id.into(),
            response: response.into(),
            gt_objects,
            gt_relationships,
            box_scale,
            size: Some(size),
        }
    }

    /// The record of `response`, a model's answer with boxes in `0..=1000`,
    /// for `sample`: its ground truth back in pixels of the sample's image
    /// (normalized coordinates times its width and height; within f32
    /// rounding of the dataset's own numbers).
    pub fn from_sample(sample: &crate::data::Sample, response: &str) -> Self {
        let (w, h) = sample.image.dimensions();
        let (w, h) = (f64::from(w), f64::from(h));
        let objects: Vec<Value> = sample
            .graph
            .objects
            .iter()
            .map(|o| {
                let [x1, y1, x2, y2] = o.bbox.map(f64::from);
                json!({"id": o.id, "bbox": [x1 * w, y1 * h, x2 * w, y2 * h]})
            })
            .collect();
        let relations: Vec<Value> = sample
            .graph
            .relations
            .iter()
            .map(|r| json!({"subject": r.subject, "predicate": r.predicate, "object": r.object}))
            .collect();
        Self::new(
            sample.id.clone(),
            response,
            Value::Array(objects),
            Value::Array(relations),
            [1000.0, 1000.0],
            (w, h),
        )
    }

    /// Reads a record from its JSON (see the module docs).
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let image_id = match value.get("image_id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err("needs \"image_id\", a string or a number".into()),
        };
        let response = value
            .get("response")
            .and_then(Value::as_str)
            .ok_or("needs a string \"response\"")?
            .to_string();
        let field = |k: &str| value.get(k).cloned().ok_or(format!("needs {k:?}"));
        let box_scale = match value.get("box_scale") {
            None => [1000.0, 1000.0],
            Some(b) => match b
                .as_array()
                .map(|b| b.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            {
                Some(Some(v)) if v.len() == 2 && v.iter().all(|x| x.is_finite() && *x != 0.0) => [v[0], v[1]],
                _ => return Err("\"box_scale\" must be two non-zero numbers".into()),
            },
        };
        let size = match (value.get("width"), value.get("height")) {
            (None, None) => None,
            (Some(w), Some(h)) => match (w.as_f64(), h.as_f64()) {
                (Some(w), Some(h)) if w > 0.0 && h > 0.0 && w.is_finite() && h.is_finite() => Some((w, h)),
                _ => return Err("\"width\" and \"height\" must be positive numbers".into()),
            },
            _ => return Err("\"width\" and \"height\" must come together".into()),
        };
        Ok(Self {
            image_id,
            response,
            gt_objects: field("gt_objects")?,
            gt_relationships: field("gt_relationships")?,
            box_scale,
            size,
        })
    }

    /// The record's JSON: R1-SGG's keys (the ground truth as JSON strings,
    /// as its datasets and inference script hold it), then `width` and
    /// `height` when known.
    pub fn to_json(&self) -> Value {
        let as_string = |v: &Value| match v {
            Value::String(_) => v.clone(),
            other => Value::String(other.to_string()),
        };
        let mut out = json!({
            "image_id": self.image_id,
            "response": self.response,
            "gt_objects": as_string(&self.gt_objects),
            "gt_relationships": as_string(&self.gt_relationships),
            "box_scale": self.box_scale,
        });
        if let (Some((w, h)), Some(map)) = (self.size, out.as_object_mut()) {
            map.insert("width".into(), json!(w));
            map.insert("height".into(), json!(h));
        }
        out
    }
}

/// Reads records from a folder of per-image files (every file whose name
/// ends in `json`, as R1-SGG's `glob("*json")`, hidden files left out, in
/// name order) or from a JSONL file (one record a non-blank line).
pub fn read_records(path: &Path) -> Result<Vec<Record>, RecordError> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(path))?
            .map(|e| e.map(|e| e.path()).map_err(io(path)))
            .collect::<Result<_, _>>()?;
        files.retain(|f| {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with("json") && !name.starts_with('.') && f.is_file()
        });
        files.sort();
        files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).map_err(io(f))?;
                let value: Value = serde_json::from_str(&text).map_err(|e| invalid(f, e.to_string()))?;
                Record::from_json(&value).map_err(|e| invalid(f, e))
            })
            .collect()
    } else {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                let at = || PathBuf::from(format!("{}:{}", path.display(), n + 1));
                let value: Value = serde_json::from_str(l).map_err(|e| invalid(&at(), e.to_string()))?;
                Record::from_json(&value).map_err(|e| invalid(&at(), e))
            })
            .collect()
    }
}

/// Writes each record to `dir/<image id>.json` (the id made a safe, unique
/// file name), as R1-SGG's inference script does; creates `dir`.
pub fn write_records(records: &[Record], dir: &Path) -> Result<(), RecordError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut used = HashSet::new();
    for r in records {
        let path = dir.join(format!("{}.json", unique_stem(&r.image_id, &mut used)));
        write_atomically(&path, r.to_json().to_string().as_bytes()).map_err(io(&path))?;
    }
    Ok(())
}

/// Image sizes by image id, from a JSONL file in R1-SGG's data layout (as
/// [`crate::data::jsonl::load_jsonl`] reads it): each line's `"image_id"`
/// with its `"width"` and `"height"`, or else the size of its `"image"`
/// (read from the file's header, not decoded). For records without a size.
pub fn read_image_sizes(path: &Path) -> Result<HashMap<String, (f64, f64)>, RecordError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut sizes = HashMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = PathBuf::from(format!("{}:{}", path.display(), n + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| invalid(&at, e.to_string()))?;
        let id = match v.get("image_id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            _ => return Err(invalid(&at, "needs \"image_id\"")),
        };
        let size = match (
            v.get("width").and_then(Value::as_f64),
            v.get("height").and_then(Value::as_f64),
        ) {
            (Some(w), Some(h)) => (w, h),
            _ => {
                let image = v
                    .get("image")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(&at, "needs \"width\" and \"height\", or \"image\""))?;
                let (w, h) = image::image_dimensions(folder.join(image))
                    .map_err(|e| invalid(&at, format!("image {image}: {e}")))?;
                (f64::from(w), f64::from(h))
            }
        };
        sizes.insert(id, size);
    }
    Ok(sizes)
}

/// The gathered predictions of `records` as `sgg_gather_preds.py` writes
/// them: image id -> `{"image_id", "boxes", "labels", "scores", "names",
/// "names_target", "relation_tuples", "graph"}`; an image with no kept
/// object (a failure too) padded as R1-SGG pads it, its dummy box zeros
/// (R1-SGG's is uninitialized memory).
pub fn write_gathered(
    eval: &R1SggEval,
    gathered: &[(String, Gathered)],
    path: &Path,
) -> Result<(), RecordError> {
    let n = eval.predicates().len();
    let one_hot = |p: usize| {
        let mut row = vec![0; n];
        row[p] = 1;
        row
    };
    let mut out = Map::new();
    for (id, g) in gathered {
        let entry = match g {
            Gathered::Graph(p) if !p.names.is_empty() => json!({
                "image_id": id,
                "boxes": p.boxes,
                "labels": p.labels,
                "scores": vec![1.0; p.names.len()],
                "names": p.names,
                "names_target": p.categories,
                "relation_tuples": p.relations.iter().map(|&(s, o, q)| json!([
                    p.categories[s], p.boxes[s], p.categories[o], p.boxes[o], eval.predicates()[q]
                ])).collect::<Vec<_>>(),
                "graph": {
                    "all_node_pairs": p.relations.iter().map(|&(s, o, _)| [s, o]).collect::<Vec<_>>(),
                    "all_relation": p.relations.iter().map(|&(_, _, q)| one_hot(q)).collect::<Vec<_>>(),
                    "pred_boxes": p.boxes,
                    "pred_boxes_class": p.labels,
                    "pred_boxes_score": vec![1.0; p.names.len()],
                },
            }),
            _ => json!({
                "image_id": id,
                "boxes": [[0.0, 0.0, 0.0, 0.0]],
                "labels": [0],
                "scores": [0],
                "names": ["unknown"],
                "names_target": ["unknown"],
                "relation_tuples": [],
                "graph": {
                    "all_node_pairs": [[0, 0]],
                    "all_relation": [vec![0.0; n]],
                    "pred_boxes": [[0.0, 0.0, 0.0, 0.0]],
                    "pred_boxes_class": [0],
                    "pred_boxes_score": [0],
                },
            }),
        };
        out.insert(id.clone(), entry);
    }
    write_atomically(path, Value::Object(out).to_string().as_bytes()).map_err(io(path))
}

/// Reads `sgg_pred_results.json` (R1-SGG's, or [`write_gathered`]'s) back
/// into predictions by image id; a padded image (names `["unknown"]`) reads
/// as a prediction without objects. Only the fields the evaluation uses are
/// read: `names`, `names_target`, `graph.pred_boxes`, `graph.pred_boxes_class`,
/// `graph.all_node_pairs` and `graph.all_relation` (its argmax past
/// `__background__`, as `SGRecall`). R1-SGG's padded boxes may be `NaN`,
/// which JSON readers other than Python's reject: they are read as 0.
pub fn read_gathered(path: &Path) -> Result<BTreeMap<String, Prediction>, RecordError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let value: Value = serde_json::from_str(&python_json_constants_as_zero(&text))
        .map_err(|e| invalid(path, e.to_string()))?;
    let map = value
        .as_object()
        .ok_or_else(|| invalid(path, "not a JSON object"))?;
    let mut out = BTreeMap::new();
    for (id, entry) in map {
        let bad = |what: &str| invalid(path, format!("image {id}: {what}"));
        let strings = |v: Option<&Value>| -> Option<Vec<String>> {
            v?.as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let names = strings(entry.get("names")).ok_or_else(|| bad("\"names\" is not a list of strings"))?;
        if names == ["unknown"] {
            out.insert(id.clone(), Prediction::default());
            continue;
        }
        let categories = strings(entry.get("names_target")).ok_or_else(|| bad("\"names_target\""))?;
        let graph = entry.get("graph").ok_or_else(|| bad("no \"graph\""))?;
        let rows = |k: &str| {
            graph
                .get(k)
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| bad(k))
        };
        let boxes = rows("pred_boxes")?
            .iter()
            .map(|b| {
                match b
                    .as_array()
                    .map(|b| b.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                {
                    Some(Some(v)) if v.len() == 4 => Ok([v[0], v[1], v[2], v[3]]),
                    _ => Err(bad("a box is not 4 numbers")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let labels = rows("pred_boxes_class")?
            .iter()
            .map(|l| {
                l.as_u64()
                    .map(|l| l as usize)
                    .ok_or_else(|| bad("a class is not an index"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pairs = rows("all_node_pairs")?;
        let scores = rows("all_relation")?;
        if names.len() != boxes.len()
            || names.len() != labels.len()
            || categories.len() != names.len()
            || pairs.len() != scores.len()
        {
            return Err(bad("lists of different lengths"));
        }
        let relations = pairs
            .iter()
            .zip(&scores)
            .map(|(pair, row)| {
                let pair: Option<Vec<usize>> = pair
                    .as_array()
                    .and_then(|p| p.iter().map(|i| i.as_u64().map(|i| i as usize)).collect());
                let row: Option<Vec<f64>> =
                    row.as_array().and_then(|r| r.iter().map(Value::as_f64).collect());
                match (pair.as_deref(), row) {
                    (Some(&[s, o]), Some(row)) if s < names.len() && o < names.len() && row.len() > 1 => {
                        // numpy's argmax: the first maximum.
                        let p = (1..row.len()).fold(1, |best, k| if row[k] > row[best] { k } else { best });
                        Ok((s, o, p))
                    }
                    _ => Err(bad("a relation is not a pair of object indices with a score row")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(
            id.clone(),
            Prediction {
                names,
                categories,
                labels,
                boxes,
                relations,
            },
        );
    }
    Ok(out)
}

/// `text` with Python's JSON constants `NaN`, `Infinity` and `-Infinity`
/// (outside strings) written as `0`.
fn python_json_constants_as_zero(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            let step = match c {
                '\\' => rest.chars().take(2).map(char::len_utf8).sum(),
                '"' => {
                    in_string = false;
                    1
                }
                _ => c.len_utf8(),
            };
            out.push_str(&rest[..step]);
            rest = &rest[step..];
            continue;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('0');
            rest = &rest[token.len()..];
            continue;
        }
        in_string = c == '"';
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Evaluates `records` as R1-SGG does over `dataset`: gathers each answer
/// ([`R1SggEval::gather`], sizes from the record or else `sizes`) and
/// scores it; returns the evaluation and each image's gathered prediction.
/// A record without a size anywhere, or whose ground truth R1-SGG could not
/// read, is an error naming it.
pub fn evaluate_records(
    records: &[Record],
    dataset: Dataset,
    sizes: &HashMap<String, (f64, f64)>,
) -> Result<(R1SggEval, Vec<(String, Gathered)>), anyhow::Error> {
    let mut eval = R1SggEval::new(dataset);
    let mut seen = HashSet::new();
    let mut gathered = Vec::with_capacity(records.len());
    for r in records {
        if !seen.insert(r.image_id.as_str()) {
            anyhow::bail!("image {} has two records", r.image_id);
        }
        let g = eval.gather(&r.response, r.box_scale, size_of(r, sizes)?);
        eval.add(&r.image_id, &g, &r.gt_objects, &r.gt_relationships)?;
        gathered.push((r.image_id.clone(), g));
    }
    Ok((eval, gathered))
}

/// The record's image size, or else the one in `sizes`.
fn size_of(r: &Record, sizes: &HashMap<String, (f64, f64)>) -> anyhow::Result<(f64, f64)> {
    r.size.or_else(|| sizes.get(&r.image_id).copied()).ok_or_else(|| {
        anyhow::anyhow!(
            "image {}: no width and height in the record, and none given (--image-sizes)",
            r.image_id
        )
    })
}

/// This crate's stricter evaluation ([`Evaluator`]) of `records`: each
/// answer read by [`parse_answer`] (boxes in `0..=1000`, so `box_scale`
/// must be 1000 x 1000), the ground truth normalized by the image size and
/// checked ([`crate::data::scene::SceneGraph::check`]); labels outside `vocab` counted.
pub fn evaluate_strict(
    records: &[Record],
    vocab: &Vocabulary,
    sizes: &HashMap<String, (f64, f64)>,
) -> anyhow::Result<EvalSummary> {
    let mut eval = Evaluator::default().with_vocabulary(vocab);
    for r in records {
        if r.box_scale != [1000.0, 1000.0] {
            anyhow::bail!(
                "image {}: box_scale {:?}; the strict evaluation reads boxes in 0..1000",
                r.image_id,
                r.box_scale
            );
        }
        let size = size_of(r, sizes)?;
        let json = r.to_json();
        let gt = scene_graph(json.get("gt_objects"), json.get("gt_relationships"), size)
            .map_err(|e| anyhow::anyhow!("image {}: ground truth {e}", r.image_id))?;
        eval.add_parsed(&parse_answer(&r.response, FORM), &gt);
    }
    Ok(eval.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample's record carries its ground truth in pixels, so R1-SGG's
    /// evaluation of the sample's own graph, written as a model would
    /// answer, recalls every triplet.
    #[test]
    fn a_samples_record_scores_its_own_graph_perfectly() {
        use crate::data::format::answer_text;
        use crate::data::scene::{Object, Relation, SceneGraph};
        let graph = SceneGraph {
            objects: vec![
                Object::from_id("man.1", [0.1, 0.2, 0.5, 0.9]),
                Object::from_id("horse.2", [0.3, 0.4, 1.0, 1.0]),
            ],
            relations: vec![Relation::new("man.1", "riding", "horse.2")],
        };
        let sample = crate::data::Sample {
            id: "7".into(),
            image: image::RgbImage::new(640, 480),
            graph,
        };
        let record = Record::from_sample(&sample, &answer_text(&sample.graph, None));
        assert_eq!(record.size, Some((640.0, 480.0)));
        assert_eq!(
            record.gt_objects[0]["bbox"][2].as_f64().unwrap(),
            0.5f32 as f64 * 640.0
        );
        let (eval, _) = evaluate_records(&[record], Dataset::Vg150, &HashMap::new()).unwrap();
        let s = eval.summary();
        assert_eq!((s.failures, s.recall_images), (0, 1));
        assert!(s.recall.iter().all(|&(_, r)| r == 1.0), "{:?}", s.recall);
    }

    #[test]
    fn python_constants_outside_strings_only() {
        assert_eq!(
            python_json_constants_as_zero(r#"[NaN, -Infinity, "NaN \" Infinity", Infinity]"#),
            r#"[0, 0, "NaN \" Infinity", 0]"#
        );
    }

    #[test]
    fn gathered_files_as_r1_sgg_writes_them() {
        // A kept graph, and a padded image whose dummy box is NaN (R1-SGG's
        // torch.empty), which only Python's JSON reader takes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sgg_pred_results.json");
        std::fs::write(
            &path,
            r#"{"1": {"names": ["man.1", "horse.2"], "names_target": ["man", "horse"],
                "graph": {"pred_boxes": [[0, 0, 9, 9], [20.5, 20, 59, 59]], "pred_boxes_class": [78, 64],
                          "all_node_pairs": [[0, 1]], "all_relation": [[0, 0, 1, 0]]}},
                "2": {"names": ["unknown"], "names_target": ["unknown"],
                "graph": {"pred_boxes": [[NaN, -Infinity, 0, 0]], "pred_boxes_class": [0],
                          "all_node_pairs": [[0, 0]], "all_relation": [[0.0, 0.0, 0.0, 0.0]]}}}"#,
        )
        .unwrap();
        let back = read_gathered(&path).unwrap();
        assert_eq!(back["1"].relations, vec![(0, 1, 2)]);
        assert_eq!(back["1"].boxes[1], [20.5, 20.0, 59.0, 59.0]);
        assert_eq!(back["2"], Prediction::default());
        std::fs::write(&path, r#"{"1": {"names": ["a.1"]}}"#).unwrap();
        assert!(read_gathered(&path).is_err());
    }

    #[test]
    fn image_sizes_from_a_dataset_file() {
        // fixtures/scenes.jsonl names its images: sizes from their headers.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/scenes.jsonl");
        let sizes = read_image_sizes(Path::new(path)).unwrap();
        assert!(!sizes.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sizes.jsonl");
        std::fs::write(&file, "{\"image_id\": 7, \"width\": 640, \"height\": 480}\n\n").unwrap();
        assert_eq!(read_image_sizes(&file).unwrap()["7"], (640.0, 480.0));
        std::fs::write(&file, "{\"image_id\": 7}\n").unwrap();
        assert!(read_image_sizes(&file).is_err());
    }

    #[test]
    fn records_round_trip_through_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let records = vec![
            Record::new(
                "a/1",
                "<answer>{}</answer>",
                json!([{"id": "man.1", "bbox": [0, 0, 5, 5]}]),
                json!([]),
                [1000.0, 1000.0],
                (10.0, 20.0),
            ),
            Record::new("2", "x", json!("[]"), json!("[]"), [500.0, 400.0], (3.0, 4.0)),
        ];
        write_records(&records, dir.path()).unwrap();
        let back = read_records(dir.path()).unwrap();
        // Written as JSON strings, read back as them; ordered by file name.
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].image_id, "2");
        assert_eq!(back[1].image_id, "a/1");
        assert_eq!(back[1].gt_objects, json!(r#"[{"bbox":[0,0,5,5],"id":"man.1"}]"#));
        assert_eq!(
            (back[0].box_scale, back[0].size),
            ([500.0, 400.0], Some((3.0, 4.0)))
        );
        // R1-SGG's own records: no size, no box_scale (read as 1000 x 1000).
        let r = Record::from_json(
            &json!({"image_id": 7, "response": "", "gt_objects": "[]", "gt_relationships": "[]"}),
        )
        .unwrap();
        assert_eq!(
            (r.image_id.as_str(), r.box_scale, r.size),
            ("7", [1000.0, 1000.0], None)
        );
        assert!(Record::from_json(&json!({"image_id": 7})).is_err());
    }
}
