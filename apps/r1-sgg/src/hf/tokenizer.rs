//! Qwen2-VL's tokenizer: `tokenizer.json` through the `tokenizers` crate, the chat template
//! rendered as transformers renders it, and the special tokens the model and processor use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value as JinjaValue, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{read_json, ChatTemplateFile, HfError, ModelFiles, Result};

/// One part of a message whose content is a list, as transformers' chat messages spell it:
/// `{"type": "image"}` or `{"type": "text", "text": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    /// An image; the template writes `<|vision_start|><|image_pad|><|vision_end|>` for it.
    Image,
    /// Text.
    Text {
        /// The text.
        text: String,
    },
}

/// A message's content: a plain string, or a list of parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// `"content": "..."`.
    Text(String),
    /// `"content": [{"type": "image"}, {"type": "text", "text": "..."}]`.
    Parts(Vec<Part>),
}

/// A chat message, `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: Content,
}

impl Message {
    /// A message with plain-text content.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Content::Text(text.into()),
        }
    }

    /// A message with a list of parts.
    pub fn parts(role: impl Into<String>, parts: Vec<Part>) -> Self {
        Self {
            role: role.into(),
            content: Content::Parts(parts),
        }
    }

    /// How many images the message holds.
    pub fn image_count(&self) -> usize {
        match &self.content {
            Content::Text(_) => 0,
            Content::Parts(parts) => parts.iter().filter(|p| matches!(p, Part::Image)).count(),
        }
    }
}

/// Special-token names transformers passes to a chat template (its `special_tokens_map`), read
/// from `tokenizer_config.json`.
const TEMPLATE_SPECIAL_TOKENS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A chat template compiled as transformers 5.25's `_cached_compile_jinja_template` compiles it:
/// `trim_blocks` and `lstrip_blocks` on, loop controls (`break`/`continue`), no auto-escaping,
/// a `raise_exception(message)` function, and `tojson` as Python's
/// `json.dumps(x, ensure_ascii=False)` (not minijinja's HTML-safe one).
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    path: PathBuf,
    /// `bos_token`, `eos_token`, ... as the template sees them.
    special_tokens: Vec<(&'static str, String)>,
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `template` (read from `path`, which errors name); `tokenizer_config`, when given,
    /// supplies `bos_token`, `eos_token`, ... (string or `{"content": ...}`) to the template.
    pub fn new(template: &str, path: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<JinjaValue, _> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", python_tojson);
        env.add_template_owned(TEMPLATE_NAME, template.to_owned())
            .map_err(|source| HfError::Template {
                path: path.to_path_buf(),
                source,
            })?;
        let mut special_tokens = Vec::new();
        if let Some(config_path) = tokenizer_config {
            let config = read_json(config_path)?;
            for &key in TEMPLATE_SPECIAL_TOKENS {
                let text = match config.get(key) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
                    _ => None,
                };
                if let Some(text) = text {
                    special_tokens.push((key, text));
                }
            }
        }
        Ok(Self {
            env,
            path: path.to_path_buf(),
            special_tokens,
        })
    }

    /// The template of a model directory.
    pub fn from_file(file: &ChatTemplateFile, tokenizer_config: Option<&Path>) -> Result<Self> {
        Self::new(&file.template, &file.path, tokenizer_config)
    }

    /// The file the template came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renders `messages` as transformers' `apply_chat_template(..., tokenize=False)`:
    /// variables `messages`, `add_generation_prompt`, the special-token names, and `tools` and
    /// `documents` undefined (none are passed). An error names the template file and carries
    /// minijinja's message (a `raise_exception` call's text included).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let err = |source| HfError::Template {
            path: self.path.clone(),
            source,
        };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(err)?;
        let mut ctx: BTreeMap<&str, JinjaValue> = self
            .special_tokens
            .iter()
            .map(|(key, text)| (*key, JinjaValue::from(text.as_str())))
            .collect();
        ctx.insert("messages", JinjaValue::from_serialize(messages));
        ctx.insert("add_generation_prompt", JinjaValue::from(add_generation_prompt));
        template.render(ctx).map_err(err)
    }
}

/// Jinja's `tojson` as transformers overrides it: `json.dumps(x, ensure_ascii=False,
/// indent=indent)`, whose separators are `", "` and `": "` (`","` between items when indented),
/// with dict keys in insertion order.
fn python_tojson(value: &JinjaValue, kwargs: Kwargs) -> std::result::Result<JinjaValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&mut out, value, indent, 0)?;
    Ok(JinjaValue::from_safe_string(out))
}

fn write_python_json(
    out: &mut String,
    value: &JinjaValue,
    indent: Option<usize>,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    // Strings and numbers print as serde_json prints them, which escapes strings as Python
    // does with ensure_ascii=False (quotes, backslashes and control characters only).
    let scalar = |v: &JinjaValue| {
        serde_json::to_string(v)
            .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JinjaValue> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(out, item, indent, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<JinjaValue> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                // json.dumps writes non-string keys as their string form.
                let key_text = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                out.push_str(&scalar(&JinjaValue::from(key_text))?);
                out.push_str(": ");
                write_python_json(out, &value.get_item(key)?, indent, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => out.push_str(&scalar(value)?),
    }
    Ok(())
}

/// Qwen2-VL's special token ids, looked up by their text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `<|im_start|>`: starts a chat turn.
    pub im_start: u32,
    /// `<|im_end|>`: ends a chat turn (generation's end).
    pub im_end: u32,
    /// `<|endoftext|>`: Qwen2's pad token.
    pub endoftext: u32,
    /// `<|vision_start|>`: before an image's tokens.
    pub vision_start: u32,
    /// `<|vision_end|>`: after an image's tokens.
    pub vision_end: u32,
    /// `<|image_pad|>`: one per merged image patch after expansion.
    pub image_pad: u32,
}

/// `<|image_pad|>`, the image placeholder.
pub const IMAGE_PAD: &str = "<|image_pad|>";

impl SpecialTokens {
    fn lookup(tokenizer: &tokenizers::Tokenizer, path: &Path) -> Result<Self> {
        let id = |token: &'static str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| HfError::MissingSpecialToken {
                    path: path.to_path_buf(),
                    token,
                })
        };
        Ok(Self {
            im_start: id("<|im_start|>")?,
            im_end: id("<|im_end|>")?,
            endoftext: id("<|endoftext|>")?,
            vision_start: id("<|vision_start|>")?,
            vision_end: id("<|vision_end|>")?,
            image_pad: id(IMAGE_PAD)?,
        })
    }
}

/// Qwen2-VL's tokenizer (transformers' `Qwen2TokenizerFast`): the `tokenizers` model from
/// `tokenizer.json`, the chat template, and the special ids.
#[derive(Debug)]
pub struct Qwen2VlTokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
    special: SpecialTokens,
    template: ChatTemplate,
}

impl Qwen2VlTokenizer {
    /// Loads `tokenizer.json` at `path` with `template`; every special token of
    /// [`SpecialTokens`] must be in its vocabulary.
    pub fn new(path: &Path, template: ChatTemplate) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| HfError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let special = SpecialTokens::lookup(&tokenizer, path)?;
        Ok(Self {
            tokenizer,
            path: path.to_path_buf(),
            special,
            template,
        })
    }

    /// The tokenizer and chat template of a model directory.
    pub fn from_files(files: &ModelFiles) -> Result<Self> {
        let template = ChatTemplate::from_file(&files.chat_template, files.tokenizer_config.as_deref())?;
        Self::new(&files.tokenizer, template)
    }

    /// The special ids.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The token id of `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Token ids of `text`, without added special tokens (Qwen2's tokenizer adds none; special
    /// tokens written in the text, such as `<|im_start|>`, are recognized as in transformers).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| HfError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, dropping special tokens when `skip_special_tokens` (transformers'
    /// `decode` with `clean_up_tokenization_spaces=False`, Qwen2's default).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| HfError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// The chat rendered by the template ([`ChatTemplate::render`]).
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.template.render(messages, add_generation_prompt)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hf::{
        TemplateSource, CHAT_TEMPLATE_JINJA_FILE, CHAT_TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE,
    };
    use std::fs;

    /// Qwen2-VL-Instruct's chat template (as published in its `chat_template.json`).
    pub(crate) const QWEN2_VL_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    /// A word-level `tokenizer.json` with Qwen2-VL's special tokens as added tokens (ids 6-11).
    pub(crate) fn word_level_tokenizer(without: Option<&str>) -> String {
        let words = ["[UNK]", "hello", "world", "user", "assistant", "system"];
        let specials = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            IMAGE_PAD,
        ];
        let specials: Vec<(usize, &str)> = specials
            .into_iter()
            .enumerate()
            .map(|(i, t)| (words.len() + i, t))
            .filter(|(_, t)| Some(*t) != without)
            .collect();
        let added: Vec<Value> = specials
            .iter()
            .map(|(id, t)| {
                serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let vocab: serde_json::Map<String, Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (i, *w))
            .chain(specials.iter().copied())
            .map(|(i, w)| (w.to_string(), Value::from(i)))
            .collect();
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
        })
        .to_string()
    }

    fn conversation() -> Vec<Message> {
        vec![
            Message::text("system", "Be brief."),
            Message::parts(
                "user",
                vec![
                    Part::Image,
                    Part::Text {
                        text: "What is \"this\"?\n".into(),
                    },
                    Part::Image,
                ],
            ),
            Message::text("assistant", "A <b>cat</b> & a dog \u{e9}"),
        ]
    }

    #[test]
    fn renders_a_hand_written_template_as_transformers() {
        // trim_blocks/lstrip_blocks, namespace, `is string`, `in`, a special-token variable,
        // add_generation_prompt and Python's tojson; the expectation is jinja2's output through
        // transformers 5.25's `render_jinja_template` (eos_token "</s>").
        let template = "{% set ns = namespace(n=0) %}\n{% for message in messages %}\n    {% if message['content'] is string %}\n<{{ message['role'] }}>{{ message['content'] }}{{ eos_token }}\n    {% else %}\n<{{ message['role'] }}>\n        {% for part in message['content'] %}\n            {% if part['type'] == 'image' %}{% set ns.n = ns.n + 1 %}[img{{ ns.n }}]{% elif 'text' in part %}{{ part['text'] }}{% endif %}\n        {% endfor %}\n    {% endif %}\n    {% if message['role'] == 'tool' %}{{ raise_exception('no tools: ' ~ message['content']) }}{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}\n{{ messages[1] | tojson }}\n{{ {\"a\": [1, 2], \"b\": {}} | tojson(indent=2) }}\n";
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join(TOKENIZER_CONFIG_FILE);
        fs::write(
            &config,
            r#"{"eos_token": {"content": "</s>", "special": true}, "pad_token": null}"#,
        )
        .unwrap();
        let t = ChatTemplate::new(template, Path::new("hand.jinja"), Some(&config)).unwrap();
        let expected = "<system>Be brief.</s>\n<user>\n[img1]What is \"this\"?\n[img2]<assistant>A <b>cat</b> & a dog \u{e9}</s>\n<assistant>{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": \"What is \\\"this\\\"?\\n\"}, {\"type\": \"image\"}]}\n{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {}\n}";
        assert_eq!(t.render(&conversation(), true).unwrap(), expected);

        let err = t.render(&[Message::text("tool", "call")], false).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, HfError::Template { .. }));
        assert!(
            text.contains("hand.jinja") && text.contains("no tools: call"),
            "{text}"
        );
        let err = ChatTemplate::new("{% for %}", Path::new("broken.jinja"), None).unwrap_err();
        assert!(err.to_string().contains("broken.jinja"), "{err}");
    }

    #[test]
    fn renders_the_qwen2_vl_template_as_transformers() {
        // Expectations from transformers 5.25 (jinja2) on the same messages.
        let t = ChatTemplate::new(QWEN2_VL_TEMPLATE, Path::new("chat_template.json"), None).unwrap();
        let user_on = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is \"this\"?\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\nA <b>cat</b> & a dog \u{e9}<|im_end|>\n";
        assert_eq!(t.render(&conversation()[1..], false).unwrap(), user_on);
        assert_eq!(
            t.render(&conversation()[1..], true).unwrap(),
            format!("{user_on}<|im_start|>assistant\n")
        );
        let with_system = user_on.replace("You are a helpful assistant.", "Be brief.");
        assert_eq!(t.render(&conversation(), false).unwrap(), with_system);
    }

    #[test]
    fn finds_the_template_in_each_place_in_transformers_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(matches!(
            ChatTemplateFile::locate(dir),
            Err(HfError::MissingFile { .. })
        ));
        fs::write(dir.join(TOKENIZER_CONFIG_FILE), r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#).unwrap();
        let found = ChatTemplateFile::locate(dir).unwrap();
        assert_eq!(
            (found.source, found.template.as_str()),
            (TemplateSource::TokenizerConfig, "D")
        );
        fs::write(dir.join(CHAT_TEMPLATE_JINJA_FILE), "J").unwrap();
        let found = ChatTemplateFile::locate(dir).unwrap();
        assert_eq!(
            (found.source, found.template.as_str()),
            (TemplateSource::ChatTemplateJinja, "J")
        );
        fs::write(dir.join(CHAT_TEMPLATE_JSON_FILE), r#"{"chat_template": "S"}"#).unwrap();
        let found = ChatTemplateFile::locate(dir).unwrap();
        assert_eq!(
            (found.source, found.template.as_str()),
            (TemplateSource::ChatTemplateJson, "S")
        );
        fs::write(dir.join(CHAT_TEMPLATE_JSON_FILE), r#"{"chat_template": 3}"#).unwrap();
        assert!(matches!(
            ChatTemplateFile::locate(dir),
            Err(HfError::Invalid { .. })
        ));
        fs::write(dir.join(CHAT_TEMPLATE_JSON_FILE), "{").unwrap();
        assert!(matches!(ChatTemplateFile::locate(dir), Err(HfError::Json { .. })));
    }

    fn tokenizer(dir: &Path, without: Option<&str>) -> Result<Qwen2VlTokenizer> {
        let path = dir.join("tokenizer.json");
        fs::write(&path, word_level_tokenizer(without)).unwrap();
        let template = ChatTemplate::new(QWEN2_VL_TEMPLATE, &dir.join("chat_template.jinja"), None)?;
        Qwen2VlTokenizer::new(&path, template)
    }

    #[test]
    fn special_ids_encode_and_decode() {
        let tmp = tempfile::tempdir().unwrap();
        let tok = tokenizer(tmp.path(), None).unwrap();
        let s = tok.special();
        assert_eq!(
            [
                s.endoftext,
                s.im_start,
                s.im_end,
                s.vision_start,
                s.vision_end,
                s.image_pad
            ],
            [6, 7, 8, 9, 10, 11]
        );
        let ids = tok
            .encode("<|im_start|>user hello<|image_pad|>world<|im_end|>")
            .unwrap();
        assert_eq!(ids, [7, 3, 1, 11, 2, 8], "specials split out, nothing added");
        assert_eq!(tok.decode(&ids, true).unwrap(), "user hello world");
        assert!(tok.decode(&ids, false).unwrap().contains("<|image_pad|>"));

        match tokenizer(tmp.path(), Some(IMAGE_PAD)) {
            Err(HfError::MissingSpecialToken { token, path }) => {
                assert_eq!(token, IMAGE_PAD);
                assert!(path.ends_with("tokenizer.json"));
            }
            other => panic!("{other:?}"),
        }
        fs::write(tmp.path().join("tokenizer.json"), "{").unwrap();
        let template = ChatTemplate::new("", Path::new("t"), None).unwrap();
        assert!(matches!(
            Qwen2VlTokenizer::new(&tmp.path().join("tokenizer.json"), template),
            Err(HfError::Tokenizer { .. })
        ));
    }

    #[test]
    fn messages_read_transformers_json() {
        let json = r#"[{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "hi"}]},
                       {"role": "assistant", "content": "ok"}]"#;
        let messages: Vec<Message> = serde_json::from_str(json).unwrap();
        assert_eq!(
            messages[0],
            Message::parts("user", vec![Part::Image, Part::Text { text: "hi".into() }])
        );
        assert_eq!(messages[1], Message::text("assistant", "ok"));
        assert_eq!(messages[0].image_count() + messages[1].image_count(), 1);
    }
}
