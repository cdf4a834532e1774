//! How alike two labels are: the [`LabelSimilarity`] the rewards weigh
//! categories and predicates by, and a graph's labels normalized once.
//! spaCy's similarity, R1-SGG's, is [`super::SpacyTable`].

use std::collections::HashMap;

use crate::data::scene::{normalize_label, BBox, SceneGraph};

/// How alike two labels (normalized) are, in `[-1, 1]`; 1 for equal labels.
/// Negative values are allowed because spaCy's similarity (a cosine), which
/// R1-SGG's rewards use as it comes, has them. Values outside `[-1, 1]` are
/// clamped and NaN reads as 0.
pub trait LabelSimilarity: Sync {
    /// Similarity of two normalized labels.
    fn similarity(&self, a: &str, b: &str) -> f64;
}

/// 1 for equal labels, else 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactMatch;

impl LabelSimilarity for ExactMatch {
    fn similarity(&self, a: &str, b: &str) -> f64 {
        f64::from(u8::from(a == b))
    }
}

/// 1 for equal labels or labels in one synonym group, else 0.
#[derive(Debug, Clone, Default)]
pub struct SynonymTable {
    group: HashMap<String, usize>,
}

impl SynonymTable {
    /// A table from groups of synonyms (`&[&["man", "guy", "men"], ...]`);
    /// a label in several groups belongs to the last.
    pub fn new(groups: &[&[&str]]) -> Self {
        let mut group = HashMap::new();
        for (g, labels) in groups.iter().enumerate() {
            for label in labels.iter() {
                group.insert(normalize_label(label), g);
            }
        }
        Self { group }
    }
}

impl LabelSimilarity for SynonymTable {
    fn similarity(&self, a: &str, b: &str) -> f64 {
        let same_group = matches!((self.group.get(a), self.group.get(b)), (Some(x), Some(y)) if x == y);
        f64::from(u8::from(a == b || same_group))
    }
}

/// `sim` clamped to `[-1, 1]`, NaN as 0.
pub(crate) fn similarity(sim: &dyn LabelSimilarity, a: &str, b: &str) -> f64 {
    let s = sim.similarity(a, b);
    if s.is_nan() {
        0.0
    } else {
        s.clamp(-1.0, 1.0)
    }
}

/// Labels of a graph, normalized once.
pub(crate) struct Labels<'a> {
    pub(crate) graph: &'a SceneGraph,
    pub(crate) categories: Vec<String>,
    /// `(subject, normalized predicate, object)`, resolvable relations only.
    pub(crate) triplets: Vec<(usize, String, usize)>,
}

impl<'a> Labels<'a> {
    pub(crate) fn new(graph: &'a SceneGraph) -> Self {
        Self {
            graph,
            categories: graph
                .objects
                .iter()
                .map(|o| normalize_label(&o.category))
                .collect(),
            triplets: graph
                .triplets()
                .iter()
                .map(|t| (t.subject, normalize_label(t.predicate), t.object))
                .collect(),
        }
    }

    pub(crate) fn bbox(&self, i: usize) -> &BBox {
        &self.graph.objects[i].bbox
    }
}
