//! spaCy's label similarity, as R1-SGG's rewards use it, from precomputed
//! tables.
//!
//! R1-SGG weighs a predicted label against the ground truth by
//! `nlp(a).similarity(nlp(b))` with spaCy's `en_core_web_sm` pipeline, on
//! labels cleaned by `refine_node_edge` ([`normalize_label`]). That pipeline
//! has no static word vectors: a doc's vector is the mean of its tok2vec
//! rows, the similarity their cosine (a float32, in `[-1, 1]`, negative for a
//! few percent of pairs), and 1 for two docs with the same tokens. The
//! vocabularies are closed, so `scripts/spacy_label_tables.py` computes it
//! for every pair of labels of each vocabulary (objects and predicates
//! together: a model may write a predicate as a category) and writes
//! `assets/labels/<vocabulary>.bin`, embedded here. Its header records the
//! spaCy and pipeline versions.
//!
//! Labels outside a table's vocabulary fall back to exact match after
//! cleaning (1 if equal, else 0): spaCy would give them some cosine, which
//! no table can hold. The evaluation counts them
//! ([`crate::eval::EvalSummary::out_of_vocabulary`]).
//!
//! **Layout** of a table: the 8 bytes `R1SGGSIM`, the header's length as a
//! little-endian `u32`, the header (UTF-8 JSON with at least `vocabulary`,
//! `spacy`, `pipeline`, `pipeline_version` and `labels`, the normalized
//! labels in order), then `n (n - 1) / 2` little-endian `f32`: the
//! similarity of labels `i < j`, row by row.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

use super::labels::LabelSimilarity;
use crate::data::scene::{normalize_label, Vocabulary, KNOWN_VOCABULARIES};

const MAGIC: &[u8; 8] = b"R1SGGSIM";

/// The embedded tables, in the order of [`KNOWN_VOCABULARIES`].
const EMBEDDED: [&[u8]; 3] = [
    include_bytes!("../../assets/labels/synthetic.bin"),
    include_bytes!("../../assets/labels/vg150.bin"),
    include_bytes!("../../assets/labels/psg.bin"),
];

/// Why a similarity table could not be had.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TableError {
    /// The bytes do not start with `R1SGGSIM` and a header length.
    #[error("not a label-similarity table (no R1SGGSIM header)")]
    Magic,
    /// The header is not the JSON described in the module docs.
    #[error("label-similarity table header: {0}")]
    Header(String),
    /// A label is not normalized, or appears twice.
    #[error("label-similarity table: label {0:?} is not normalized or appears twice")]
    Label(String),
    /// The values do not fill the upper triangle.
    #[error("label-similarity table of {labels} labels needs {expected} bytes of values, has {found}")]
    Size {
        /// Labels in the header.
        labels: usize,
        /// `4 n (n - 1) / 2`.
        expected: usize,
        /// Bytes after the header.
        found: usize,
    },
    /// A value is not finite or outside `[-1, 1]`.
    #[error("label-similarity table: value {0} is not a similarity")]
    Value(f32),
    /// No table ships for the vocabulary.
    #[error("no spaCy similarity table for the vocabulary {0:?} (tables: synthetic, vg150, psg)")]
    NoTable(String),
}

#[derive(Deserialize)]
struct Header {
    vocabulary: String,
    spacy: String,
    pipeline: String,
    pipeline_version: String,
    labels: Vec<String>,
}

/// spaCy's similarity over one vocabulary's normalized labels, exact match
/// outside it. `similarity(a, b)` is the table's value when both labels are
/// in the vocabulary, else `1` if `a == b` and `0` otherwise.
#[derive(Clone)]
pub struct SpacyTable {
    vocabulary: String,
    spacy: String,
    pipeline: String,
    labels: Vec<String>,
    index: HashMap<String, usize>,
    /// Labels `i < j`, row by row: `(i, j)` at `i n - i (i + 1) / 2 + j - i - 1`.
    values: Vec<f32>,
}

impl SpacyTable {
    /// Reads a table in the layout of the module docs, checking every part.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TableError> {
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or(TableError::Magic)?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or(TableError::Magic)?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(TableError::Header(format!(
                "{len} bytes announced, {} present",
                rest.len()
            )));
        }
        let (head, body) = rest.split_at(len);
        let header: Header = serde_json::from_slice(head).map_err(|e| TableError::Header(e.to_string()))?;
        let n = header.labels.len();
        let mut index = HashMap::with_capacity(n);
        for (i, label) in header.labels.iter().enumerate() {
            if normalize_label(label) != *label || index.insert(label.clone(), i).is_some() {
                return Err(TableError::Label(label.clone()));
            }
        }
        let expected = 4 * (n * n.saturating_sub(1) / 2);
        if body.len() != expected {
            return Err(TableError::Size {
                labels: n,
                expected,
                found: body.len(),
            });
        }
        let values = body
            .chunks_exact(4)
            .map(|c| {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if (-1.0..=1.0).contains(&v) {
                    Ok(v)
                } else {
                    Err(TableError::Value(v))
                }
            })
            .collect::<Result<Vec<f32>, _>>()?;
        Ok(Self {
            vocabulary: header.vocabulary,
            spacy: header.spacy,
            pipeline: format!("{} {}", header.pipeline, header.pipeline_version),
            labels: header.labels,
            index,
            values,
        })
    }

    /// The embedded table of one of [`KNOWN_VOCABULARIES`], read once.
    pub fn of(vocab: &Vocabulary) -> Result<&'static SpacyTable, TableError> {
        static TABLES: [OnceLock<Result<SpacyTable, TableError>>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let k = KNOWN_VOCABULARIES
            .iter()
            .position(|v| v == vocab)
            .ok_or_else(|| TableError::NoTable(vocab.name.to_string()))?;
        TABLES[k]
            .get_or_init(|| SpacyTable::from_bytes(EMBEDDED[k]))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The vocabulary's name (`vg150`, `psg`, `synthetic`).
    pub fn vocabulary(&self) -> &str {
        &self.vocabulary
    }

    /// The spaCy version that computed the table.
    pub fn spacy_version(&self) -> &str {
        &self.spacy
    }

    /// The pipeline and its version (`en_core_web_sm 3.8.0`).
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The normalized labels, objects then predicates.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Whether a normalized label is in the table's vocabulary.
    pub fn contains(&self, label: &str) -> bool {
        self.index.contains_key(label)
    }

    /// spaCy's similarity of two normalized labels of the vocabulary, `None`
    /// if either is outside it.
    pub fn get(&self, a: &str, b: &str) -> Option<f64> {
        let (i, j) = (*self.index.get(a)?, *self.index.get(b)?);
        let (i, j) = (i.min(j), i.max(j));
        if i == j {
            return Some(1.0);
        }
        let n = self.labels.len();
        self.values
            .get(i * n - i * (i + 1) / 2 + j - i - 1)
            .map(|&v| f64::from(v))
    }
}

impl std::fmt::Debug for SpacyTable {
    /// Names the table, without its twenty thousand values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SpacyTable({}: {} labels, spaCy {}, {})",
            self.vocabulary,
            self.labels.len(),
            self.spacy,
            self.pipeline
        )
    }
}

impl LabelSimilarity for SpacyTable {
    fn similarity(&self, a: &str, b: &str) -> f64 {
        self.get(a, b).unwrap_or(f64::from(u8::from(a == b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scene::category_of;
    use serde_json::Value;

    fn fixture(name: &str) -> String {
        let path = format!("{}/fixtures/labels/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn embedded_tables_hold_the_vocabularies() {
        for vocab in KNOWN_VOCABULARIES {
            let table = SpacyTable::of(&vocab).unwrap();
            assert_eq!(table.vocabulary(), vocab.name);
            assert_eq!(table.spacy_version(), "3.8.18");
            assert_eq!(table.pipeline(), "en_core_web_sm 3.8.0");
            // The script read the labels from R1-SGG's code (VG150, PSG):
            // they are ours, normalized, objects then predicates, in order.
            let ours: Vec<String> = vocab
                .objects
                .iter()
                .chain(vocab.predicates)
                .map(|l| normalize_label(l))
                .collect();
            assert_eq!(table.labels(), ours.as_slice(), "{}", vocab.name);
            let n = ours.len();
            assert_eq!(table.values.len(), n * (n - 1) / 2);
            // Symmetric, 1 on the diagonal.
            for (a, b) in [(0, n - 1), (n / 2, 1), (3, 3)] {
                let (a, b) = (&ours[a], &ours[b]);
                assert_eq!(table.get(a, b), table.get(b, a));
                assert_eq!(table.get(a, b) == Some(1.0), a == b);
            }
        }
        let custom = Vocabulary {
            name: "custom",
            ..crate::data::scene::SYNTHETIC
        };
        assert_eq!(
            SpacyTable::of(&custom).unwrap_err(),
            TableError::NoTable("custom".into())
        );
    }

    #[test]
    fn out_of_vocabulary_labels_match_exactly() {
        let table = SpacyTable::of(&crate::data::scene::VG150).unwrap();
        assert!(table.contains("man") && table.contains("in front of") && !table.contains("unicorn"));
        assert_eq!(table.similarity("unicorn", "unicorn"), 1.0);
        assert_eq!(table.similarity("unicorn", "man"), 0.0);
        assert_eq!(table.similarity("man", "men"), table.get("men", "man").unwrap());
        assert!(table.similarity("man", "woman") > 0.5);
    }

    /// spaCy's similarity of 320 pairs of ids in assorted spellings, computed
    /// by the script through R1-SGG's own `refine_node_edge` and
    /// `category_semantic_similarity`, not through the table.
    #[test]
    fn tables_reproduce_spacy_on_sampled_pairs() {
        let reference: Value = serde_json::from_str(&fixture("similarity_samples.json")).unwrap();
        let samples = reference["samples"].as_array().unwrap();
        assert!(samples.len() >= 300);
        let mut worst = 0.0f64;
        for s in samples {
            let vocab = KNOWN_VOCABULARIES
                .iter()
                .find(|v| v.name == s["vocabulary"])
                .unwrap();
            let table = SpacyTable::of(vocab).unwrap();
            let label = |key: &str| normalize_label(category_of(s[key].as_str().unwrap()));
            let (a, b) = (label("a"), label("b"));
            assert!(table.contains(&a) && table.contains(&b), "{s}");
            let diff = (table.similarity(&a, &b) - s["similarity"].as_f64().unwrap()).abs();
            assert!(diff <= 1e-6, "{s}: {}", table.similarity(&a, &b));
            worst = worst.max(diff);
        }
        println!("max |table - spaCy| over {} pairs: {worst:e}", samples.len());
    }

    #[test]
    fn malformed_tables_are_errors() {
        let good = EMBEDDED[0];
        assert_eq!(SpacyTable::from_bytes(b"R1SGG").unwrap_err(), TableError::Magic);
        assert_eq!(
            SpacyTable::from_bytes(&good[..10]).unwrap_err(),
            TableError::Magic
        );
        assert!(matches!(
            SpacyTable::from_bytes(&good[..40]),
            Err(TableError::Header(_))
        ));
        assert!(matches!(
            SpacyTable::from_bytes(&good[..good.len() - 1]),
            Err(TableError::Size { labels: 14, .. })
        ));
        let table = |labels: &str, values: &[f32]| {
            let head = format!(
                r#"{{"vocabulary":"t","spacy":"0","pipeline":"p","pipeline_version":"1","labels":{labels}}}"#
            );
            let mut bytes = MAGIC.to_vec();
            bytes.extend((head.len() as u32).to_le_bytes());
            bytes.extend(head.as_bytes());
            bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            SpacyTable::from_bytes(&bytes)
        };
        assert_eq!(
            table(r#"["a","b","c"]"#, &[0.5, -0.25, 1.0])
                .unwrap()
                .get("c", "b"),
            Some(1.0)
        );
        assert_eq!(
            table(r#"["a","b","c"]"#, &[0.5, -0.25, 1.0])
                .unwrap()
                .get("a", "c"),
            Some(-0.25)
        );
        assert_eq!(
            table(r#"["a","A"]"#, &[0.5]).unwrap_err(),
            TableError::Label("A".into())
        );
        assert_eq!(
            table(r#"["a","a"]"#, &[0.5]).unwrap_err(),
            TableError::Label("a".into())
        );
        assert!(matches!(
            table(r#"["a","b"]"#, &[f32::NAN]),
            Err(TableError::Value(_))
        ));
        assert_eq!(table(r#"["a","b"]"#, &[1.5]).unwrap_err(), TableError::Value(1.5));
        assert!(table("[]", &[]).unwrap().labels().is_empty());
    }
}
