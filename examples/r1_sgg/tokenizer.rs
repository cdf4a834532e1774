//! A closed-vocabulary tokenizer for scene-graph answers: the JSON
//! fragments of the answer format, every category and predicate of the
//! vocabulary, the integers 0..=1000 of the boxes, object numbers, and every
//! printable ASCII character as a fallback, so any text encodes. Encoding is
//! greedy longest match; decoding concatenates.
//!
//! A real run would use the base model's BPE tokenizer (Qwen2-VL's); it is
//! not downloadable here, and a tiny model learns much faster over pieces
//! that are whole words of its output language.

use std::collections::HashMap;

use crate::scene::Vocabulary;

/// Padding (never predicted).
pub const PAD: u32 = 0;
/// End of sequence: the model emits it after `</answer>`.
pub const EOS: u32 = 1;
/// The task token that stands for the (constant) instruction text.
pub const TASK: u32 = 2;
const SPECIALS: [&str; 3] = ["<pad>", "<eos>", "<scene-graph>"];

/// Fragments of the answer format (see `format::answer_text`).
const FRAGMENTS: &[&str] = &[
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "{\"objects\":[",
    "],\"relationships\":[",
    "]}",
    "{\"id\":\"",
    "\",\"bbox\":[",
    "]},",
    "{\"subject\":\"",
    "\",\"predicate\":\"",
    "\",\"object\":\"",
    "\"},",
    "\"}",
];

/// Greedy longest-match tokenizer over a fixed piece list.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pieces: Vec<String>,
    ids: HashMap<String, u32>,
    longest: usize,
}

impl Tokenizer {
    /// The tokenizer of answers over `vocab`, with object numbers up to `max_objects`.
    pub fn new(vocab: &Vocabulary, max_objects: usize) -> Self {
        let mut pieces: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        pieces.extend(FRAGMENTS.iter().map(|s| s.to_string()));
        pieces.extend(vocab.objects.iter().map(|s| s.to_string()));
        pieces.extend(vocab.predicates.iter().map(|s| s.to_string()));
        pieces.extend((0..=1000.max(max_objects)).map(|n| n.to_string()));
        pieces.extend((b' '..=b'~').map(|c| (c as char).to_string()));
        let mut ids = HashMap::new();
        let mut unique = Vec::new();
        for p in pieces {
            if !ids.contains_key(&p) {
                ids.insert(p.clone(), unique.len() as u32);
                unique.push(p);
            }
        }
        let longest = unique.iter().map(|p| p.len()).max().unwrap_or(1);
        Self {
            pieces: unique,
            ids,
            longest,
        }
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Token ids of `text` (greedy longest match; characters outside
    /// printable ASCII are dropped, as the model can never emit them).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            let limit = self.longest.min(rest.len());
            for len in (1..=limit).rev() {
                if let Some(piece) = rest.get(..len) {
                    if let Some(&id) = self.ids.get(piece) {
                        out.push(id);
                        rest = &rest[len..];
                        continue 'outer;
                    }
                }
            }
            let skip = rest.chars().next().map_or(1, char::len_utf8);
            rest = &rest[skip..];
        }
        out
    }

    /// The text of `ids`, up to the first [`EOS`] (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .take_while(|&&id| id != EOS)
            .filter(|&&id| id as usize >= SPECIALS.len())
            .filter_map(|&id| self.pieces.get(id as usize))
            .map(String::as_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{generate_split, Split};
    use crate::format::answer_text;
    use crate::scene::SYNTHETIC;

    #[test]
    fn answers_round_trip_in_few_tokens() {
        let tok = Tokenizer::new(&SYNTHETIC, 16);
        for s in generate_split(Split::Train, 50, 3) {
            let text = answer_text(&s.graph, None);
            let ids = tok.encode(&text);
            assert_eq!(tok.decode(&ids), text);
            let per_item = ids.len() as f64 / (s.graph.objects.len() + s.graph.relations.len()).max(1) as f64;
            assert!(per_item < 16.0, "{} tokens for {text}", ids.len());
        }
    }

    #[test]
    fn any_text_encodes_and_decodes_without_panicking() {
        let tok = Tokenizer::new(&SYNTHETIC, 16);
        for text in [
            "",
            "é∑ unicode ✓",
            "<answer>{\"objects\":[",
            "\u{0}\u{7f}",
            "1000000",
        ] {
            let ids = tok.encode(text);
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            let back = tok.decode(&ids);
            assert!(back.is_ascii());
        }
        assert_eq!(tok.decode(&[tok.encode("ab")[0], EOS, tok.encode("c")[0]]), "a");
    }
}
