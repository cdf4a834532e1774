//! R1-SGG's prompts and SFT target for a chat model (Qwen2-VL), as its code
//! writes them (gpt4vision/R1-SGG at e4de64d; the texts below are data,
//! transcribed from the files named):
//!
//! - the **system prompt**: R1's "A conversation between User and
//!   Assistant ..." with `<think>`/`<answer>` tags for GRPO
//!   (`open_r1/grpo.py` lines 808-813), or "You are a helpful and multimodal
//!   AI assistant." for SFT (`src/sft_sgg.py` `format_data`), evaluation
//!   (`src/sgg_inference_vllm.py` line 124) and GRPO with
//!   `--disable_think_tags` (`grpo.py` line 884);
//! - the **user turn**: the image, then the open-vocabulary request
//!   `PROMPT_SG` or the closed-vocabulary `PROMPT_CLOSE_TEMPLATE` with the
//!   object and predicate lists inserted as Python's `json.dumps` writes
//!   them (`open_r1/trainer/utils/prompt_gallery.py`: `PROMPT_CLOSE_VG150`,
//!   `PROMPT_CLOSE_PSG`; the synthetic vocabulary gets the same template);
//! - the **SFT target** (`src/sft_sgg.py` `format_answer`): a fenced JSON
//!   block, one `json.dumps` line per object and relation, boxes as
//!   `int(x / image_width * 1000)` (0..1000).
//!
//! The messages are rendered by the model's own chat template
//! ([`crate::hf::tokenizer::ChatTemplate`]), as transformers'
//! `apply_chat_template` does. R1-SGG's closed prompts drop an
//! "of size (W x H) " phrase that the dataset's `prompt_close` column may
//! hold (`grpo.py` line 880); the template here never has it.

use crate::data::format::BoxRounding;
use crate::data::scene::{SceneGraph, Vocabulary};
use crate::hf::tokenizer::{Message, Part};

/// R1-SGG's GRPO system prompt (`open_r1/grpo.py` lines 808-813): think,
/// then answer, in tags.
pub const SYSTEM_PROMPT_THINK: &str = "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>";

/// R1-SGG's plain system prompt (SFT, evaluation, GRPO without think tags).
pub const SYSTEM_PROMPT_PLAIN: &str = "You are a helpful and multimodal AI assistant.";

/// `PROMPT_SG` (`prompt_gallery.py` line 14): a scene graph in any vocabulary.
pub const PROMPT_OPEN: &str = "Generate a structured scene graph for an image using the following format:\n\n```json\n{\n  \"objects\": [\n    {\"id\": \"object_name.number\", \"bbox\": [x1, y1, x2, y2]},\n    ...\n  ],\n  \"relationships\": [\n    {\"subject\": \"object_name.number\", \"predicate\": \"relationship_type\", \"object\": \"object_name.number\"},\n    ...\n  ]\n}\n```\n\n### **Guidelines:**\n- **Objects:**\n  - Assign a unique ID for each object using the format `\"object_name.number\"` (e.g., `\"person.1\"`, `\"bike.2\"`).\n  - Provide its bounding box `[x1, y1, x2, y2]` in integer pixel format.\n  - Include all visible objects, even if they have no relationships.\n\n- **Relationships:**\n  - Represent interactions accurately using `\"subject\"`, `\"predicate\"`, and `\"object\"`.\n  - Omit relationships for orphan objects.\n\n### **Example Output:**\n```json\n{\n  \"objects\": [\n    {\"id\": \"person.1\", \"bbox\": [120, 200, 350, 700]},\n    {\"id\": \"bike.2\", \"bbox\": [100, 600, 400, 800]},\n    {\"id\": \"helmet.3\", \"bbox\": [150, 150, 280, 240]},\n    {\"id\": \"tree.4\", \"bbox\": [500, 100, 750, 700]}\n  ],\n  \"relationships\": [\n    {\"subject\": \"person.1\", \"predicate\": \"riding\", \"object\": \"bike.2\"},\n    {\"subject\": \"person.1\", \"predicate\": \"wearing\", \"object\": \"helmet.3\"}\n  ]\n}\n```\n\nNow, generate the complete scene graph for the provided image:\n";

/// `PROMPT_CLOSE_TEMPLATE` (`prompt_gallery.py` line 16): `{OBJ_CLS}` and
/// `{REL_CLS}` become the vocabulary's lists ([`user_text`]).
pub const PROMPT_CLOSED_TEMPLATE: &str = "Generate a structured scene graph for an image using the specified object and relationship categories.\n\n### **Output Format:**\n```json\n{\n  \"objects\": [\n    {\"id\": \"object_name.number\", \"bbox\": [x1, y1, x2, y2]},\n    ...\n  ],\n  \"relationships\": [\n    {\"subject\": \"object_name.number\", \"predicate\": \"relationship_type\", \"object\": \"object_name.number\"},\n    ...\n  ]\n}\n```\n\n### **Guidelines:**\n- **Objects:**\n  - Assign unique IDs in the format `\"object_name.number\"` (e.g., `\"person.1\"`). The **object_name** must belong to the predefined object set: `{OBJ_CLS}`.\n  - Provide a bounding box `[x1, y1, x2, y2]` in integer pixel format.\n  - Include all visible objects, even if they have no relationships.\n\n- **Relationships:**\n  - Define relationships using `\"subject\"`, `\"predicate\"`, and `\"object\"`.\n  - The **predicate** must belong to the predefined relationship set: `{REL_CLS}`.\n  - Omit relationships for orphan objects.\n\n### **Example Output:**\n```json\n{\n  \"objects\": [\n    {\"id\": \"person.1\", \"bbox\": [120, 200, 350, 700]},\n    {\"id\": \"bike.2\", \"bbox\": [100, 600, 400, 800]},\n    {\"id\": \"helmet.3\", \"bbox\": [150, 150, 280, 240]},\n    {\"id\": \"tree.4\", \"bbox\": [500, 100, 750, 700]}\n  ],\n  \"relationships\": [\n    {\"subject\": \"person.1\", \"predicate\": \"riding\", \"object\": \"bike.2\"},\n    {\"subject\": \"person.1\", \"predicate\": \"wearing\", \"object\": \"helmet.3\"}\n  ]\n}\n```\n\nNow, generate the complete scene graph for the provided image:\n";

/// Which system prompt a chat starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SystemPrompt {
    /// [`SYSTEM_PROMPT_THINK`]: the answer is expected as
    /// `<think>...</think><answer>...</answer>` (R1-SGG's GRPO).
    Think,
    /// [`SYSTEM_PROMPT_PLAIN`] (R1-SGG's SFT and evaluation).
    Plain,
}

impl SystemPrompt {
    /// The text.
    pub fn text(self) -> &'static str {
        match self {
            SystemPrompt::Think => SYSTEM_PROMPT_THINK,
            SystemPrompt::Plain => SYSTEM_PROMPT_PLAIN,
        }
    }
}

/// What a prompt asks for: the system prompt and, for a closed vocabulary,
/// its labels (R1-SGG's `--use_predefined_cats`); `None` asks in the open
/// vocabulary (R1-SGG's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptStyle {
    /// The system turn.
    pub system: SystemPrompt,
    /// The closed vocabulary, if any.
    pub vocabulary: Option<Vocabulary>,
}

/// The user's request: [`PROMPT_OPEN`], or [`PROMPT_CLOSED_TEMPLATE`] with
/// the vocabulary's objects and predicates as `json.dumps` lists (R1-SGG's
/// `format_prompt_close_sg`; `PROMPT_CLOSE_VG150` and `PROMPT_CLOSE_PSG`
/// for [`crate::data::scene::VG150`] and [`crate::data::scene::PSG`]).
pub fn user_text(vocabulary: Option<&Vocabulary>) -> String {
    match vocabulary {
        None => PROMPT_OPEN.to_string(),
        Some(v) => PROMPT_CLOSED_TEMPLATE
            .replace("{OBJ_CLS}", &py_json_list(v.objects))
            .replace("{REL_CLS}", &py_json_list(v.predicates)),
    }
}

/// The chat of one sample: the system turn, the user turn (the image, then
/// [`user_text`]), and the assistant's `answer` when given (an SFT
/// example). Render with the model's template, with the generation prompt
/// when there is no answer.
pub fn messages(style: &PromptStyle, answer: Option<&str>) -> Vec<Message> {
    let mut chat = vec![
        Message::text("system", style.system.text()),
        Message::parts(
            "user",
            vec![
                Part::Image,
                Part::Text {
                    text: user_text(style.vocabulary.as_ref()),
                },
            ],
        ),
    ];
    if let Some(answer) = answer {
        chat.push(Message::parts(
            "assistant",
            vec![Part::Text {
                text: answer.to_string(),
            }],
        ));
    }
    chat
}

/// R1-SGG's SFT target for `graph` (`src/sft_sgg.py` `format_answer`):
///
/// ~~~text
/// ```json
/// {
///   "objects": [
/// {"id": "man.1", "bbox": [100, 200, 500, 900]},
/// {"id": "horse.2", "bbox": [300, 400, 1000, 1000]}
///   ],
///   "relationships": [
/// {"subject": "man.1", "predicate": "riding", "object": "horse.2"}
///   ]
/// }
/// ```
/// ~~~
///
/// (ending in a newline), each object and relation as Python's
/// `json.dumps` writes it. The answer parser reads it
/// ([`crate::data::format::parse_answer`] drops the fence).
pub fn sft_target(graph: &SceneGraph) -> String {
    let objects: Vec<String> = graph
        .objects
        .iter()
        .map(|o| {
            let [x1, y1, x2, y2] = o.bbox.map(|v| BoxRounding::Truncate.units(v));
            format!(
                "{{\"id\": {}, \"bbox\": [{x1}, {y1}, {x2}, {y2}]}}",
                py_json_str(&o.id)
            )
        })
        .collect();
    let relations: Vec<String> = graph
        .relations
        .iter()
        .map(|r| {
            format!(
                "{{\"subject\": {}, \"predicate\": {}, \"object\": {}}}",
                py_json_str(&r.subject),
                py_json_str(&r.predicate),
                py_json_str(&r.object)
            )
        })
        .collect();
    format!(
        "```json\n{{\n  \"objects\": [\n{}\n  ],\n  \"relationships\": [\n{}\n  ]\n}}\n```\n",
        objects.join(",\n"),
        relations.join(",\n")
    )
}

/// A string as Python's `json.dumps` writes it (`ensure_ascii=True`):
/// quotes, backslashes and control characters escaped, everything outside
/// ASCII as `\uXXXX` (UTF-16, lowercase hex).
fn py_json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// A list of strings as Python's `json.dumps` writes it: `["a", "b"]`.
fn py_json_list(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|s| py_json_str(s)).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::format::{parse_answer, AnswerForm};
    use crate::data::scene::{Object, Relation, PSG, SYNTHETIC, VG150};

    /// FNV-1a 64 of the text's UTF-8 bytes.
    fn fnv(s: &str) -> u64 {
        s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    /// Lengths and hashes of R1-SGG's own strings, computed in Python from
    /// `prompt_gallery.py` at e4de64d.
    #[test]
    fn the_prompts_are_r1_sggs() {
        let cases = [
            (user_text(None), 1269, 0x66c2_c2b4_0e8b_da05u64),
            (user_text(Some(&VG150)), 3291, 0xee9a_0a64_5780_3230),
            (user_text(Some(&PSG)), 3668, 0xa713_5885_6659_34cd),
            (user_text(Some(&SYNTHETIC)), 1549, 0xf850_d4eb_100e_8b53),
        ];
        for (i, (text, len, hash)) in cases.into_iter().enumerate() {
            assert_eq!((text.chars().count(), fnv(&text)), (len, hash), "case {i}");
        }
        let chat = messages(
            &PromptStyle {
                system: SystemPrompt::Think,
                vocabulary: None,
            },
            Some("x"),
        );
        assert_eq!(chat.len(), 3);
        assert_eq!(chat[1].image_count(), 1);
    }

    #[test]
    fn the_sft_target_is_r1_sggs() {
        // objects [{"id": "man.1", "bbox": [20, 20, 100, 90]}, {"id": "horse.2", "bbox": [140, 29, 200, 100]}]
        // in a 200x100 image through format_answer (Python).
        let graph = SceneGraph {
            objects: vec![
                Object::from_id("man.1", [20.0 / 200.0, 20.0 / 100.0, 100.0 / 200.0, 90.0 / 100.0]),
                Object::from_id(
                    "horse.2",
                    [140.0 / 200.0, 29.0 / 100.0, 200.0 / 200.0, 100.0 / 100.0],
                ),
            ],
            relations: vec![Relation::new("man.1", "riding", "horse.2")],
        };
        let want = concat!(
            "```json\n{\n  \"objects\": [\n",
            "{\"id\": \"man.1\", \"bbox\": [100, 200, 500, 900]},\n",
            "{\"id\": \"horse.2\", \"bbox\": [700, 290, 1000, 1000]}\n",
            "  ],\n  \"relationships\": [\n",
            "{\"subject\": \"man.1\", \"predicate\": \"riding\", \"object\": \"horse.2\"}\n",
            "  ]\n}\n```\n"
        );
        let text = sft_target(&graph);
        assert_eq!(text, want);
        let parsed = parse_answer(&text, AnswerForm::Relaxed);
        assert_eq!(parsed.graph.unwrap().relations, graph.relations);
        let empty = sft_target(&SceneGraph::default());
        assert_eq!(
            empty,
            "```json\n{\n  \"objects\": [\n\n  ],\n  \"relationships\": [\n\n  ]\n}\n```\n"
        );
    }

    #[test]
    fn strings_are_escaped_as_python_does() {
        // json.dumps of each (Python 3).
        assert_eq!(py_json_str("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(py_json_str("caf\u{e9}\n"), r#""caf\u00e9\n""#);
        assert_eq!(py_json_str("\u{1f600}"), r#""\ud83d\ude00""#);
        assert_eq!(py_json_str("\u{1}"), r#""\u0001""#);
        assert_eq!(py_json_list(&["in front of", "on"]), r#"["in front of", "on"]"#);
    }
}
