//! A closed-vocabulary tokenizer for scene-graph answers: the JSON
//! fragments of the answer format, every category and predicate of the
//! vocabulary, the integers 0..=1000 of the boxes, the number suffixes of
//! object ids (`.3` in `"frame.3"`), and every printable ASCII character as a fallback, so any text encodes. Encoding is
//! greedy longest match; decoding concatenates.
//!
//! It is a Hugging Face `tokenizers` tokenizer, saved as `tokenizer.json`
//! beside the checkpoints, so a checkpoint folder loads like a Hugging Face
//! model folder (`Tokenizer.from_file` in Python, [`Tokenizer::from_file`]
//! here). The pipeline:
//!
//! - added special tokens `<pad>`, `<eos>`, `<scene-graph>` (ids 0, 1, 2);
//! - a `Split` pre-tokenizer whose regex is the alternation of all pieces,
//!   longest first, with `invert: true` and `behavior: Removed`: every match
//!   is one word, and what no piece matches (characters outside printable
//!   ASCII) is removed. Regex alternation is leftmost-first (in the Rust
//!   `regex` crate and in Oniguruma alike), so the matches are exactly the
//!   greedy longest-match segmentation;
//! - a `WordPiece` model over the pieces with an empty continuing-subword
//!   prefix (greedy longest-match-first itself; each word is one piece);
//! - a `Fuse` decoder (concatenation, no spaces).
//!
//! A real run would use the base model's BPE tokenizer (Qwen2-VL's); it is
//! not downloadable here, and a tiny model learns much faster over pieces
//! that are whole words of its output language.

use std::path::{Path, PathBuf};

use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::data::scene::Vocabulary;

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

/// The WordPiece unknown token. It is deliberately not in the vocabulary:
/// every word the pre-tokenizer yields is a piece, so an unknown word would
/// be a broken `tokenizer.json`, reported as an error rather than encoded.
const UNK: &str = "<unk>";

/// The piece list: token id `i` is piece `i` (duplicates dropped, first
/// occurrence kept).
fn pieces(vocab: &Vocabulary, max_objects: usize) -> Vec<String> {
    let mut pieces: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    pieces.extend(FRAGMENTS.iter().map(|s| s.to_string()));
    pieces.extend(vocab.objects.iter().map(|s| s.to_string()));
    pieces.extend(vocab.predicates.iter().map(|s| s.to_string()));
    pieces.extend((0..=1000.max(max_objects)).map(|n| n.to_string()));
    pieces.extend(id_suffixes(max_objects));
    pieces.extend((b' '..=b'~').map(|c| (c as char).to_string()));
    let mut seen = std::collections::HashSet::new();
    pieces.retain(|p| seen.insert(p.clone()));
    pieces
}

/// The object-number suffixes `.0` to `.{max_objects}` of ids like
/// `"frame.3"`, one piece each: an id is then a category token and a suffix
/// token of its own, not a digit token shared with (and embedded like) the
/// box coordinates, which a small model confuses when it must copy an id
/// into a relation.
fn id_suffixes(max_objects: usize) -> impl Iterator<Item = String> {
    (0..=max_objects).map(|n| format!(".{n}"))
}

/// `piece` as a regex literal, the same in the `regex` crate and in
/// Oniguruma: only the metacharacters common to both are escaped (an escaped
/// `<` or `>` would be a word boundary in both).
fn regex_literal(piece: &str) -> String {
    let mut out = String::with_capacity(piece.len() * 2);
    for c in piece.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Greedy longest-match tokenizer over a fixed piece list, as a Hugging Face
/// `tokenizers` tokenizer (see the module docs for its pipeline).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

/// Why a `tokenizer.json` could not be saved or loaded by
/// [`Tokenizer::from_file`]: the file is missing or unreadable, is not a
/// `tokenizers` tokenizer, or is one whose special tokens are not those of
/// this example.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer {}: {reason}", path.display())]
pub struct TokenizerFileError {
    path: PathBuf,
    reason: String,
}

impl Tokenizer {
    /// The tokenizer of answers over `vocab`, with object numbers up to `max_objects`.
    pub fn new(vocab: &Vocabulary, max_objects: usize) -> Self {
        let pieces = pieces(vocab, max_objects);
        let mut by_length: Vec<&str> = pieces.iter().map(String::as_str).collect();
        // Stable: pieces of one length cannot both match at one place.
        by_length.sort_by_key(|p| std::cmp::Reverse(p.len()));
        let pattern = by_length
            .iter()
            .map(|p| regex_literal(p))
            .collect::<Vec<_>>()
            .join("|");
        let split = Split::new(
            SplitPattern::Regex(pattern),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .expect("the piece alternation is a valid regex");
        // `models::bpe::Vocab` is the public name of the map type `WordPiece` takes.
        let ids: tokenizers::models::bpe::Vocab = pieces
            .iter()
            .enumerate()
            .map(|(id, p)| (p.clone(), id as u32))
            .collect();
        let longest = pieces.iter().map(|p| p.chars().count()).max().unwrap_or(1);
        let model = WordPiece::builder()
            .vocab(ids)
            .unk_token(UNK.to_string())
            .continuing_subword_prefix(String::new())
            .max_input_chars_per_word(longest)
            .build()
            .expect("a WordPiece model from an in-memory vocabulary");
        let mut inner = tokenizers::Tokenizer::new(model);
        inner
            .with_pre_tokenizer(Some(split))
            .with_decoder(Some(Fuse::new()));
        inner
            .add_special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)))
            .expect("special tokens without a normalizer");
        debug_assert!(SPECIALS
            .iter()
            .zip([PAD, EOS, TASK])
            .all(|(s, id)| inner.token_to_id(s) == Some(id)));
        Self { inner }
    }

    /// Writes the tokenizer to `path` as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerFileError> {
        self.inner.save(path, true).map_err(|e| TokenizerFileError {
            path: path.to_path_buf(),
            reason: format!("cannot save: {e}"),
        })
    }

    /// Loads a `tokenizer.json` written by [`Tokenizer::save`]. A missing or
    /// unreadable file, one that is not a `tokenizers` tokenizer, or one whose
    /// special tokens are not [`PAD`], [`EOS`] and [`TASK`] is an error.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerFileError> {
        let error = |reason: String| TokenizerFileError {
            path: path.to_path_buf(),
            reason,
        };
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| error(e.to_string()))?;
        for (special, id) in SPECIALS.iter().zip([PAD, EOS, TASK]) {
            if inner.token_to_id(special) != Some(id) {
                return Err(error(format!("{special} is not token {id}")));
            }
            if !inner.get_added_vocabulary().is_special_token(special) {
                return Err(error(format!("{special} is not a special token")));
            }
        }
        if inner.get_decoder().is_none() {
            return Err(error("no decoder".to_string()));
        }
        Ok(Self { inner })
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (greedy longest match; characters outside
    /// printable ASCII are dropped, as the model can never emit them).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.inner.encode_fast(text, false) {
            Ok(encoding) => encoding.get_ids().to_vec(),
            // Only a hand-edited tokenizer.json can get here.
            Err(e) => panic!("the tokenizer cannot encode {text:?}: {e}"),
        }
    }

    /// The text of `ids`, up to the first [`EOS`] (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> String {
        let end = ids.iter().position(|&id| id == EOS).unwrap_or(ids.len());
        match self.inner.decode(&ids[..end], true) {
            Ok(text) => text,
            // `Fuse` cannot fail; only a hand-edited tokenizer.json can get here.
            Err(e) => panic!("the tokenizer cannot decode {:?}: {e}", &ids[..end]),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::data::format::answer_text;
    use crate::data::scene::{PSG, SYNTHETIC, VG150};
    use crate::data::synthetic::{generate_split, Split};

    /// The tokenizer before it became a `tokenizers` one (verbatim but for
    /// the id suffixes added to its piece list since): the reference the new
    /// one must match id for id.
    struct Reference {
        pieces: Vec<String>,
        ids: HashMap<String, u32>,
        longest: usize,
    }

    impl Reference {
        fn new(vocab: &Vocabulary, max_objects: usize) -> Self {
            let mut pieces: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
            pieces.extend(FRAGMENTS.iter().map(|s| s.to_string()));
            pieces.extend(vocab.objects.iter().map(|s| s.to_string()));
            pieces.extend(vocab.predicates.iter().map(|s| s.to_string()));
            pieces.extend((0..=1000.max(max_objects)).map(|n| n.to_string()));
            pieces.extend((0..=max_objects).map(|n| format!(".{n}")));
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

        fn encode(&self, text: &str) -> Vec<u32> {
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

        fn decode(&self, ids: &[u32]) -> String {
            ids.iter()
                .take_while(|&&id| id != EOS)
                .filter(|&&id| id as usize >= SPECIALS.len())
                .filter_map(|&id| self.pieces.get(id as usize))
                .map(String::as_str)
                .collect()
        }
    }

    /// A scratch path, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("r1_sgg_tokenizer_{}_{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

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
    fn an_id_is_a_category_and_a_suffix_token() {
        let tok = Tokenizer::new(&SYNTHETIC, 16);
        let ids = tok.encode("circle.12");
        let pieces: Vec<String> = ids.iter().map(|&id| tok.decode(&[id])).collect();
        assert_eq!(pieces, ["circle", ".12"]);
        // Box coordinates stay number tokens, distinct from the suffixes.
        assert_eq!(tok.encode("12"), tok.encode("12,").split_last().unwrap().1);
        assert_ne!(tok.encode("12")[0], ids[1]);
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

    #[test]
    fn ids_and_vocab_size_are_those_of_the_piece_list() {
        for (vocab, max_objects) in [(SYNTHETIC, 16), (SYNTHETIC, 2000), (VG150, 32), (PSG, 32)] {
            let (tok, reference) = (
                Tokenizer::new(&vocab, max_objects),
                Reference::new(&vocab, max_objects),
            );
            assert_eq!(tok.vocab_size(), reference.pieces.len());
            for (id, piece) in reference.pieces.iter().enumerate() {
                assert_eq!(tok.inner.token_to_id(piece), Some(id as u32), "{piece}");
            }
        }
        let tok = Tokenizer::new(&SYNTHETIC, 16);
        assert_eq!(tok.encode("<pad><eos><scene-graph>"), [PAD, EOS, TASK]);
    }

    /// The special tokens are split out of the text before the greedy
    /// match; that is the greedy match itself as long as no other piece
    /// starts with one or has a `<` after its first byte (so no greedy match
    /// runs into a special token). True of every vocabulary here.
    #[test]
    fn special_tokens_cannot_change_the_greedy_match() {
        for vocab in [SYNTHETIC, VG150, PSG] {
            for piece in pieces(&vocab, 32).iter().skip(SPECIALS.len()) {
                assert!(!piece[1..].contains('<'), "{piece}");
                assert!(SPECIALS.iter().all(|s| !piece.starts_with(s)), "{piece}");
            }
        }
    }

    #[test]
    fn generated_answers_encode_and_decode_like_the_reference() {
        let (tok, reference) = (Tokenizer::new(&SYNTHETIC, 32), Reference::new(&SYNTHETIC, 32));
        for split in [Split::Train, Split::Val] {
            for s in generate_split(split, 200, 11) {
                for think in [None, Some("two shapes, one inside the other")] {
                    let text = answer_text(&s.graph, think);
                    let ids = tok.encode(&text);
                    assert_eq!(ids, reference.encode(&text), "{text}");
                    assert_eq!(tok.decode(&ids), reference.decode(&ids));
                    assert_eq!(tok.decode(&ids), text);
                }
            }
        }
    }

    #[test]
    fn edge_cases_encode_like_the_reference() {
        for (vocab, max_objects) in [(SYNTHETIC, 16), (VG150, 32)] {
            let (tok, reference) = (
                Tokenizer::new(&vocab, max_objects),
                Reference::new(&vocab, max_objects),
            );
            for text in [
                "",
                "1000000",
                "10001",
                "<ans\u{e9}wer>",
                "<answer\u{0}>",
                "x<eos>y<<eos>>",
                "<pad><pad>",
                "<scene-graph",
                "<think>\t\n</think>",
                "bigger thanbigger than",
                "traffic light.12",
                "\\.+*?()|[]{}^$#&-~ ",
                "\u{7f}\u{80}\u{10ffff}é∑✓",
                "]},{\"subject\":\"circle.1\",\"predicate\":\"bigger than\",\"object\":\"star.2\"}]}",
            ] {
                let ids = tok.encode(text);
                assert_eq!(ids, reference.encode(text), "{text:?}");
                assert_eq!(tok.decode(&ids), reference.decode(&ids), "{text:?}");
            }
        }
    }

    #[test]
    fn save_and_from_file_round_trip() {
        let scratch = Scratch::new("round_trip");
        let path = scratch.0.join("tokenizer.json");
        let tok = Tokenizer::new(&SYNTHETIC, 32);
        tok.save(&path).unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        let mut texts: Vec<String> = generate_split(Split::Test, 50, 5)
            .iter()
            .map(|s| answer_text(&s.graph, Some("a ring near a star")))
            .collect();
        texts.extend(["", "x<eos>y", "<ans\u{e9}wer>1000000", "é∑ unicode ✓"].map(String::from));
        for text in &texts {
            let ids = tok.encode(text);
            assert_eq!(loaded.encode(text), ids, "{text:?}");
            assert_eq!(loaded.decode(&ids), tok.decode(&ids));
        }
        // Saving the loaded one writes the same file.
        let again = scratch.0.join("again.json");
        loaded.save(&again).unwrap();
        assert_eq!(
            std::fs::read_to_string(&again).unwrap(),
            std::fs::read_to_string(&path).unwrap()
        );
    }

    #[test]
    fn missing_or_corrupt_tokenizer_json_is_an_error() {
        let scratch = Scratch::new("corrupt");
        let missing = scratch.0.join("missing.json");
        let err = Tokenizer::from_file(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");

        let path = scratch.0.join("tokenizer.json");
        Tokenizer::new(&SYNTHETIC, 16).save(&path).unwrap();
        let good = std::fs::read_to_string(&path).unwrap();
        let corrupt = [
            String::new(),
            "not json".to_string(),
            "{}".to_string(),
            good[..good.len() / 2].to_string(),
            // A well-formed tokenizer whose specials are other tokens.
            good.replacen("\"<eos>\"", "\"<end>\"", 2),
        ];
        for text in corrupt {
            std::fs::write(&path, &text).unwrap();
            let err = Tokenizer::from_file(&path).unwrap_err();
            assert!(err.to_string().contains("tokenizer.json"), "{err}");
        }
        // The error converts for `?` in `anyhow` code.
        let _: anyhow::Error = Tokenizer::from_file(&missing).unwrap_err().into();
    }

    /// Pieces, near-pieces and arbitrary characters, to exercise long matches,
    /// matches broken by a foreign character, and anything in Unicode.
    fn text_strategy() -> impl Strategy<Value = String> {
        let pieces = pieces(&SYNTHETIC, 16);
        let fragment = prop_oneof![
            3 => proptest::sample::select(pieces).prop_map(|p| p.to_string()),
            1 => any::<char>().prop_map(String::from),
            1 => proptest::char::range(' ', '~').prop_map(String::from),
            1 => proptest::char::range('\u{0}', '\u{ff}').prop_map(String::from),
        ];
        prop_oneof![
            proptest::collection::vec(fragment, 0..40).prop_map(|f| f.concat()),
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_text_encodes_like_the_reference(text in text_strategy()) {
            let (tok, reference) = (Tokenizer::new(&SYNTHETIC, 16), Reference::new(&SYNTHETIC, 16));
            let ids = tok.encode(&text);
            prop_assert_eq!(&ids, &reference.encode(&text));
            prop_assert_eq!(tok.decode(&ids), reference.decode(&ids));
        }

        #[test]
        fn any_ids_decode_like_the_reference(ids in proptest::collection::vec(0u32..1200, 0..40)) {
            let (tok, reference) = (Tokenizer::new(&SYNTHETIC, 16), Reference::new(&SYNTHETIC, 16));
            prop_assert_eq!(tok.decode(&ids), reference.decode(&ids));
        }
    }

    /// Rough timing against the reference (run with `--nocapture` to see).
    #[test]
    fn encoding_an_answer_is_not_much_slower_than_the_reference() {
        let (tok, reference) = (Tokenizer::new(&SYNTHETIC, 32), Reference::new(&SYNTHETIC, 32));
        let texts: Vec<String> = generate_split(Split::Train, 200, 7)
            .iter()
            .map(|s| answer_text(&s.graph, None))
            .collect();
        let time = |encode: &dyn Fn(&str) -> Vec<u32>| {
            let start = std::time::Instant::now();
            let mut tokens = 0;
            for text in &texts {
                tokens += encode(text).len();
            }
            (start.elapsed().as_secs_f64() / texts.len() as f64, tokens)
        };
        let (ours, n) = time(&|t| tok.encode(t));
        let (theirs, m) = time(&|t| reference.encode(t));
        assert_eq!(n, m);
        println!(
            "encode per answer ({:.0} tokens): tokenizers {:.1} µs, reference {:.1} µs",
            n as f64 / texts.len() as f64,
            ours * 1e6,
            theirs * 1e6
        );
        // Generous: a loaded machine; the point is no quadratic blow-up.
        assert!(ours < 2e-3, "{:.1} µs per answer", ours * 1e6);
    }
}
