//! The prompt, the answer format, and the parser for model output, as in
//! R1-SGG (arXiv 2504.13617, code gpt4vision/R1-SGG).
//!
//! **Answer.** A scene graph is written as one JSON object inside
//! `<answer>` tags, after an optional `<think>` block:
//!
//! ```text
//! <think>...</think><answer>{"objects":[{"id":"man.1","bbox":[x1,y1,x2,y2]}],
//! "relationships":[{"subject":"man.1","predicate":"riding","object":"horse.2"}]}</answer>
//! ```
//!
//! Boxes are integers `0..=1000`: normalized coordinates times 1000, to
//! the nearest unit or truncated as R1-SGG's SFT target is ([`BoxRounding`]). The
//! [`AnswerForm::Strict`] form requires the think block (R1-SGG's GRPO
//! format), [`AnswerForm::Relaxed`] does not (R1-SGG's SFT target, and the
//! demo's tiny model, answer without thinking).
//!
//! **Parsing** never panics and never fails: [`parse_answer`] returns what
//! it could read and the first format rule the text breaks. The graph is
//! read leniently, as R1-SGG's `extract_answer_content` does (the text
//! between `<answer>` and `</answer>`, or after `<answer>` when the closing
//! tag is missing, or the whole text when there is no tag; a Markdown code
//! fence around the JSON is dropped), so node and edge rewards can score an
//! answer whose tags are wrong. It is *unparseable* (no graph: an evaluation
//! failure) when the text is longer than [`MAX_ANSWER_BYTES`], is not JSON,
//! or is JSON of another shape (an object with an `"objects"` array, each
//! object a string `"id"` and a `"bbox"` of four numbers). Box numbers are
//! divided by 1000 and clipped to `[0, 1]`, so any number, however huge,
//! gives a finite box.
//!
//! When the objects can be read but the relations cannot (no
//! `"relationships"` array, or a relation without string `"subject"`,
//! `"predicate"` and `"object"`), the graph holds the objects and no
//! relation, and the answer is a failure for the evaluation
//! ([`FormatError::Relations`], [`ParsedAnswer::failed`]): R1-SGG's node
//! rewards read only the objects and still score them, its edge rewards and
//! its evaluation fail on the relations.
//!
//! **Relations name objects by cleaned id**, as R1-SGG resolves them
//! (`pred_boxes[refine_node_edge(rel['subject'])]` in `open_r1/grpo.py`,
//! `names.index(sub)` on cleaned names in `src/sgg_gather_preds.py`): an
//! endpoint finds the first object whose id equals it after
//! [`normalize_label`] (`Man.1` finds `man.1`), and is rewritten to that
//! object's id, so the graph's relations resolve exactly.
//!
//! **Format rules** beyond parsing, each an invalid format but a graph that
//! is still scored: an empty graph (no objects: the public R1-SGG code
//! rewards it, a bug we do not copy); two objects whose ids are equal once
//! cleaned (relations would be ambiguous; the first object with the id is
//! the one they name); a relation naming an undefined object (the relation
//! is dropped from the graph, so it counts nothing).

use serde_json::Value;

use crate::data::scene::{category_of, normalize_label, Object, Relation, SceneGraph, Vocabulary};
use crate::util::rng::Rng;

/// Box coordinates in the answer are normalized coordinates times this.
pub const BOX_UNITS: f64 = 1000.0;

/// Longer answers are not parsed (a guard on time and memory; real answers
/// are a few kilobytes).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Which tags an answer must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnswerForm {
    /// `<think>...</think>` then `<answer>...</answer>`, nothing else
    /// around them but whitespace.
    #[default]
    Strict,
    /// `<answer>...</answer>`, optionally after a think block.
    Relaxed,
}

/// The instruction that asks for a scene graph over a closed vocabulary,
/// in the form the answer must take.
pub fn prompt(vocab: &Vocabulary, form: AnswerForm) -> String {
    let list = |labels: &[&str]| labels.join(", ");
    let tags = match form {
        AnswerForm::Strict => {
            "Think first inside <think> </think>, then give the answer inside <answer> </answer>."
        }
        AnswerForm::Relaxed => "Give the answer inside <answer> </answer>.",
    };
    let (a, b) = (
        vocab.objects.first().unwrap_or(&"a"),
        vocab.objects.get(1).unwrap_or(&"b"),
    );
    let p = vocab.predicates.first().unwrap_or(&"with");
    format!(
        "Generate the scene graph of the image.\n\
         Object categories: {}.\n\
         Predicates: {}.\n\
         Give each object an id \"category.number\" (numbers unique) and a box [x1, y1, x2, y2] \
         of integers from 0 (left, top) to 1000 (right, bottom). Relate objects by their ids.\n\
         {tags}\n\
         Example answer: <answer>{{\"objects\":[{{\"id\":\"{a}.1\",\"bbox\":[100,200,400,600]}},\
         {{\"id\":\"{b}.2\",\"bbox\":[500,250,900,700]}}],\"relationships\":[{{\"subject\":\"{a}.1\",\
         \"predicate\":\"{p}\",\"object\":\"{b}.2\"}}]}}</answer>",
        list(vocab.objects),
        list(vocab.predicates),
    )
}

/// How a normalized coordinate becomes an answer integer `0..=1000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BoxRounding {
    /// To the nearest unit: the demo's synthetic scenes, generated in memory
    /// (the results in the README were measured with it).
    #[default]
    Nearest,
    /// Down, as R1-SGG writes a dataset's pixel boxes into its SFT target:
    /// `int(x / iw * 1000)` (src/sft_sgg.py `format_data`). Used for data read
    /// from files in R1-SGG's layout (`--data`), so SFT on real data learns
    /// the boxes R1-SGG's models learn.
    Truncate,
}

impl BoxRounding {
    /// A normalized coordinate as an answer integer, clipped to `0..=1000`.
    pub fn units(self, v: f32) -> u32 {
        let x = v as f64 * BOX_UNITS;
        let units = match self {
            BoxRounding::Nearest => x.round(),
            // `v` is R1-SGG's f64 quotient `x / iw` rounded to f32, up to 6e-5
            // units below it: a coordinate on a whole unit would truncate one
            // lower. 1e-4 absorbs that and nothing more: it gives
            // `int(x / iw * 1000)` for every whole, half and quarter pixel of
            // images up to 4096 px wide (5M random boxes, checked in Python; the
            // test checks whole and half pixels up to 2048 px exhaustively).
            BoxRounding::Truncate => (x + 1e-4).floor(),
        };
        units.clamp(0.0, BOX_UNITS) as u32
    }
}

/// An answer number as a normalized coordinate, clipped to `[0, 1]`.
fn from_units(v: f64) -> f32 {
    (v / BOX_UNITS).clamp(0.0, 1.0) as f32
}

/// A JSON string literal.
fn quoted(s: &str) -> String {
    Value::from(s).to_string()
}

/// The graph as compact answer JSON, keys in R1-SGG's order, boxes as
/// integers `0..=1000` to the nearest unit.
pub fn graph_json(graph: &SceneGraph) -> String {
    graph_json_with(graph, BoxRounding::Nearest)
}

/// [`graph_json`] with boxes rounded as `rounding` says.
pub fn graph_json_with(graph: &SceneGraph, rounding: BoxRounding) -> String {
    let objects: Vec<String> = graph
        .objects
        .iter()
        .map(|o| {
            let [x1, y1, x2, y2] = o.bbox.map(|v| rounding.units(v));
            format!("{{\"id\":{},\"bbox\":[{x1},{y1},{x2},{y2}]}}", quoted(&o.id))
        })
        .collect();
    let relations: Vec<String> = graph
        .relations
        .iter()
        .map(|r| {
            format!(
                "{{\"subject\":{},\"predicate\":{},\"object\":{}}}",
                quoted(&r.subject),
                quoted(&r.predicate),
                quoted(&r.object)
            )
        })
        .collect();
    format!(
        "{{\"objects\":[{}],\"relationships\":[{}]}}",
        objects.join(","),
        relations.join(",")
    )
}

/// The full answer text: `<think>{think}</think><answer>{json}</answer>`
/// (strict form) when `think` is given, else `<answer>{json}</answer>`
/// (relaxed form, R1-SGG's SFT target). `think` must not contain
/// `</think>`. Boxes to the nearest unit.
pub fn answer_text(graph: &SceneGraph, think: Option<&str>) -> String {
    answer_text_with(graph, think, BoxRounding::Nearest)
}

/// [`answer_text`] with boxes rounded as `rounding` says.
pub fn answer_text_with(graph: &SceneGraph, think: Option<&str>, rounding: BoxRounding) -> String {
    let answer = format!("<answer>{}</answer>", graph_json_with(graph, rounding));
    match think {
        Some(t) => format!("<think>{t}</think>{answer}"),
        None => answer,
    }
}

/// SFT augmentation: the objects shuffled and renumbered `category.1,
/// category.2, ...` in their new order, so the model cannot learn ids or
/// order by heart, and with `shuffle_relations` the relations shuffled too
/// (the demo's `--shuffle`). Without it this is R1-SGG's augmentation
/// (`src/sft_sgg.py` `format_answer(shuffle=True)`: `random.shuffle` of the
/// objects, relations renamed in their order). Deterministic by `seed`.
/// Relations keep naming the same objects; a relation whose endpoint is
/// undefined is dropped (R1-SGG's code raises a `KeyError` on one).
pub fn augment(graph: &SceneGraph, seed: u64, shuffle_relations: bool) -> SceneGraph {
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..graph.objects.len()).collect();
    rng.shuffle(&mut order);
    let mut new_id = vec![String::new(); graph.objects.len()];
    let objects = order
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let o = &graph.objects[i];
            new_id[i] = format!("{}.{}", o.category, k + 1);
            Object {
                id: new_id[i].clone(),
                ..o.clone()
            }
        })
        .collect();
    let mut relations: Vec<Relation> = graph
        .triplets()
        .into_iter()
        .map(|t| Relation::new(&new_id[t.subject], t.predicate, &new_id[t.object]))
        .collect();
    if shuffle_relations {
        rng.shuffle(&mut relations);
    }
    SceneGraph { objects, relations }
}

/// The first format rule an answer breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Longer than [`MAX_ANSWER_BYTES`]; not parsed.
    TooLong {
        /// The answer's length in bytes.
        bytes: usize,
    },
    /// The think/answer tags are missing or out of place for the form.
    Tags,
    /// The answer is not JSON (serde_json's message).
    Json(String),
    /// The JSON is not a scene graph: what is wrong.
    Schema(String),
    /// The objects can be read, the relations cannot: what is wrong. The
    /// graph holds the objects; the answer counts as a failure.
    Relations(String),
    /// The graph has no objects.
    Empty,
    /// Two objects share this id (once cleaned, [`normalize_label`]).
    DuplicateId(String),
    /// A relation names this id, which no object has.
    UndefinedObject(String),
}

/// What [`parse_answer`] read from a model's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedAnswer {
    /// The graph, or `None` when the output is unparseable; only the
    /// objects when its relations cannot be read ([`FormatError::Relations`]).
    pub graph: Option<SceneGraph>,
    /// `Ok` when the output follows every format rule.
    pub format: Result<(), FormatError>,
}

impl ParsedAnswer {
    /// Whether the output follows every format rule.
    pub fn is_valid(&self) -> bool {
        self.format.is_ok()
    }

    /// Whether no whole graph could be read (an evaluation failure): none
    /// at all, or objects without readable relations.
    pub fn failed(&self) -> bool {
        self.graph.is_none() || matches!(self.format, Err(FormatError::Relations(_)))
    }
}

/// Reads a model's output. Never panics, on any input.
pub fn parse_answer(text: &str, form: AnswerForm) -> ParsedAnswer {
    if text.len() > MAX_ANSWER_BYTES {
        return ParsedAnswer {
            graph: None,
            format: Err(FormatError::TooLong { bytes: text.len() }),
        };
    }
    let (graph, content) = match read_graph(answer_content(text)) {
        Ok((graph, problem)) => (Some(graph), problem.map_or(Ok(()), Err)),
        Err(e) => (None, Err(e)),
    };
    let format = if tags_match(text, form) {
        content
    } else {
        Err(FormatError::Tags)
    };
    ParsedAnswer { graph, format }
}

/// Whether the trimmed text is exactly `[<think>...</think> ws]
/// <answer>...</answer>` (the think block required in the strict form),
/// each block ending at the first closing tag.
fn tags_match(text: &str, form: AnswerForm) -> bool {
    let text = text.trim();
    let rest = match text.strip_prefix("<think>") {
        Some(think) => match think.find("</think>") {
            Some(end) => think[end + "</think>".len()..].trim_start(),
            None => return false,
        },
        None if form == AnswerForm::Strict => return false,
        None => text,
    };
    match rest
        .strip_prefix("<answer>")
        .and_then(|a| a.find("</answer>").map(|end| (a, end)))
    {
        Some((answer, end)) => answer.len() == end + "</answer>".len(),
        None => false,
    }
}

/// The JSON part of an answer, found leniently (see the module docs).
fn answer_content(text: &str) -> &str {
    let inner = match text.find("<answer>") {
        Some(start) => {
            let rest = &text[start + "<answer>".len()..];
            rest.find("</answer>").map_or(rest, |end| &rest[..end])
        }
        None => text,
    };
    let inner = inner.trim();
    let inner = inner
        .strip_prefix("```json")
        .or_else(|| inner.strip_prefix("```"))
        .unwrap_or(inner);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

/// The graph in `json`, with the first format rule it breaks; `Err` when
/// it is not a graph at all.
fn read_graph(json: &str) -> Result<(SceneGraph, Option<FormatError>), FormatError> {
    // serde_json stops at 128 levels of nesting, so deep input cannot
    // overflow the stack.
    let value: Value = serde_json::from_str(json).map_err(|e| FormatError::Json(e.to_string()))?;
    let schema = FormatError::Schema;
    let list = |key: &str| match value.get(key) {
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(schema(format!("\"{key}\" is not an array"))),
        None => Err(schema(format!("no \"{key}\" array"))),
    };
    if !value.is_object() {
        return Err(schema("the answer is not a JSON object".into()));
    }
    let objects = list("objects")?
        .iter()
        .enumerate()
        .map(|(i, o)| {
            read_object(o).ok_or_else(|| {
                schema(format!(
                    "objects[{i}] needs a string \"id\" and a \"bbox\" of 4 numbers"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Unreadable relations leave the objects scoreable (R1-SGG's node rewards).
    let relations = list("relationships").map_err(|e| match e {
        FormatError::Schema(reason) => FormatError::Relations(reason),
        other => other,
    });
    let relations = relations.and_then(|items| {
        items
            .iter()
            .enumerate()
            .map(|(i, r)| {
                read_relation(r).ok_or_else(|| {
                    FormatError::Relations(format!(
                        "relationships[{i}] needs string \"subject\", \"predicate\" and \"object\""
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
    });
    let (relations, unreadable) = match relations {
        Ok(r) => (r, None),
        Err(e) => (Vec::new(), Some(e)),
    };

    let mut problem = None;
    // Cleaned id -> the first object with it.
    let mut by_clean_id = std::collections::HashMap::new();
    for (i, o) in objects.iter().enumerate() {
        match by_clean_id.entry(normalize_label(&o.id)) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(i);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                problem = problem.or(Some(FormatError::DuplicateId(o.id.clone())));
            }
        }
    }
    let resolve = |id: &str| {
        by_clean_id
            .get(&normalize_label(id))
            .map(|&i| objects[i].id.clone())
    };
    let mut resolved = Vec::with_capacity(relations.len());
    for r in relations {
        match (resolve(&r.subject), resolve(&r.object)) {
            (Some(subject), Some(object)) => resolved.push(Relation { subject, object, ..r }),
            (s, _) => {
                let missing = if s.is_none() { r.subject } else { r.object };
                problem = problem.or(Some(FormatError::UndefinedObject(missing)));
            }
        }
    }
    if objects.is_empty() {
        problem = Some(FormatError::Empty);
    }
    // Unreadable relations make a failure, whatever else is wrong.
    let problem = unreadable.or(problem);
    Ok((
        SceneGraph {
            objects,
            relations: resolved,
        },
        problem,
    ))
}

fn read_object(o: &Value) -> Option<Object> {
    let id = o.get("id")?.as_str()?;
    let b = o.get("bbox")?.as_array()?;
    let coords: Vec<f64> = b.iter().map(Value::as_f64).collect::<Option<_>>()?;
    let &[x1, y1, x2, y2] = coords.as_slice() else {
        return None;
    };
    Some(Object {
        id: id.to_string(),
        category: category_of(id).to_string(),
        bbox: [x1, y1, x2, y2].map(from_units),
    })
}

fn read_relation(r: &Value) -> Option<Relation> {
    let field = |k: &str| r.get(k)?.as_str();
    Some(Relation::new(
        field("subject")?,
        field("predicate")?,
        field("object")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scene::SYNTHETIC;
    use crate::data::synthetic::{generate_split, Split};
    use proptest::prelude::*;

    fn graph() -> SceneGraph {
        SceneGraph {
            objects: vec![
                Object::from_id("man.1", [0.1, 0.2, 0.5, 0.9]),
                Object::from_id("horse.2", [0.3, 0.4, 1.0, 1.0]),
                Object::from_id("hat.3", [0.15, 0.1, 0.3, 0.22]),
            ],
            relations: vec![
                Relation::new("man.1", "riding", "horse.2"),
                Relation::new("man.1", "wearing", "hat.3"),
            ],
        }
    }

    #[test]
    fn serializes_like_r1_sgg() {
        let json = graph_json(&graph());
        assert_eq!(
            json,
            r#"{"objects":[{"id":"man.1","bbox":[100,200,500,900]},{"id":"horse.2","bbox":[300,400,1000,1000]},{"id":"hat.3","bbox":[150,100,300,220]}],"relationships":[{"subject":"man.1","predicate":"riding","object":"horse.2"},{"subject":"man.1","predicate":"wearing","object":"hat.3"}]}"#
        );
        assert_eq!(answer_text(&graph(), None), format!("<answer>{json}</answer>"));
        assert_eq!(
            answer_text(&graph(), Some("two things")),
            format!("<think>two things</think><answer>{json}</answer>")
        );
        // Strings are escaped.
        let odd = SceneGraph {
            objects: vec![Object::from_id("a\"b\\c.1", [0.0, 0.0, 1.0, 1.0])],
            relations: vec![],
        };
        let back = parse_answer(&answer_text(&odd, None), AnswerForm::Relaxed);
        assert_eq!(back.graph.unwrap().objects[0].id, "a\"b\\c.1");
    }

    #[test]
    fn truncation_is_r1_sggs_int_of_pixels_over_size() {
        // R1-SGG's `int(box[0] / iw * 1000)` in f64, as Python computes it, against
        // the coordinate our loaders keep: the same quotient clipped and stored as f32.
        for iw in 1..=2048u32 {
            let side = iw as f64;
            for half_pixels in 0..=2 * iw {
                let x = half_pixels as f64 / 2.0;
                let python = (x / side * 1000.0).trunc() as u32;
                let v = (x / side).clamp(0.0, 1.0) as f32;
                assert_eq!(BoxRounding::Truncate.units(v), python, "x {x}, iw {iw}");
            }
        }
        // Where the two differ, and the clipping both share.
        assert_eq!(BoxRounding::Truncate.units(2.0 / 3.0), 666);
        assert_eq!(BoxRounding::Nearest.units(2.0 / 3.0), 667);
        for rounding in [BoxRounding::Truncate, BoxRounding::Nearest] {
            assert_eq!(rounding.units(1.5), 1000);
            assert_eq!(rounding.units(-0.2), 0);
            assert_eq!(rounding.units(f32::NAN), 0);
        }
        let g = SceneGraph {
            objects: vec![Object::from_id("a.1", [1.0 / 3.0, 0.0, 2.0 / 3.0, 0.9999])],
            relations: vec![],
        };
        assert!(answer_text_with(&g, None, BoxRounding::Truncate).contains("[333,0,666,999]"));
        assert!(answer_text(&g, None).contains("[333,0,667,1000]"));
    }

    #[test]
    fn round_trips_every_synthetic_sample() {
        for s in generate_split(Split::Train, 100, 9)
            .iter()
            .chain(&generate_split(Split::Shifted, 30, 9))
        {
            for (text, form) in [
                (answer_text(&s.graph, None), AnswerForm::Relaxed),
                (answer_text(&s.graph, Some("shapes")), AnswerForm::Strict),
            ] {
                let parsed = parse_answer(&text, form);
                assert_eq!(parsed.format, Ok(()), "{text}");
                // Boxes come back to within half a unit (1/2000).
                let g = parsed.graph.unwrap();
                assert_eq!(g.relations, s.graph.relations);
                for (a, b) in g.objects.iter().zip(&s.graph.objects) {
                    assert_eq!((&a.id, &a.category), (&b.id, &b.category));
                    assert!(a
                        .bbox
                        .iter()
                        .zip(&b.bbox)
                        .all(|(x, y)| (x - y).abs() <= 0.5e-3 + 1e-7));
                }
            }
        }
    }

    #[test]
    fn augmentation_shuffles_and_renumbers() {
        let g = graph();
        let a = augment(&g, 3, true);
        assert_eq!(a, augment(&g, 3, true));
        // Without shuffling the relations, R1-SGG's: the same objects, the
        // relations renamed in their order.
        let r1 = augment(&g, 3, false);
        assert_eq!(r1.objects, a.objects);
        let names = |g: &SceneGraph| -> Vec<String> {
            g.triplets()
                .iter()
                .map(|t| {
                    format!(
                        "{:?}{}{:?}",
                        g.objects[t.subject].bbox, t.predicate, g.objects[t.object].bbox
                    )
                })
                .collect()
        };
        assert_eq!(names(&r1), names(&g));
        a.check().unwrap();
        // Ids are renumbered by position.
        for (k, o) in a.objects.iter().enumerate() {
            assert_eq!(o.id, format!("{}.{}", o.category, k + 1));
        }
        // The same objects and the same triplets, by category and box.
        let key = |g: &SceneGraph| {
            let mut t: Vec<String> = g
                .triplets()
                .iter()
                .map(|t| {
                    format!(
                        "{:?} {} {:?}",
                        g.objects[t.subject].bbox, t.predicate, g.objects[t.object].bbox
                    )
                })
                .collect();
            t.sort();
            t
        };
        assert_eq!(key(&a), key(&g));
        // Some seed reorders the objects.
        assert!((0..20).any(|seed| augment(&g, seed, true).objects[0].category != "man"));
    }

    #[test]
    fn tags_by_form() {
        let json = graph_json(&graph());
        // (text, valid strict, valid relaxed, graph readable)
        let cases = [
            (
                format!("<think>x</think><answer>{json}</answer>"),
                true,
                true,
                true,
            ),
            (
                format!("  <think>\nx\n</think>\n <answer>{json}</answer>\n"),
                true,
                true,
                true,
            ),
            (format!("<answer>{json}</answer>"), false, true, true),
            (
                format!("<think>x</think><answer>{json}</answer> trailing"),
                false,
                false,
                true,
            ),
            (format!("preamble <answer>{json}</answer>"), false, false, true),
            (format!("<think>x<answer>{json}</answer>"), false, false, true),
            (format!("<answer>{json}"), false, false, true),
            (json.clone(), false, false, true),
            // No answer tag: the whole text is read, as R1-SGG does.
            (format!("<think>x</think>{json}"), false, false, false),
        ];
        for (text, strict, relaxed, readable) in cases {
            for (form, want) in [(AnswerForm::Strict, strict), (AnswerForm::Relaxed, relaxed)] {
                let parsed = parse_answer(&text, form);
                assert_eq!(parsed.is_valid(), want, "{form:?}: {text}");
                assert_eq!(parsed.graph.as_ref() == Some(&graph()), readable, "{text}");
                if !want {
                    assert_eq!(parsed.format, Err(FormatError::Tags));
                }
            }
        }
        let fenced = format!("<answer>```json\n{json}\n```</answer>");
        assert!(parse_answer(&fenced, AnswerForm::Relaxed).is_valid());
    }

    #[test]
    fn every_format_rule() {
        let wrap = |json: &str| format!("<answer>{json}</answer>");
        let parse = |json: &str| parse_answer(&wrap(json), AnswerForm::Relaxed);
        let obj = r#"{"id":"a.1","bbox":[0,0,10,10]}"#;

        let p = parse(r#"{"objects":[],"relationships":[]}"#);
        assert_eq!(
            (p.format, p.graph),
            (Err(FormatError::Empty), Some(SceneGraph::default()))
        );

        let p = parse(&format!(r#"{{"objects":[{obj},{obj}],"relationships":[]}}"#));
        assert_eq!(p.format, Err(FormatError::DuplicateId("a.1".into())));
        assert_eq!(p.graph.unwrap().objects.len(), 2);
        // Ids are compared cleaned: A_1 and a-1 are one id.
        let p = parse(
            r#"{"objects":[{"id":"A.1","bbox":[0,0,1,1]},{"id":" a.1","bbox":[0,0,1,1]}],"relationships":[]}"#,
        );
        assert_eq!(p.format, Err(FormatError::DuplicateId(" a.1".into())));

        // Endpoints resolve after cleaning, to the first object with the
        // cleaned id, and are written as that object's id.
        let p = parse(
            r#"{"objects":[{"id":"Man.1","bbox":[0,0,1,1]},{"id":"tennis racket.2","bbox":[0,0,1,1]}],
            "relationships":[{"subject":"MAN.1","predicate":"holding","object":"tennis_racket.2"}]}"#,
        );
        assert_eq!(p.format, Ok(()));
        assert_eq!(
            p.graph.unwrap().relations,
            vec![Relation::new("Man.1", "holding", "tennis racket.2")]
        );

        let p = parse(&format!(
            r#"{{"objects":[{obj}],"relationships":[{{"subject":"a.1","predicate":"on","object":"b.2"}},{{"subject":"a.1","predicate":"on","object":"a.1"}}]}}"#
        ));
        assert_eq!(p.format, Err(FormatError::UndefinedObject("b.2".into())));
        assert_eq!(
            p.graph.unwrap().relations,
            vec![Relation::new("a.1", "on", "a.1")]
        );

        // Unparseable: not JSON, wrong shapes, wrong types.
        let unparseable = [
            "",
            "{",
            "[]",
            "null",
            r#""objects""#,
            r#"{"relationships":[]}"#,
            r#"{"objects":{},"relationships":[]}"#,
            r#"{"objects":[{"id":1,"bbox":[0,0,1,1]}],"relationships":[]}"#,
            r#"{"objects":[{"id":"a.1","bbox":[0,0,1]}],"relationships":[]}"#,
            r#"{"objects":[{"id":"a.1","bbox":[0,0,1,1,1]}],"relationships":[]}"#,
            r#"{"objects":[{"id":"a.1","bbox":[0,"0",1,1]}],"relationships":[]}"#,
            r#"{"objects":[{"id":"a.1","bbox":[0,0,1,NaN]}],"relationships":[]}"#,
            r#"{"objects":[{"id":"a.1","bbox":[0,0,1,1e999]}],"relationships":[]}"#,
            r#"{"objects":[{"id":"a.1"}],"relationships":[]}"#,
            r#"{"objects":["a.1"],"relationships":[]}"#,
        ];
        for json in unparseable {
            let p = parse(json);
            assert!(p.failed() && !p.is_valid() && p.graph.is_none(), "{json}: {p:?}");
            assert!(
                matches!(p.format, Err(FormatError::Json(_) | FormatError::Schema(_))),
                "{json}"
            );
        }
        // Objects readable, relations not: the objects are kept (R1-SGG's
        // node rewards score them), the answer is a failure.
        let relations_unreadable = [
            r#"{"objects":[{"id":"a.1","bbox":[0,0,1,1]}]}"#,
            r#"{"objects":[{"id":"a.1","bbox":[0,0,1,1]}],"relationships":{}}"#,
            r#"{"objects":[{"id":"a.1","bbox":[0,0,1,1]}],"relationships":[{"subject":"a.1","object":"a.1"}]}"#,
            r#"{"objects":[{"id":"a.1","bbox":[0,0,1,1]}],"relationships":[{"subject":"a.1","predicate":3,"object":"a.1"}]}"#,
            r#"{"objects":[],"relationships":[1]}"#,
            r#"{"objects":[]}"#,
        ];
        for json in relations_unreadable {
            let p = parse(json);
            assert!(p.failed() && !p.is_valid(), "{json}: {p:?}");
            assert!(
                matches!(p.format, Err(FormatError::Relations(_))),
                "{json}: {p:?}"
            );
            let g = p.graph.unwrap();
            assert!(g.relations.is_empty() && g.objects.len() <= 1, "{json}");
        }

        // Huge, negative and fractional numbers are clipped into the image.
        let p = parse(
            r#"{"objects":[{"id":"a.1","bbox":[-5,250.5,1e300,18446744073709551616]}],"relationships":[]}"#,
        );
        assert!(p.is_valid());
        assert_eq!(p.graph.unwrap().objects[0].bbox, [0.0, 0.2505, 1.0, 1.0]);

        // Extra keys are ignored; duplicate keys keep the last value.
        let p =
            parse(r#"{"objects":[{"id":"a.1","bbox":[0,0,1,1],"score":0.9}],"relationships":[],"note":1}"#);
        assert!(p.is_valid());

        // Deep nesting and oversized answers fail cleanly.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(&deep).failed());
        let long = wrap(&" ".repeat(MAX_ANSWER_BYTES));
        let p = parse_answer(&long, AnswerForm::Relaxed);
        assert!(matches!(p.format, Err(FormatError::TooLong { .. })) && p.failed());
    }

    #[test]
    fn prompt_lists_the_vocabulary() {
        for form in [AnswerForm::Strict, AnswerForm::Relaxed] {
            let p = prompt(&SYNTHETIC, form);
            for label in SYNTHETIC.objects.iter().chain(SYNTHETIC.predicates) {
                assert!(p.contains(label), "{label}");
            }
            assert_eq!(p.contains("<think>"), form == AnswerForm::Strict);
            // The example in the prompt is itself a valid answer.
            let example = &p[p.find("<answer>{").unwrap()..];
            assert!(parse_answer(example, AnswerForm::Relaxed).is_valid(), "{example}");
        }
    }

    /// A valid answer with one random edit: the parser must survive it.
    fn mutated_answer() -> impl Strategy<Value = String> {
        let base = answer_text(&graph(), Some("x"));
        let len = base.len();
        let edit = prop_oneof![
            (0..len).prop_map(|i| (0, i, String::new())),
            (0..len, ".{0,8}").prop_map(|(i, s)| (1, i, s)),
            (0..len, 1usize..40).prop_map(|(i, n)| (2, i, n.to_string())),
            (0..len, 0..len).prop_map(|(i, j)| (3, i, j.to_string())),
            (
                0..len,
                prop::sample::select(vec![
                    "1e308",
                    "-1e308",
                    "NaN",
                    "-7",
                    "99999999999999999999",
                    "1.5",
                    "null",
                    "\"7\""
                ])
            )
                .prop_map(|(i, s)| (4, i, s.to_string())),
        ];
        edit.prop_map(move |(kind, i, arg)| {
            let mut bytes = base.clone().into_bytes();
            match kind {
                0 => bytes.truncate(i),
                1 => {
                    bytes.splice(i..i, arg.into_bytes());
                }
                2 => {
                    let n: usize = arg.parse().unwrap();
                    bytes.drain(i..(i + n).min(bytes.len()));
                }
                3 => bytes.swap(i, arg.parse().unwrap()),
                _ => {
                    // Replace the number starting at or after i.
                    let start = (i..bytes.len()).find(|&k| bytes[k].is_ascii_digit()).unwrap_or(i);
                    let end = (start..bytes.len())
                        .find(|&k| !bytes[k].is_ascii_digit())
                        .unwrap_or(start);
                    bytes.splice(start..end, arg.into_bytes());
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    }

    fn assert_sane(p: &ParsedAnswer) {
        if let Some(g) = &p.graph {
            for o in &g.objects {
                assert!(o.bbox.iter().all(|v| (0.0..=1.0).contains(v)), "{o:?}");
            }
            assert_eq!(g.triplets().len(), g.relations.len());
        }
        if p.failed() {
            assert!(!p.is_valid());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_on_strings(s in ".*") {
            for form in [AnswerForm::Strict, AnswerForm::Relaxed] {
                assert_sane(&parse_answer(&s, form));
            }
        }

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let s = String::from_utf8_lossy(&bytes);
            assert_sane(&parse_answer(&s, AnswerForm::Strict));
        }

        #[test]
        fn never_panics_on_mutated_answers(s in mutated_answer()) {
            for form in [AnswerForm::Strict, AnswerForm::Relaxed] {
                assert_sane(&parse_answer(&s, form));
            }
        }
    }
}
