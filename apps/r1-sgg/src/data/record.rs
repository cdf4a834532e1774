//! One record of R1-SGG's data, whatever holds it (a JSONL line, a parquet
//! row): its `objects` and `relationships` read into a checked
//! [`SceneGraph`], boxes normalized, and written back with absolute pixel
//! boxes. Both readers ([`jsonl`](super::jsonl), [`parquet`](super::parquet))
//! go through [`scene_graph`], so they accept and reject the same records
//! with the same reasons, and both writers through [`objects_out`] and
//! [`relations_out`].

use serde::Serialize;
use serde_json::Value;

use super::scene::{Object, Relation, SceneGraph};
use super::Sample;

/// The scene graph of a record from its `objects` and `relationships`
/// fields (`None` when absent), boxes given in absolute pixels of a
/// `frame` of `(width, height)`.
///
/// - `objects`: `[{"id": "man.1", "bbox": [x1, y1, x2, y2]}, ...]`;
/// - `relationships`: `[{"subject": "man.1", "predicate": "riding",
///   "object": "horse.2"}, ...]`.
///
/// Either may be a JSON array or a string holding one, as in R1-SGG's
/// Hugging Face datasets (`json.loads(sample["objects"])` in
/// src/sft_sgg.py). Boxes are divided by the frame, as R1-SGG normalizes
/// its ground truth by the original image's size (open_r1/grpo.py), and
/// clipped to `[0, 1]` (R1-SGG does not clip; boxes past the edge exist in
/// its data and would otherwise leave the unit square the rewards assume).
/// A box with `x2 < x1` or `y2 < y1`, a box not of 4 numbers, a duplicated
/// id or a relation naming an undefined object is an error saying which.
pub(crate) fn scene_graph(
    objects: Option<&Value>,
    relationships: Option<&Value>,
    frame: (f64, f64),
) -> Result<SceneGraph, String> {
    let objects = embedded_list(objects, "objects")?
        .iter()
        .enumerate()
        .map(|(i, o)| read_object(o, frame).map_err(|e| format!("objects[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let relations = embedded_list(relationships, "relationships")?
        .iter()
        .enumerate()
        .map(|(i, r)| read_relation(r).map_err(|e| format!("relationships[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let graph = SceneGraph { objects, relations };
    graph.check()?;
    Ok(graph)
}

/// A list field `key`, written either as a JSON array or as a string holding one.
fn embedded_list(field: Option<&Value>, key: &str) -> Result<Vec<Value>, String> {
    match field {
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

fn read_object(o: &Value, (w, h): (f64, f64)) -> Result<Object, String> {
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

fn read_relation(r: &Value) -> Result<Relation, String> {
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

/// An object as R1-SGG's records hold it.
#[derive(Serialize)]
pub(crate) struct ObjectOut<'a> {
    id: &'a str,
    bbox: [Value; 4],
}

/// A relationship as R1-SGG's records hold it.
#[derive(Serialize)]
pub(crate) struct RelationOut<'a> {
    subject: &'a str,
    predicate: &'a str,
    object: &'a str,
}

/// The sample's objects with absolute pixel boxes on its image (see
/// [`pixel`]), which [`scene_graph`] reads back to the same boxes.
pub(crate) fn objects_out(s: &Sample) -> Vec<ObjectOut<'_>> {
    let (w, h) = s.image.dimensions();
    s.graph
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
        .collect()
}

/// The sample's relationships.
pub(crate) fn relations_out(s: &Sample) -> Vec<RelationOut<'_>> {
    s.graph
        .relations
        .iter()
        .map(|r| RelationOut {
            subject: &r.subject,
            predicate: &r.predicate,
            object: &r.object,
        })
        .collect()
}

/// A normalized coordinate as an absolute one on a `side`-pixel axis: the
/// nearest whole pixel when [`scene_graph`] maps it back to the very same
/// `f32` (always so for the synthetic boxes, which are whole pixels), else
/// the exact product as a float. The float also comes back bit for bit:
/// `v * side` is exact in `f64` (a 24-bit mantissa times a side below
/// 2^29), JSON numbers round-trip exactly, and dividing by `side` gives `v`.
fn pixel(v: f32, side: u32) -> Value {
    let side = side as f64;
    let p = v as f64 * side;
    let whole = p.round();
    // The reader's arithmetic, exactly.
    if whole.abs() < 1e15 && (whole / side).clamp(0.0, 1.0) as f32 == v {
        Value::from(whole as i64)
    } else {
        Value::from(p)
    }
}
