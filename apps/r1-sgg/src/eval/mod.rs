//! Evaluation ([`Evaluator`]), as R1-SGG reports it: the failure rate
//! (outputs with no readable graph), triplet recall R@K (a GT triplet is
//! recalled when one of the first K predicted triplets, in the model's
//! order, has equal labels and both boxes at IoU >= 0.5: the hard-recall
//! test), averaged over images with at least one GT triplet, and mean
//! recall mR@K (the same per predicate, averaged over the images holding
//! that predicate, then over predicates). Failed outputs recall nothing.
//! Given the data's vocabulary, it also counts the predicted labels outside
//! it: the ones the rewards compare by exact match, not by spaCy's
//! similarity ([`crate::reward::SpacyTable`]).
//! [`stats::RelativeGain`] compares two checkpoints' recall on the same images,
//! image by image, with a 95% interval.
//!
//! This evaluation is the stricter one. [`r1_sgg`] reproduces R1-SGG's own
//! (`sgg_gather_preds.py` and `vg150_eval.py`), which sets results beside
//! the paper's: it leaves out images without a usable relation, filters
//! relations to the vocabulary before ranking, maps labels through synonym
//! lists, and takes IoU on pixel boxes with the +1-pixel convention (its
//! module docs list every difference).

use std::collections::{BTreeMap, HashSet};

use candle_core::Result;
use grpo_kernels::SamplingConfig;

use crate::data::format::{parse_answer, ParsedAnswer};
use crate::data::scene::{iou, SceneGraph, Vocabulary};
use crate::data::Sample;
use crate::reward::labels::Labels;
use crate::reward::{hits, IOU_THRESHOLD};
use crate::train::policy::Policy;
use crate::train::{progress, FORM};

pub mod r1_sgg;
pub mod stats;

/// Predictions of greedy decoding on `samples`, `batch` images at a time.
pub fn predict(policy: &dyn Policy, samples: &[Sample], batch: usize, max_new: usize) -> Result<Vec<String>> {
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..SamplingConfig::default()
    };
    let bar = progress(samples.len() as u64, "eval");
    let mut texts = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(batch) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        for c in policy.generate(&refs, 1, max_new, &greedy)? {
            texts.push(policy.decode(&c)?);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(texts)
}

/// Failure rate, recall and mean recall of `texts` against `samples`, and
/// the predicted labels outside `vocab`.
pub fn evaluate(texts: &[String], samples: &[Sample], vocab: &Vocabulary) -> EvalSummary {
    let mut eval = Evaluator::default().with_vocabulary(vocab);
    for (text, s) in texts.iter().zip(samples) {
        eval.add_parsed(&parse_answer(text, FORM), &s.graph);
    }
    eval.summary()
}

/// Accumulates failure rate, R@K and mR@K over a test set.
#[derive(Debug, Clone)]
pub struct Evaluator {
    ks: Vec<usize>,
    images: usize,
    failures: usize,
    /// Outputs added by [`add_parsed`](Self::add_parsed) that break a format rule.
    invalid: usize,
    /// Images with GT triplets, and per K the recall of each, in the order added.
    recall_images: usize,
    image_recall: Vec<Vec<f64>>,
    /// Summed per-image object recall, and the images with GT objects.
    object_sum: f64,
    object_images: usize,
    /// Summed per-image pair recall (over the images with GT triplets).
    pair_sum: f64,
    /// Per predicate: summed per-image recall at each K, images holding it.
    per_predicate: BTreeMap<String, (Vec<f64>, usize)>,
    /// The vocabulary's normalized labels, if given.
    vocabulary: Option<HashSet<String>>,
    /// Predicted labels seen, and those outside the vocabulary.
    predicted_labels: usize,
    out_of_vocabulary: usize,
}

impl Default for Evaluator {
    /// R@20, R@50, R@100.
    fn default() -> Self {
        Self::new(&[20, 50, 100])
    }
}

/// Metrics over everything added to an [`Evaluator`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSummary {
    /// Images added.
    pub images: usize,
    /// Fraction of outputs with no readable graph.
    pub failure_rate: f64,
    /// Fraction of outputs that break a format rule, failures included (a
    /// readable graph whose relation names an undefined object is invalid:
    /// that relation counts nothing). Only outputs added with
    /// [`Evaluator::add_parsed`] are checked.
    pub invalid_rate: f64,
    /// `(K, R@K)`.
    pub recall: Vec<(usize, f64)>,
    /// `(K, recall of each image with GT triplets, in the order added)`:
    /// R@K is their mean. Two checkpoints evaluated on the same images are
    /// compared image by image with [`stats::RelativeGain::paired`].
    pub image_recall: Vec<(usize, Vec<f64>)>,
    /// `(K, mR@K)`.
    pub mean_recall: Vec<(usize, f64)>,
    /// Fraction of GT objects that a predicted object of the same category
    /// overlaps at IoU >= 0.5 (mean over images).
    pub object_recall: f64,
    /// Fraction of GT triplets whose subject and object are both found so:
    /// the recall a perfect predicate choice would reach (mean over images).
    pub pair_recall: f64,
    /// Normalized predicate and its recall at each K.
    pub per_predicate: Vec<(String, Vec<f64>)>,
    /// Labels in the readable predictions: each object's category and each
    /// relation's predicate (relations naming existing objects).
    pub predicted_labels: usize,
    /// How many of those are outside the vocabulary given with
    /// [`Evaluator::with_vocabulary`] (0 without one): the rewards score them
    /// by exact match ([`crate::reward::SpacyTable`]).
    pub out_of_vocabulary: usize,
}

impl Evaluator {
    /// An evaluator reporting recall at each of `ks`.
    pub fn new(ks: &[usize]) -> Self {
        Self {
            ks: ks.to_vec(),
            images: 0,
            failures: 0,
            invalid: 0,
            recall_images: 0,
            image_recall: vec![Vec::new(); ks.len()],
            object_sum: 0.0,
            object_images: 0,
            pair_sum: 0.0,
            per_predicate: BTreeMap::new(),
            vocabulary: None,
            predicted_labels: 0,
            out_of_vocabulary: 0,
        }
    }

    /// Counts the predicted labels outside `vocab` (after normalization).
    pub fn with_vocabulary(self, vocab: &Vocabulary) -> Self {
        Self {
            vocabulary: Some(vocab.normalized_labels()),
            ..self
        }
    }

    /// Adds a parsed output and its ground truth; an output whose graph is
    /// not whole ([`ParsedAnswer::failed`]: objects without readable
    /// relations) is a failure.
    pub fn add_parsed(&mut self, parsed: &ParsedAnswer, gt: &SceneGraph) {
        self.invalid += usize::from(!parsed.is_valid());
        self.add(parsed.graph.as_ref().filter(|_| !parsed.failed()), gt);
    }

    /// Adds a predicted graph (`None`: unparseable) and its ground truth.
    pub fn add(&mut self, pred: Option<&SceneGraph>, gt: &SceneGraph) {
        self.images += 1;
        self.failures += usize::from(pred.is_none());
        let empty = SceneGraph::default();
        let (p, g) = (Labels::new(pred.unwrap_or(&empty)), Labels::new(gt));
        let predicted = p.categories.iter().chain(p.triplets.iter().map(|t| &t.1));
        for label in predicted {
            self.predicted_labels += 1;
            if let Some(known) = &self.vocabulary {
                self.out_of_vocabulary += usize::from(!known.contains(label));
            }
        }
        let found: Vec<bool> = (0..gt.objects.len())
            .map(|i| {
                (0..p.categories.len())
                    .any(|j| p.categories[j] == g.categories[i] && iou(g.bbox(i), p.bbox(j)) >= IOU_THRESHOLD)
            })
            .collect();
        if !found.is_empty() {
            self.object_images += 1;
            self.object_sum += found.iter().filter(|&&f| f).count() as f64 / found.len() as f64;
        }
        let total = gt.relations.len();
        if total == 0 {
            return;
        }
        let pairs = g.triplets.iter().filter(|t| found[t.0] && found[t.2]).count();
        self.pair_sum += pairs as f64 / total as f64;
        // Rank of the first predicted triplet hitting each GT triplet.
        let ranks: Vec<Option<usize>> = g
            .triplets
            .iter()
            .map(|t| p.triplets.iter().position(|q| hits(&g, t, &p, q)))
            .collect();
        let recalled = |k: usize, of: &dyn Fn(&(usize, String, usize)) -> bool| {
            g.triplets
                .iter()
                .zip(&ranks)
                .filter(|(t, r)| of(t) && matches!(r, Some(r) if *r < k))
                .count()
        };
        self.recall_images += 1;
        for (recalls, &k) in self.image_recall.iter_mut().zip(&self.ks) {
            recalls.push(recalled(k, &|_| true) as f64 / total as f64);
        }
        let mut predicates: Vec<&String> = g.triplets.iter().map(|t| &t.1).collect();
        predicates.sort();
        predicates.dedup();
        for q in predicates {
            let of_q = |t: &(usize, String, usize)| &t.1 == q;
            let count = g.triplets.iter().filter(|t| of_q(t)).count() as f64;
            let entry = self
                .per_predicate
                .entry(q.clone())
                .or_insert_with(|| (vec![0.0; self.ks.len()], 0));
            entry.1 += 1;
            for (sum, &k) in entry.0.iter_mut().zip(&self.ks) {
                *sum += recalled(k, &of_q) as f64 / count;
            }
        }
    }

    /// The metrics so far (all 0 before anything is added).
    pub fn summary(&self) -> EvalSummary {
        let per_predicate: Vec<(String, Vec<f64>)> = self
            .per_predicate
            .iter()
            .map(|(q, (sums, n))| (q.clone(), sums.iter().map(|s| s / *n as f64).collect()))
            .collect();
        let mean_recall = self
            .ks
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let sum: f64 = per_predicate.iter().map(|(_, r)| r[i]).sum();
                (k, sum / per_predicate.len().max(1) as f64)
            })
            .collect();
        EvalSummary {
            images: self.images,
            failure_rate: self.failures as f64 / self.images.max(1) as f64,
            invalid_rate: self.invalid as f64 / self.images.max(1) as f64,
            recall: self
                .ks
                .iter()
                .zip(&self.image_recall)
                .map(|(&k, r)| (k, mean(r)))
                .collect(),
            image_recall: self.ks.iter().copied().zip(self.image_recall.clone()).collect(),
            mean_recall,
            object_recall: self.object_sum / self.object_images.max(1) as f64,
            pair_recall: self.pair_sum / self.recall_images.max(1) as f64,
            per_predicate,
            predicted_labels: self.predicted_labels,
            out_of_vocabulary: self.out_of_vocabulary,
        }
    }
}

/// The mean of `values` (0 when empty).
pub(crate) fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::format::AnswerForm;
    use crate::data::scene::Relation;
    use crate::reward::tests::{close, obj};

    /// a.1 on b.2, c.3 on b.2, a.1 near c.3; a and c small, b large.
    fn abc() -> SceneGraph {
        SceneGraph {
            objects: vec![
                obj("a.1", [0.0, 0.0, 0.3, 0.3]),
                obj("b.2", [0.5, 0.5, 1.0, 1.0]),
                obj("c.3", [0.0, 0.6, 0.3, 0.9]),
            ],
            relations: vec![
                Relation::new("a.1", "on", "b.2"),
                Relation::new("c.3", "on", "b.2"),
                Relation::new("a.1", "near", "c.3"),
            ],
        }
    }

    #[test]
    fn evaluation_by_hand() {
        let mut ev = Evaluator::new(&[1, 2, 3]);
        // Image 1: a on b, c on b, a near c.
        let g1 = abc();
        // Predicted in order: a wrong triplet (b on a), then a near c, then
        // a on b. Hits: a-near-c at rank 1, a-on-b at rank 2, c-on-b never.
        let mut p1 = g1.clone();
        p1.relations = vec![
            Relation::new("b.2", "on", "a.1"),
            Relation::new("a.1", "near", "c.3"),
            Relation::new("a.1", "on", "b.2"),
        ];
        ev.add(Some(&p1), &g1);
        // Image 2 fails to parse; GT: a on b.
        let mut g2 = g1.clone();
        g2.relations.truncate(1);
        ev.add_parsed(&parse_answer("garbage", AnswerForm::Strict), &g2);
        // Image 3 has no GT relations: counted for failures only.
        let mut g3 = g1.clone();
        g3.relations.clear();
        ev.add(Some(&g3), &g3);
        let s = ev.summary();
        assert_eq!(s.images, 3);
        close(s.failure_rate, 1.0 / 3.0);
        // Only image 2 went through the format check, and failed it.
        close(s.invalid_rate, 1.0 / 3.0);
        // R@K = mean over images 1 and 2 of hits/GT:
        //   K=1: (0 + 0)/2; K=2: (1/3 + 0)/2; K=3: (2/3 + 0)/2.
        let r: Vec<f64> = s.recall.iter().map(|x| x.1).collect();
        for (got, want) in r.iter().zip([0.0, 1.0 / 6.0, 1.0 / 3.0]) {
            close(*got, want);
        }
        // near (image 1 only): K=1 0, K=2 1, K=3 1.
        // on: image 1 (1 of 2 hit at K=3) and image 2 (0): K=3 (.5 + 0)/2.
        assert_eq!(s.per_predicate[0].0, "near");
        assert_eq!(s.per_predicate[1].0, "on");
        let mr: Vec<f64> = s.mean_recall.iter().map(|x| x.1).collect();
        for (got, want) in mr.iter().zip([0.0, 0.5, (0.25 + 1.0) / 2.0]) {
            close(*got, want);
        }
        assert_eq!(s.recall.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        // Per image, in the order added (image 3 has no GT triplets).
        for ((k, recalls), want) in
            s.image_recall
                .iter()
                .zip([[0.0, 0.0], [1.0 / 3.0, 0.0], [2.0 / 3.0, 0.0]])
        {
            assert_eq!(recalls.len(), 2, "K = {k}");
            for (got, want) in recalls.iter().zip(want) {
                close(*got, want);
            }
        }
        let nothing = Evaluator::default().summary();
        assert_eq!((nothing.images, nothing.failure_rate), (0, 0.0));
        assert_eq!(nothing.recall, vec![(20, 0.0), (50, 0.0), (100, 0.0)]);
    }

    #[test]
    fn object_and_pair_recall_count_located_ground_truth() {
        let g = abc();
        // a and c found; b at IoU 0.25; a d where b is (wrong category).
        let p = SceneGraph {
            objects: vec![
                obj("a.1", [0.0, 0.0, 0.3, 0.3]),
                obj("b.2", [0.75, 0.75, 1.0, 1.0]),
                obj("c.3", [0.0, 0.6, 0.3, 0.9]),
                obj("d.4", [0.5, 0.5, 1.0, 1.0]),
            ],
            relations: Vec::new(),
        };
        let mut ev = Evaluator::default();
        ev.add(Some(&p), &g);
        // A failure: nothing found.
        ev.add(None, &g);
        // No relations, every object found: counts for objects only.
        let mut g3 = g.clone();
        g3.relations.clear();
        ev.add(Some(&g3), &g3);
        let s = ev.summary();
        // Objects: (2/3 + 0 + 1) / 3. Pairs (images 1, 2): a-near-c of 3, then 0.
        close(s.object_recall, 5.0 / 9.0);
        close(s.pair_recall, 1.0 / 6.0);
        // Found pairs bound the recall: no relation was predicted.
        close(s.recall[0].1, 0.0);
    }

    #[test]
    fn labels_outside_the_vocabulary_are_counted() {
        use crate::data::scene::SYNTHETIC;
        let g = abc();
        // a, b, c, on, on, near: of the shapes world's labels only on and near.
        let mut ev = Evaluator::default().with_vocabulary(&SYNTHETIC);
        ev.add(Some(&g), &g);
        // Circle and "Left_Of" are the vocabulary's once normalized; a
        // failure adds nothing.
        let p = SceneGraph {
            objects: vec![
                obj("Circle.1", [0.0, 0.0, 0.3, 0.3]),
                obj("b.2", [0.5, 0.5, 1.0, 1.0]),
            ],
            relations: vec![Relation::new("Circle.1", "Left_Of", "b.2")],
        };
        ev.add(Some(&p), &g);
        ev.add(None, &g);
        let s = ev.summary();
        assert_eq!((s.predicted_labels, s.out_of_vocabulary), (9, 4));
        // Without a vocabulary, labels are counted and none is outside.
        let mut ev = Evaluator::default();
        ev.add(Some(&g), &g);
        assert_eq!(
            (ev.summary().predicted_labels, ev.summary().out_of_vocabulary),
            (6, 0)
        );
    }
}
