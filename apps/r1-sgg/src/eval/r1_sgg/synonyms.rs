//! The label maps R1-SGG's evaluation applies to labels outside the
//! vocabulary (`src/sgg_gather_preds.py`, `main`, at e4de64d), from
//! `assets/r1_sgg/synonyms.json` (embedded):
//!
//! - `obj2vg_list`, `rel2vg_list`, `pass2act_list` and `obj2psg_list` of
//!   `src/vg_synonyms.py` (source label to target; `pass2act` also says
//!   whether the relation turns around, as `worn by` becomes `wearing`);
//! - for the labels none of those lists knows, `find_synonym_map`
//!   (`src/utils/wordnet.py`): the label itself if it is a target, else the
//!   first target lemma among NLTK's `wordnet.synsets(label)`, else (a
//!   phrase) the same for each of its words in turn.
//!
//! Rust has no WordNet, so `scripts/r1_sgg_eval_reference.py` precomputes
//! NLTK 3.9.1's lookup over WordNet 3.0 for each target set: per part of
//! speech (noun, verb, adjective, adverb: the order `synsets` goes through),
//! every WordNet form whose synsets hold a target lemma, with the first such
//! lemma in NLTK's order; NLTK's suffix rules (`MORPHOLOGICAL_SUBSTITUTIONS`);
//! and the exception-list entries (`men` -> `man`) whose forms change a
//! lookup. `synsets(word)` tries, per part of speech, the word itself and
//! then either its exception-list forms or the forms the suffix rules give
//! (one step: NLTK 3.9's `_morphy`); [`Synonyms::find`] does the same on the
//! tables, so it gives NLTK's answer for every word
//! (`fixtures/r1_sgg_eval/wordnet_samples.json`: 2,000 words, among them every
//! exception-list word in the tables).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::data::scene::is_python_space;

/// The parts of speech in the order NLTK's `synsets` goes through them.
const POS_ORDER: [&str; 4] = ["n", "v", "a", "r"];

/// One target set's WordNet lookup (see the module docs).
#[derive(Debug, Deserialize)]
struct WordNetTable {
    /// The targets, as `find_synonym_map`'s `set_b`.
    targets: Vec<String>,
    /// Per part of speech: WordNet form -> the first target lemma of its synsets.
    forms: HashMap<String, HashMap<String, String>>,
    /// Per part of speech: exception-list word -> its base forms, where they
    /// give another answer than the suffix rules.
    exceptions: HashMap<String, HashMap<String, Vec<String>>>,
}

/// `assets/r1_sgg/synonyms.json`.
#[derive(Debug, Deserialize)]
struct Asset {
    r1_sgg_commit: String,
    nltk: String,
    wordnet_version: String,
    obj2vg: Vec<(String, String)>,
    rel2vg: Vec<(String, String)>,
    pass2act: Vec<(String, String, u8)>,
    obj2psg: Vec<(String, String)>,
    vg150: ClassLists,
    psg: ClassLists,
    substitutions: HashMap<String, Vec<(String, String)>>,
    wordnet: HashMap<String, WordNetTable>,
}

/// A dataset's class lists as R1-SGG's evaluation reads them.
#[derive(Debug, Deserialize)]
pub(crate) struct ClassLists {
    /// Object classes (VG150's with `__background__` first, PSG's without).
    pub(crate) objects: Vec<String>,
    /// Predicates (VG150's with `__background__` first, PSG's without).
    pub(crate) predicates: Vec<String>,
}

/// Which of the asset's WordNet target sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetSet {
    /// VG150's 150 object classes.
    Vg150Objects,
    /// VG150's 50 predicates.
    Vg150Predicates,
    /// PSG's 56 predicates (R1-SGG also maps PSG's objects to them: its
    /// `target_objects = PSG_PREDICATES`).
    PsgPredicates,
}

impl TargetSet {
    fn key(self) -> &'static str {
        match self {
            TargetSet::Vg150Objects => "vg150_objects",
            TargetSet::Vg150Predicates => "vg150_predicates",
            TargetSet::PsgPredicates => "psg_predicates",
        }
    }
}

/// The embedded label maps.
#[derive(Debug)]
pub(crate) struct Synonyms {
    asset: Asset,
    obj2vg: HashMap<String, String>,
    rel2vg: HashMap<String, String>,
    obj2psg: HashMap<String, String>,
    /// Source -> (target, whether subject and object swap).
    pass2act: HashMap<String, (String, bool)>,
}

impl Synonyms {
    /// The embedded tables, read once. The asset is written by the script
    /// and checked by this crate's tests, so a broken one is a build defect.
    pub(crate) fn get() -> &'static Synonyms {
        static TABLES: OnceLock<Synonyms> = OnceLock::new();
        TABLES.get_or_init(|| {
            let asset: Asset = serde_json::from_str(include_str!("../../../assets/r1_sgg/synonyms.json"))
                .expect("assets/r1_sgg/synonyms.json is the layout scripts/r1_sgg_eval_reference.py writes");
            let map = |pairs: &[(String, String)]| pairs.iter().cloned().collect();
            Synonyms {
                obj2vg: map(&asset.obj2vg),
                rel2vg: map(&asset.rel2vg),
                obj2psg: map(&asset.obj2psg),
                pass2act: asset
                    .pass2act
                    .iter()
                    .map(|(s, t, passive)| (s.clone(), (t.clone(), *passive == 1)))
                    .collect(),
                asset,
            }
        })
    }

    /// R1-SGG's commit, NLTK's version and WordNet's, as the asset records them.
    pub(crate) fn versions(&self) -> (&str, &str, &str) {
        (
            &self.asset.r1_sgg_commit,
            &self.asset.nltk,
            &self.asset.wordnet_version,
        )
    }

    /// VG150's class lists as R1-SGG's evaluation holds them.
    pub(crate) fn vg150(&self) -> &ClassLists {
        &self.asset.vg150
    }

    /// PSG's class lists (`src/psg_categories.json`).
    pub(crate) fn psg(&self) -> &ClassLists {
        &self.asset.psg
    }

    /// `obj2vg_list` (VG150) or `obj2psg_list` (PSG) as a map.
    pub(crate) fn objects(&self, psg: bool) -> &HashMap<String, String> {
        if psg {
            &self.obj2psg
        } else {
            &self.obj2vg
        }
    }

    /// `rel2vg_list` (VG150); PSG has none (`map_rel2target = {}`).
    pub(crate) fn relations(&self, psg: bool) -> Option<&HashMap<String, String>> {
        (!psg).then_some(&self.rel2vg)
    }

    /// `pass2act_list` (both datasets): predicate -> (target, swap).
    pub(crate) fn passive(&self) -> &HashMap<String, (String, bool)> {
        &self.pass2act
    }

    /// `find_synonym_map([item], targets).get(item)`: `item` if it is a
    /// target; else the first target lemma of `wordnet.synsets(item)`; else,
    /// when `item` splits (Python's `str.split`) into several words, the
    /// first word that is a target or has one among its synsets' lemmas.
    pub(crate) fn find(&self, set: TargetSet, item: &str) -> Option<&str> {
        let table = &self.asset.wordnet[set.key()];
        let target = |word: &str| {
            table
                .targets
                .iter()
                .find(|t| t.as_str() == word)
                .map(String::as_str)
        };
        if let Some(t) = target(item) {
            return Some(t);
        }
        if let Some(t) = self.synset_lemma(table, item) {
            return Some(t);
        }
        let words: Vec<&str> = item.split(is_python_space).filter(|w| !w.is_empty()).collect();
        if words.len() < 2 {
            return None;
        }
        words
            .into_iter()
            .find_map(|w| target(w).or_else(|| self.synset_lemma(table, w)))
    }

    /// The first target lemma among `wordnet.synsets(word)`'s synsets.
    fn synset_lemma<'a>(&'a self, table: &'a WordNetTable, word: &str) -> Option<&'a str> {
        // NLTK lowercases with str.lower, as Rust's to_lowercase (full mapping).
        let word = word.to_lowercase();
        POS_ORDER.iter().find_map(|pos| {
            let forms = table.forms.get(*pos)?;
            let found = |f: &str| forms.get(f).map(String::as_str);
            if let Some(t) = found(&word) {
                return Some(t);
            }
            match table.exceptions.get(*pos).and_then(|e| e.get(&word)) {
                Some(bases) => bases.iter().find_map(|b| found(b)),
                None => self.asset.substitutions.get(*pos)?.iter().find_map(|(old, new)| {
                    let stem = word.strip_suffix(old.as_str())?;
                    found(&format!("{stem}{new}"))
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scene::{PSG, VG150};
    use serde_json::Value;

    #[test]
    fn class_lists_are_the_crates() {
        let s = Synonyms::get();
        assert_eq!(s.vg150().objects[0], "__background__");
        assert_eq!(s.vg150().predicates[0], "__background__");
        assert_eq!(s.vg150().objects[1..], VG150.objects[..]);
        assert_eq!(s.vg150().predicates[1..], VG150.predicates[..]);
        assert_eq!(s.psg().objects, PSG.objects);
        assert_eq!(s.psg().predicates, PSG.predicates);
        assert_eq!(
            s.versions(),
            ("e4de64d4c4c97edec648021d012198b21a9b1864", "3.9.1", "3.0")
        );
    }

    #[test]
    fn static_lists_by_hand() {
        let s = Synonyms::get();
        assert_eq!(s.objects(false)["wine bottle"], "bottle");
        assert_eq!(s.relations(false).unwrap()["is riding"], "riding");
        assert!(s.relations(true).is_none());
        assert_eq!(s.passive()["worn by"], ("wearing".to_string(), true));
        assert_eq!(s.objects(true)["tree"], "tree merged");
    }

    /// `find_synonym_map` on 2,000 words, computed by R1-SGG's function with
    /// NLTK 3.9.1 and WordNet 3.0: the tables give the same answer for each.
    #[test]
    fn wordnet_lookup_equals_nltk() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/r1_sgg_eval/wordnet_samples.json"
        );
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let s = Synonyms::get();
        let mut mapped = 0;
        let samples = fixture["samples"].as_array().unwrap();
        let sets = [
            TargetSet::Vg150Objects,
            TargetSet::Vg150Predicates,
            TargetSet::PsgPredicates,
        ];
        for (column, set) in sets.iter().enumerate() {
            assert_eq!(fixture["columns"][column + 1], set.key());
        }
        for row in samples {
            let word = row[0].as_str().unwrap();
            for (column, &set) in sets.iter().enumerate() {
                let want = row[column + 1].as_str();
                assert_eq!(s.find(set, word), want, "{word:?} in {}", set.key());
                mapped += usize::from(want.is_some());
            }
        }
        assert!(
            samples.len() > 1000 && mapped > 1000,
            "{} words, {mapped} mapped",
            samples.len()
        );
        // By hand: plural by rule, a form of another part of speech, a
        // phrase by its words, an exception-list plural.
        assert_eq!(s.find(TargetSet::Vg150Objects, "trees"), Some("tree"));
        assert_eq!(s.find(TargetSet::Vg150Objects, "red car"), Some("car"));
        assert_eq!(s.find(TargetSet::Vg150Objects, "unicorn"), None);
        assert_eq!(s.find(TargetSet::Vg150Predicates, "inch"), Some("in"));
    }
}
