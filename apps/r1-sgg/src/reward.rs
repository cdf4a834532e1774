//! R1-SGG's graph-centric rewards (Chen et al., "Compile Scene Graphs with
//! Reinforcement Learning", arXiv 2504.13617; code gpt4vision/R1-SGG) and
//! the scene-graph evaluation metrics.
//!
//! A completion is parsed once (`format.rs`) and scored against the ground
//! truth `G` (objects `g`, relations `E_G`); `P` is the predicted graph.
//! Labels are compared after `normalize_label`, through a pluggable
//! [`LabelSimilarity`] `sim` in `[0, 1]` ([`ExactMatch`], or a
//! [`SynonymTable`]; R1-SGG uses spaCy word vectors, which a Rust example
//! cannot ship).
//!
//! - **Format** (weight 1): 1 iff the output follows every format rule of
//!   its form (tags, JSON shape, a non-empty graph, unique ids, relations
//!   naming existing objects), else 0.
//! - **Node** (weight 2 each): predicted objects are matched one-to-one to
//!   ground-truth objects by the Hungarian algorithm ([`hungarian`]) with
//!   cost `1 (1 - sim) + 2 (1 - GIoU) + 5 L1` (L1 the summed coordinate
//!   error in normalized coordinates; [`MatchCost`]); then
//!   `node_acc = 2 sum_matched sim / |g|` and
//!   `node_box = 2 sum_matched (2 IoU + 5 exp(-L1)) / 7 / |g|`
//!   (`|g|` read as 1 when the ground truth has no objects).
//! - **Edge** (weight 5), one of ([`EdgeReward`]):
//!   - *Hard recall*: `5 (#GT triplets hit) / max(1, |E_G|)`, a GT triplet
//!     hit by some predicted triplet with the same predicate, the same
//!     subject and object categories, and both boxes at IoU >= 0.5;
//!   - *Hard + relax*: `5 sum_GT max_p sim_s sim_o sim_pred / max(1, |E_G|)`,
//!     the max over predicted triplets whose two boxes pass IoU >= 0.5;
//!   - *Soft*: over the node matching: for each GT triplet whose subject and
//!     object are matched to `s'`, `o'`, the best `sim_s sim_o sim_pred` over
//!     predicted triplets `(s', p, o')`, summed, times `5 / max(1, |E_G|)`.
//!     (R1-SGG keeps the last predicate written for a pair; we take the
//!     best, as the other two rewards do.)
//!
//! Each reward's weight is set in [`RewardWeights`] (0 turns it off). An
//! unparseable output scores 0 everywhere. A graph that breaks a format
//! rule still earns node and edge rewards (as in R1-SGG), except that a
//! relation naming an undefined object counts nothing.
//!
//! **Evaluation** ([`Evaluator`]), as R1-SGG reports it: the failure rate
//! (outputs with no readable graph), triplet recall R@K (a GT triplet is
//! recalled when one of the first K predicted triplets, in the model's
//! order, has equal labels and both boxes at IoU >= 0.5: the hard-recall
//! test), averaged over images with at least one GT triplet, and mean
//! recall mR@K (the same per predicate, averaged over the images holding
//! that predicate, then over predicates). Failed outputs recall nothing.
//! [`RelativeGain`] compares two checkpoints' recall on the same images,
//! image by image, with a 95% interval.

use std::collections::{BTreeMap, HashMap};

use crate::format::{parse_answer, AnswerForm, ParsedAnswer};
use crate::scene::{giou, iou, l1, normalize_label, BBox, SceneGraph};

/// Boxes match when their IoU reaches this.
pub const IOU_THRESHOLD: f64 = 0.5;

/// How alike two labels (normalized) are, in `[0, 1]`; 1 for equal labels.
/// Values outside `[0, 1]` are clamped and NaN reads as 0.
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

/// `sim` clamped to `[0, 1]`, NaN as 0.
fn similarity(sim: &dyn LabelSimilarity, a: &str, b: &str) -> f64 {
    let s = sim.similarity(a, b);
    if s.is_nan() {
        0.0
    } else {
        s.clamp(0.0, 1.0)
    }
}

/// Minimum-cost one-to-one assignment (Kuhn-Munkres with potentials,
/// `O(n^2 m)` for `n = min(rows, cols)`, `m = max(rows, cols)`), for a
/// row-major `[rows, cols]` cost matrix: `min(rows, cols)` pairs
/// `(row, col)`, sorted by row, minimizing the summed cost. `None` if
/// `cost` has the wrong length or a non-finite value.
pub fn hungarian(cost: &[f64], rows: usize, cols: usize) -> Option<Vec<(usize, usize)>> {
    if rows.checked_mul(cols) != Some(cost.len()) || cost.iter().any(|c| !c.is_finite()) {
        return None;
    }
    if rows > cols {
        let transposed: Vec<f64> = (0..cols * rows)
            .map(|k| cost[(k % rows) * cols + k / rows])
            .collect();
        let mut pairs: Vec<(usize, usize)> = hungarian(&transposed, cols, rows)?
            .into_iter()
            .map(|(c, r)| (r, c))
            .collect();
        pairs.sort_unstable();
        return Some(pairs);
    }
    // Rows 1..=n are added one at a time; column 0 is a virtual start.
    // u, v: dual potentials; owner[j]: row holding column j (0 = free);
    // way[j]: previous column on the shortest augmenting path to j.
    let (n, m) = (rows, cols);
    let a = |i: usize, j: usize| cost[(i - 1) * m + (j - 1)];
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; m + 1];
    let mut owner = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        owner[0] = i;
        let mut j0 = 0;
        let mut min_slack = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = owner[j0];
            let (mut delta, mut j1) = (f64::INFINITY, 0);
            for j in 1..=m {
                if !used[j] {
                    let slack = a(i0, j) - u[i0] - v[j];
                    if slack < min_slack[j] {
                        min_slack[j] = slack;
                        way[j] = j0;
                    }
                    if min_slack[j] < delta {
                        delta = min_slack[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[owner[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_slack[j] -= delta;
                }
            }
            j0 = j1;
            if owner[j0] == 0 {
                break;
            }
        }
        // Flip the augmenting path.
        while j0 != 0 {
            let prev = way[j0];
            owner[j0] = owner[prev];
            j0 = prev;
        }
    }
    let mut pairs: Vec<(usize, usize)> = (1..=m)
        .filter(|&j| owner[j] != 0)
        .map(|j| (owner[j] - 1, j - 1))
        .collect();
    pairs.sort_unstable();
    Some(pairs)
}

/// Weights of the node-matching cost `semantic (1 - sim) + giou (1 - GIoU)
/// + l1 L1` (R1-SGG: 1, 2, 5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchCost {
    /// Weight of the label dissimilarity.
    pub semantic: f64,
    /// Weight of `1 - GIoU`.
    pub giou: f64,
    /// Weight of the summed coordinate error.
    pub l1: f64,
}

impl Default for MatchCost {
    fn default() -> Self {
        Self {
            semantic: 1.0,
            giou: 2.0,
            l1: 5.0,
        }
    }
}

/// A predicted object matched to a ground-truth object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeMatch {
    /// Index in the predicted graph.
    pub pred: usize,
    /// Index in the ground truth.
    pub gt: usize,
    /// Similarity of their categories.
    pub similarity: f64,
}

/// Labels of a graph, normalized once.
struct Labels<'a> {
    graph: &'a SceneGraph,
    categories: Vec<String>,
    /// `(subject, normalized predicate, object)`, resolvable relations only.
    triplets: Vec<(usize, String, usize)>,
}

impl<'a> Labels<'a> {
    fn new(graph: &'a SceneGraph) -> Self {
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

    fn bbox(&self, i: usize) -> &BBox {
        &self.graph.objects[i].bbox
    }
}

/// The Hungarian node matching of R1-SGG: `min(|P|, |g|)` pairs of least
/// total [`MatchCost`]. Empty if a cost weight is not finite.
pub fn match_objects(
    pred: &SceneGraph,
    gt: &SceneGraph,
    sim: &dyn LabelSimilarity,
    cost: &MatchCost,
) -> Vec<NodeMatch> {
    match_labels(&Labels::new(pred), &Labels::new(gt), sim, cost)
}

fn match_labels(pred: &Labels, gt: &Labels, sim: &dyn LabelSimilarity, cost: &MatchCost) -> Vec<NodeMatch> {
    let (np, ng) = (pred.categories.len(), gt.categories.len());
    let mut sims = Vec::with_capacity(np * ng);
    let mut costs = Vec::with_capacity(np * ng);
    for p in 0..np {
        for g in 0..ng {
            let s = similarity(sim, &pred.categories[p], &gt.categories[g]);
            let (bp, bg) = (pred.bbox(p), gt.bbox(g));
            sims.push(s);
            costs.push(cost.semantic * (1.0 - s) + cost.giou * (1.0 - giou(bp, bg)) + cost.l1 * l1(bp, bg));
        }
    }
    hungarian(&costs, np, ng)
        .unwrap_or_default()
        .into_iter()
        .map(|(p, g)| NodeMatch {
            pred: p,
            gt: g,
            similarity: sims[p * ng + g],
        })
        .collect()
}

/// `(node_acc, node_box)` before weighting, each in `[0, 1]`:
/// `sum sim / |g|` and `sum (2 IoU + 5 exp(-L1)) / 7 / |g|` over the
/// node matching.
pub fn node_rewards(
    pred: &SceneGraph,
    gt: &SceneGraph,
    sim: &dyn LabelSimilarity,
    cost: &MatchCost,
) -> (f64, f64) {
    node_scores(&match_objects(pred, gt, sim, cost), pred, gt)
}

fn node_scores(matches: &[NodeMatch], pred: &SceneGraph, gt: &SceneGraph) -> (f64, f64) {
    let n = gt.objects.len().max(1) as f64;
    let acc: f64 = matches.iter().map(|m| m.similarity).sum();
    let boxes: f64 = matches
        .iter()
        .map(|m| {
            let (bp, bg) = (&pred.objects[m.pred].bbox, &gt.objects[m.gt].bbox);
            (2.0 * iou(bp, bg) + 5.0 * (-l1(bp, bg)).exp()) / 7.0
        })
        .sum();
    (acc / n, boxes / n)
}

/// Which edge reward R1-SGG variant to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EdgeReward {
    /// Exact labels, both boxes at IoU >= 0.5.
    #[default]
    HardRecall,
    /// Best label-similarity product among IoU-passing predictions.
    HardRelax,
    /// Label-similarity product over the Hungarian node matching.
    Soft,
}

/// Whether a predicted triplet hits a GT triplet: equal predicate and
/// categories, both boxes at IoU >= 0.5.
fn hits(gt: &Labels, g: &(usize, String, usize), pred: &Labels, p: &(usize, String, usize)) -> bool {
    g.1 == p.1
        && gt.categories[g.0] == pred.categories[p.0]
        && gt.categories[g.2] == pred.categories[p.2]
        && boxes_pass(gt, g, pred, p)
}

fn boxes_pass(gt: &Labels, g: &(usize, String, usize), pred: &Labels, p: &(usize, String, usize)) -> bool {
    iou(gt.bbox(g.0), pred.bbox(p.0)) >= IOU_THRESHOLD && iou(gt.bbox(g.2), pred.bbox(p.2)) >= IOU_THRESHOLD
}

/// The edge reward before weighting, in `[0, 1]`.
pub fn edge_reward(
    kind: EdgeReward,
    pred: &SceneGraph,
    gt: &SceneGraph,
    sim: &dyn LabelSimilarity,
    cost: &MatchCost,
) -> f64 {
    let (p, g) = (Labels::new(pred), Labels::new(gt));
    let matches = match kind {
        EdgeReward::Soft => match_labels(&p, &g, sim, cost),
        _ => Vec::new(),
    };
    edge_score(kind, &p, &g, sim, &matches)
}

fn edge_score(
    kind: EdgeReward,
    pred: &Labels,
    gt: &Labels,
    sim: &dyn LabelSimilarity,
    matches: &[NodeMatch],
) -> f64 {
    let product = |g: &(usize, String, usize), p: &(usize, String, usize)| {
        similarity(sim, &gt.categories[g.0], &pred.categories[p.0])
            * similarity(sim, &gt.categories[g.2], &pred.categories[p.2])
            * similarity(sim, &g.1, &p.1)
    };
    let matched: HashMap<usize, usize> = matches.iter().map(|m| (m.gt, m.pred)).collect();
    let per_triplet = |g: &(usize, String, usize)| -> f64 {
        let mut candidates = pred.triplets.iter();
        match kind {
            EdgeReward::HardRecall => f64::from(u8::from(candidates.any(|p| hits(gt, g, pred, p)))),
            EdgeReward::HardRelax => candidates
                .filter(|p| boxes_pass(gt, g, pred, p))
                .map(|p| product(g, p))
                .fold(0.0, f64::max),
            EdgeReward::Soft => match (matched.get(&g.0), matched.get(&g.2)) {
                (Some(&s), Some(&o)) => candidates
                    .filter(|p| p.0 == s && p.2 == o)
                    .map(|p| product(g, p))
                    .fold(0.0, f64::max),
                _ => 0.0,
            },
        }
    };
    // GT relations that do not resolve (never, for a checked GT) count as misses.
    let total: f64 = gt.triplets.iter().map(per_triplet).sum();
    total / gt.graph.relations.len().max(1) as f64
}

/// Weight of each reward; 0 turns one off. R1-SGG: format 1, node 2 (each
/// of node_acc and node_box), edge 5.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardWeights {
    /// Format reward weight.
    pub format: f64,
    /// Weight of node_acc and of node_box.
    pub node: f64,
    /// Edge reward weight.
    pub edge: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        Self {
            format: 1.0,
            node: 2.0,
            edge: 5.0,
        }
    }
}

impl RewardWeights {
    /// The largest total reward: `format + 2 node + edge`.
    pub fn max_total(&self) -> f64 {
        self.format + 2.0 * self.node + self.edge
    }
}

/// Everything that decides a completion's rewards.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardConfig {
    /// The form the format reward asks for (strict: think + answer).
    pub form: AnswerForm,
    /// Reward weights.
    pub weights: RewardWeights,
    /// Which edge reward.
    pub edge: EdgeReward,
    /// Node-matching cost weights.
    pub cost: MatchCost,
}

/// A completion's rewards, weighted: each in `[0, weight]`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rewards {
    /// Format reward.
    pub format: f64,
    /// Node category accuracy.
    pub node_acc: f64,
    /// Node box quality.
    pub node_box: f64,
    /// Edge reward.
    pub edge: f64,
}

impl Rewards {
    /// The sum the policy is trained on.
    pub fn total(&self) -> f64 {
        self.format + self.node_acc + self.node_box + self.edge
    }
}

/// The rewards of a parsed completion against its ground truth.
pub fn score(
    parsed: &ParsedAnswer,
    gt: &SceneGraph,
    cfg: &RewardConfig,
    sim: &dyn LabelSimilarity,
) -> Rewards {
    let Some(pred) = &parsed.graph else {
        return Rewards::default();
    };
    let w = cfg.weights;
    let (p, g) = (Labels::new(pred), Labels::new(gt));
    let needs_matching = w.node != 0.0 || (w.edge != 0.0 && cfg.edge == EdgeReward::Soft);
    let matches = if needs_matching {
        match_labels(&p, &g, sim, &cfg.cost)
    } else {
        Vec::new()
    };
    let (acc, boxes) = if w.node != 0.0 {
        node_scores(&matches, pred, gt)
    } else {
        (0.0, 0.0)
    };
    let edge = if w.edge != 0.0 {
        edge_score(cfg.edge, &p, &g, sim, &matches)
    } else {
        0.0
    };
    Rewards {
        format: w.format * f64::from(u8::from(parsed.is_valid())),
        node_acc: w.node * acc,
        node_box: w.node * boxes,
        edge: w.edge * edge,
    }
}

/// Parses a completion in `cfg.form` and scores it.
pub fn score_text(text: &str, gt: &SceneGraph, cfg: &RewardConfig, sim: &dyn LabelSimilarity) -> Rewards {
    score(&parse_answer(text, cfg.form), gt, cfg, sim)
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
    /// compared image by image with [`RelativeGain::paired`].
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
        }
    }

    /// Adds a parsed output and its ground truth.
    pub fn add_parsed(&mut self, parsed: &ParsedAnswer, gt: &SceneGraph) {
        self.invalid += usize::from(!parsed.is_valid());
        self.add(parsed.graph.as_ref(), gt);
    }

    /// Adds a predicted graph (`None`: unparseable) and its ground truth.
    pub fn add(&mut self, pred: Option<&SceneGraph>, gt: &SceneGraph) {
        self.images += 1;
        self.failures += usize::from(pred.is_none());
        let empty = SceneGraph::default();
        let (p, g) = (Labels::new(pred.unwrap_or(&empty)), Labels::new(gt));
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
        }
    }
}

/// The mean of `values` (0 when empty).
fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The relative change of a mean between two evaluations of the same
/// images, `gain = mean(after) / mean(before) - 1`, with a 95% interval.
///
/// The interval is `gain +- 1.96 se` by the delta method for a ratio of
/// means (Cochran, *Sampling Techniques*, 3rd ed., 1977, sec. 6.3): with
/// `r = mean(after) / mean(before)` and the linearized terms
/// `z_i = (after_i - r before_i) / mean(before)` (which sum to 0),
/// `se^2 = sum z_i^2 / (n (n - 1))`. Pairing matters: both checkpoints
/// find the same easy images, so the per-image terms cancel much of the
/// spread that two independent means would carry. The interval is
/// symmetric; when only a few dozen triplets are recalled at all, the
/// true one is skewed upward (a bootstrap over images shows it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelativeGain {
    /// `mean(after) / mean(before) - 1`.
    pub gain: f64,
    /// Half-width of the 95% interval, `1.96 se`.
    pub half_width: f64,
}

impl RelativeGain {
    /// Compares `after` with `before`, image by image. `None` when the two
    /// differ in length, hold fewer than two images, or `before`'s mean is
    /// not positive (no relative change is defined).
    pub fn paired(before: &[f64], after: &[f64]) -> Option<Self> {
        let n = before.len();
        let base = mean(before);
        if n != after.len() || n < 2 || base.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return None;
        }
        let ratio = mean(after) / base;
        let squares: f64 = before
            .iter()
            .zip(after)
            .map(|(b, a)| ((a - ratio * b) / base).powi(2))
            .sum();
        Some(Self {
            gain: ratio - 1.0,
            half_width: 1.96 * (squares / (n * (n - 1)) as f64).sqrt(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{answer_text, augment, graph_json};
    use crate::scene::{Object, Relation, Rng};
    use proptest::prelude::*;

    const TOL: f64 = 1e-6;

    fn obj(id: &str, bbox: [f32; 4]) -> Object {
        Object::from_id(id, bbox)
    }

    /// man.1 [0,0,.5,.5] riding horse.2 [.5,.5,1,1], wearing hat.3 [0,0,.2,.1].
    fn gt() -> SceneGraph {
        SceneGraph {
            objects: vec![
                obj("man.1", [0.0, 0.0, 0.5, 0.5]),
                obj("horse.2", [0.5, 0.5, 1.0, 1.0]),
                obj("hat.3", [0.0, 0.0, 0.2, 0.1]),
            ],
            relations: vec![
                Relation::new("man.1", "riding", "horse.2"),
                Relation::new("man.1", "wearing", "hat.3"),
            ],
        }
    }

    /// A prediction: the man exact, the horse named `horse` and boxed
    /// [.5,.5,1,.9] (IoU .8, L1 .1), the hat at [.5,0,.7,.1] (IoU 0), and
    /// the two GT relations with the given predicates.
    fn pred(horse: &str, riding: &str, wearing: &str) -> SceneGraph {
        SceneGraph {
            objects: vec![
                obj("man.1", [0.0, 0.0, 0.5, 0.5]),
                obj(&format!("{horse}.2"), [0.5, 0.5, 1.0, 0.9]),
                obj("hat.3", [0.5, 0.0, 0.7, 0.1]),
            ],
            relations: vec![
                Relation::new("man.1", riding, format!("{horse}.2")),
                Relation::new("man.1", wearing, "hat.3"),
            ],
        }
    }

    /// horse ~ pony at 0.5, everything else exact.
    struct HalfPony;
    impl LabelSimilarity for HalfPony {
        fn similarity(&self, a: &str, b: &str) -> f64 {
            match (a, b) {
                _ if a == b => 1.0,
                ("horse", "pony") | ("pony", "horse") => 0.5,
                _ => 0.0,
            }
        }
    }

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() <= TOL, "got {got}, want {want}");
    }

    /// Minimum total cost over every injective assignment, by brute force.
    fn brute_force(cost: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(cost: &[f64], rows: usize, cols: usize, r: usize, used: &mut Vec<bool>) -> f64 {
            if r == rows {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            // With more rows than columns a row may stay unassigned, as
            // long as enough rows remain to fill every column.
            let assigned = used.iter().filter(|u| **u).count();
            if rows - r > cols - assigned {
                best = go(cost, rows, cols, r + 1, used);
            }
            for c in 0..cols {
                if !used[c] {
                    used[c] = true;
                    best = best.min(cost[r * cols + c] + go(cost, rows, cols, r + 1, used));
                    used[c] = false;
                }
            }
            best
        }
        go(cost, rows, cols, 0, &mut vec![false; cols])
    }

    proptest! {
        #[test]
        fn hungarian_is_optimal(
            rows in 0usize..6,
            cols in 0usize..6,
            seed in any::<u64>(),
            integer in any::<bool>(),
        ) {
            let mut rng = crate::scene::Rng::new(seed);
            // Small integers make ties, which the potentials must handle.
            let cost: Vec<f64> = (0..rows * cols)
                .map(|_| if integer { rng.below(4) as f64 } else { rng.range(-10.0, 10.0) as f64 })
                .collect();
            let pairs = hungarian(&cost, rows, cols).unwrap();
            prop_assert_eq!(pairs.len(), rows.min(cols));
            let mut rows_seen: Vec<usize> = pairs.iter().map(|p| p.0).collect();
            let mut cols_seen: Vec<usize> = pairs.iter().map(|p| p.1).collect();
            rows_seen.dedup();
            cols_seen.sort();
            cols_seen.dedup();
            prop_assert_eq!(rows_seen.len(), pairs.len());
            prop_assert_eq!(cols_seen.len(), pairs.len());
            prop_assert!(pairs.iter().all(|&(r, c)| r < rows && c < cols));
            let total: f64 = pairs.iter().map(|&(r, c)| cost[r * cols + c]).sum();
            let best = brute_force(&cost, rows, cols);
            prop_assert!((total - best).abs() < 1e-9, "{} vs {}", total, best);
        }
    }

    #[test]
    fn hungarian_refuses_bad_matrices() {
        assert_eq!(hungarian(&[1.0, 2.0], 2, 2), None);
        assert_eq!(hungarian(&[1.0, f64::NAN], 1, 2), None);
        assert_eq!(hungarian(&[f64::INFINITY], 1, 1), None);
        assert_eq!(hungarian(&[], 0, 3), Some(vec![]));
        // A 1x3 row takes its cheapest column; a 3x1 column its cheapest row.
        assert_eq!(hungarian(&[3.0, 1.0, 2.0], 1, 3), Some(vec![(0, 1)]));
        assert_eq!(hungarian(&[3.0, 1.0, 2.0], 3, 1), Some(vec![(1, 0)]));
    }

    #[test]
    fn node_rewards_by_hand() {
        let (g, p) = (gt(), pred("dog", "riding", "wearing"));
        // Costs of the matching pairs (pred, gt):
        //   man-man:  0 + 2(1-1) + 5*0 = 0
        //   dog-horse: sem 1(1-0) = 1; IoU .2/.25 = .8, enclosing = horse box,
        //     GIoU .8: 2(.2) = .4; L1 .1: 5(.1) = .5; total 1.9
        //   hat-hat: sem 0; IoU 0, union .04, enclosing [0,0,.7,.1] = .07,
        //     GIoU -3/7: 2(10/7); L1 .5+.5 = 1: 5; total 7.857
        // Any other assignment costs more (e.g. man-hat 6.34 + hat-man 8.96).
        let matches = match_objects(&p, &g, &ExactMatch, &MatchCost::default());
        let pairs: Vec<(usize, usize)> = matches.iter().map(|m| (m.pred, m.gt)).collect();
        assert_eq!(pairs, vec![(0, 0), (1, 1), (2, 2)]);
        let (acc, boxes) = node_rewards(&p, &g, &ExactMatch, &MatchCost::default());
        // node_acc = (1 + 0 + 1) / 3.
        close(acc, 2.0 / 3.0);
        // node_box = [(2*1 + 5 e^0) + (2*.8 + 5 e^-.1) + (2*0 + 5 e^-1)] / 7 / 3.
        let want = ((2.0 + 5.0) + (1.6 + 5.0 * (-0.1f64).exp()) + 5.0 * (-1.0f64).exp()) / 7.0 / 3.0;
        close(boxes, want);
        // Fewer predictions than GT: unmatched GT objects earn 0, the
        // divisor stays |GT| = 3: node_acc = 1/3, node_box = 1/3.
        let only_man = SceneGraph {
            objects: vec![p.objects[0].clone()],
            relations: vec![],
        };
        let (acc, boxes) = node_rewards(&only_man, &g, &ExactMatch, &MatchCost::default());
        close(acc, 1.0 / 3.0);
        close(boxes, 1.0 / 3.0);
        // More predictions than GT: each GT object takes its best; extra
        // predictions are ignored. Prediction = GT plus a stray box.
        let mut extra = g.clone();
        extra.objects.insert(0, obj("man.9", [0.6, 0.0, 0.9, 0.3]));
        let (acc, boxes) = node_rewards(&extra, &g, &ExactMatch, &MatchCost::default());
        close(acc, 1.0);
        close(boxes, 1.0);
        // No GT objects: nothing to match, divisor 1.
        assert_eq!(
            node_rewards(&g, &SceneGraph::default(), &ExactMatch, &MatchCost::default()),
            (0.0, 0.0)
        );
    }

    #[test]
    fn hard_recall_by_hand() {
        let cost = MatchCost::default();
        let g = gt();
        let hard = |p: &SceneGraph| edge_reward(EdgeReward::HardRecall, p, &g, &ExactMatch, &cost);
        // riding: same labels, IoU 1 and .8: hit. wearing: hat IoU 0: miss.
        // 1 of 2 GT triplets: 1/2.
        close(hard(&pred("horse", "riding", "wearing")), 0.5);
        // Wrong predicate or wrong category: no hits.
        close(hard(&pred("horse", "near", "wearing")), 0.0);
        close(hard(&pred("dog", "riding", "wearing")), 0.0);
        // Labels compare normalized.
        close(hard(&pred("Horse", "Riding", "wearing")), 0.5);
        // The hat moved onto the GT hat: both hit, 2/2.
        let mut p = pred("horse", "riding", "wearing");
        p.objects[2].bbox = [0.0, 0.0, 0.2, 0.1];
        close(hard(&p), 1.0);
        // IoU exactly 0.5 passes: the horse halved to [.5,.5,1,.75] has
        // area .125 inside the GT's .25. A hair less fails.
        p.objects[1].bbox = [0.5, 0.5, 1.0, 0.75];
        close(hard(&p), 1.0);
        p.objects[1].bbox = [0.5, 0.5, 1.0, 0.7499];
        close(hard(&p), 0.5);
        p.objects[1].bbox = [0.5, 0.5, 1.0, 0.75];
        // The same on the subject side: the man halved to [0,0,.5,.25].
        p.objects[0].bbox = [0.0, 0.0, 0.5, 0.25];
        close(hard(&p), 1.0);
        p.objects[0].bbox = [0.0, 0.0, 0.5, 0.2499];
        close(hard(&p), 0.0);
        p.objects[0].bbox = [0.0, 0.0, 0.5, 0.5];
        // Duplicating a hit does not count it twice.
        p.relations.push(p.relations[0].clone());
        close(hard(&p), 1.0);
        // A GT without relations gives 0 (divisor 1).
        let mut no_rels = g.clone();
        no_rels.relations.clear();
        close(
            edge_reward(EdgeReward::HardRecall, &p, &no_rels, &ExactMatch, &cost),
            0.0,
        );
    }

    #[test]
    fn hard_relax_by_hand() {
        let cost = MatchCost::default();
        let g = gt();
        let relax =
            |p: &SceneGraph, sim: &dyn LabelSimilarity| edge_reward(EdgeReward::HardRelax, p, &g, sim, &cost);
        // riding with a pony: boxes pass, sim 1 * .5 * 1 = .5; wearing: hat
        // fails IoU: 0. Sum .5 over 2 GT triplets: .25.
        close(relax(&pred("pony", "riding", "wearing"), &HalfPony), 0.25);
        // Exact labels: pony is 0 and so is the product.
        close(relax(&pred("pony", "riding", "wearing"), &ExactMatch), 0.0);
        // A synonym table makes pony a horse: 1/2.
        let table = SynonymTable::new(&[&["horse", "pony"]]);
        close(relax(&pred("pony", "riding", "wearing"), &table), 0.5);
        // The best candidate counts: add "man.1 riding horse.2" (a second
        // horse at the same box): max(.5, 1) = 1, so 1/2.
        let mut p = pred("pony", "riding", "wearing");
        p.objects.push(obj("horse.4", [0.5, 0.5, 1.0, 0.9]));
        p.relations.push(Relation::new("man.1", "riding", "horse.4"));
        close(relax(&p, &HalfPony), 0.5);
    }

    #[test]
    fn soft_recall_by_hand() {
        let cost = MatchCost::default();
        let g = gt();
        // Matching is the diagonal (see node_rewards_by_hand; with the pony
        // at sim .5 the pony-horse cost is 1.4, still the cheapest).
        // riding: 1 * .5 * 1 = .5; wearing: the hat is matched despite IoU
        // 0, so 1 * 1 * 1 = 1. Sum 1.5 over 2: .75.
        let p = pred("pony", "riding", "wearing");
        close(edge_reward(EdgeReward::Soft, &p, &g, &HalfPony, &cost), 0.75);
        // A wrong predicate on the matched pair contributes 0: (.5 + 0)/2.
        let p = pred("pony", "riding", "holding");
        close(edge_reward(EdgeReward::Soft, &p, &g, &HalfPony, &cost), 0.25);
        // Relations between unmatched pairs count nothing: reversed edge.
        let mut p = pred("horse", "riding", "wearing");
        p.relations = vec![Relation::new("horse.2", "riding", "man.1")];
        close(edge_reward(EdgeReward::Soft, &p, &g, &ExactMatch, &cost), 0.0);
    }

    #[test]
    fn weighted_scores_by_hand() {
        let cfg = RewardConfig::default();
        let g = gt();
        // A perfect strict answer: 1 + 2 + 2 + 5 = 10.
        let perfect = score_text(&answer_text(&g, Some("ok")), &g, &cfg, &ExactMatch);
        assert_eq!(perfect.format, 1.0);
        close(perfect.total(), cfg.weights.max_total());
        close(perfect.total(), 10.0);
        // Relaxed text under the strict form: format 0, the rest intact: 9.
        let relaxed = score_text(&answer_text(&g, None), &g, &cfg, &ExactMatch);
        assert_eq!(relaxed.format, 0.0);
        close(relaxed.total(), 9.0);
        let relaxed_cfg = RewardConfig {
            form: AnswerForm::Relaxed,
            ..cfg
        };
        close(
            score_text(&answer_text(&g, None), &g, &relaxed_cfg, &ExactMatch).total(),
            10.0,
        );
        // An augmented (shuffled, renumbered) answer is just as good.
        let shuffled = score_text(&answer_text(&augment(&g, 5), Some("ok")), &g, &cfg, &ExactMatch);
        close(shuffled.total(), 10.0);
        // The hand-computed prediction: format 1, node_acc 2 * 2/3,
        // node_box 2 * (see node_rewards_by_hand), hard recall 5 * 1/2.
        let p = pred("dog", "riding", "wearing");
        let r = score_text(&answer_text(&p, Some("x")), &g, &cfg, &ExactMatch);
        let (_, boxes) = node_rewards(&p, &g, &ExactMatch, &cfg.cost);
        close(r.format, 1.0);
        close(r.node_acc, 4.0 / 3.0);
        // Boxes go through the 0..1000 integers exactly for these values.
        close(r.node_box, 2.0 * boxes);
        close(r.edge, 0.0); // dog is not a horse
                            // Turning rewards off.
        let only_edge = RewardConfig {
            weights: RewardWeights {
                format: 0.0,
                node: 0.0,
                edge: 5.0,
            },
            ..cfg
        };
        let p = pred("horse", "riding", "wearing");
        let r = score_text(&answer_text(&p, Some("x")), &g, &only_edge, &ExactMatch);
        assert_eq!((r.format, r.node_acc, r.node_box), (0.0, 0.0, 0.0));
        close(r.edge, 2.5);
    }

    #[test]
    fn format_failures_score_as_documented() {
        let cfg = RewardConfig::default();
        let g = gt();
        // Unparseable: everything 0.
        assert_eq!(
            score_text("<think>x</think><answer>{</answer>", &g, &cfg, &ExactMatch),
            Rewards::default()
        );
        // Empty graph: format 0 (not the public code's 1), nothing matched.
        let empty = score_text(
            r#"<think>x</think><answer>{"objects":[],"relationships":[]}</answer>"#,
            &g,
            &cfg,
            &ExactMatch,
        );
        assert_eq!(empty, Rewards::default());
        // A relation naming an undefined object: format 0, the relation
        // counts nothing, the objects still earn node rewards (2 + 2).
        let mut dangling = g.clone();
        dangling.relations = vec![
            Relation::new("man.1", "riding", "horse.7"),
            Relation::new("man.1", "wearing", "hat.3"),
        ];
        let r = score_text(&answer_text(&dangling, Some("x")), &g, &cfg, &ExactMatch);
        assert_eq!(r.format, 0.0);
        close(r.node_acc + r.node_box, 4.0);
        close(r.edge, 2.5); // wearing only: 5 * 1/2
    }

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
    fn relative_gain_by_hand() {
        // Means 0.5 -> 0.75: r = 1.5; z = (a - 1.5 b) / 0.5 = -1, 2, -1, 0;
        // se^2 = (1 + 4 + 1) / (4 * 3) = 0.5.
        let g = RelativeGain::paired(&[1.0, 0.0, 1.0, 0.0], &[1.0, 1.0, 1.0, 0.0]).unwrap();
        close(g.gain, 0.5);
        close(g.half_width, 1.96 * 0.5f64.sqrt());
        // Identical evaluations: no change, no spread.
        let same = RelativeGain::paired(&[0.2, 0.5, 0.0], &[0.2, 0.5, 0.0]).unwrap();
        assert_eq!((same.gain, same.half_width), (0.0, 0.0));
        for (before, after) in [
            (&[1.0, 0.0][..], &[1.0][..]),
            (&[1.0][..], &[1.0][..]),
            (&[0.0, 0.0][..], &[1.0, 0.0][..]),
            (&[f64::NAN, 1.0][..], &[1.0, 0.0][..]),
            (&[][..], &[][..]),
        ] {
            assert_eq!(
                RelativeGain::paired(before, after),
                None,
                "{before:?} -> {after:?}"
            );
        }
    }

    /// The delta-method interval against a percentile bootstrap (plain f64,
    /// resampling images with replacement) on recall-like data: mostly 0,
    /// correlated between the two evaluations.
    #[test]
    fn relative_gain_interval_agrees_with_a_bootstrap() {
        let mut rng = Rng::new(7);
        let levels = [0.0, 1.0 / 3.0, 0.5, 1.0];
        let n = 777;
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let b = if rng.uniform() < 0.15 {
                levels[1 + rng.below(3)]
            } else {
                0.0
            };
            let a = if rng.uniform() < 0.7 {
                b
            } else if rng.uniform() < 0.2 {
                levels[1 + rng.below(3)]
            } else {
                0.0
            };
            before.push(b);
            after.push(a);
        }
        let g = RelativeGain::paired(&before, &after).unwrap();
        let ratio = after.iter().sum::<f64>() / before.iter().sum::<f64>();
        close(g.gain, ratio - 1.0);
        let mut gains: Vec<f64> = (0..4000)
            .map(|_| {
                let (mut sb, mut sa) = (0.0, 0.0);
                for _ in 0..n {
                    let i = rng.below(n);
                    sb += before[i];
                    sa += after[i];
                }
                sa / sb - 1.0
            })
            .collect();
        gains.sort_by(f64::total_cmp);
        let (lo, hi) = (gains[100], gains[3899]);
        let boot_half = (hi - lo) / 2.0;
        assert!(
            (g.half_width / boot_half - 1.0).abs() < 0.15,
            "delta method +-{:.4}, bootstrap +-{boot_half:.4}",
            g.half_width
        );
        assert!(
            g.half_width > 0.02,
            "a spread this data must show: {}",
            g.half_width
        );
    }

    fn assert_bounded(r: &Rewards, w: &RewardWeights) {
        for (v, max) in [
            (r.format, w.format),
            (r.node_acc, w.node),
            (r.node_box, w.node),
            (r.edge, w.edge),
        ] {
            assert!(v.is_finite() && (0.0..=max + 1e-9).contains(&v), "{r:?}");
        }
    }

    /// Any text, mostly near a valid answer, for every edge reward.
    fn check_any(text: &str) {
        let g = gt();
        for edge in [EdgeReward::HardRecall, EdgeReward::HardRelax, EdgeReward::Soft] {
            for form in [AnswerForm::Strict, AnswerForm::Relaxed] {
                let cfg = RewardConfig {
                    edge,
                    form,
                    ..RewardConfig::default()
                };
                assert_bounded(&score_text(text, &g, &cfg, &HalfPony), &cfg.weights);
            }
        }
        let mut ev = Evaluator::default();
        ev.add_parsed(&parse_answer(text, AnswerForm::Strict), &g);
        let s = ev.summary();
        assert!(s
            .recall
            .iter()
            .chain(&s.mean_recall)
            .all(|(_, r)| (0.0..=1.0).contains(r)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn rewards_bounded_on_strings(s in ".*") {
            check_any(&s);
        }

        #[test]
        fn rewards_bounded_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            check_any(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn rewards_bounded_on_edited_answers(
            cut in 0usize..400,
            insert in ".{0,6}",
            number in prop::sample::select(vec!["1e308", "-1e308", "NaN", "-5", "1e400", "123456789012345678901234567890", "0.5"]),
        ) {
            let text = answer_text(&pred("pony", "riding", "wearing"), Some("t"));
            let cut = cut.min(text.len());
            // Insert at a char boundary, truncate, and replace a number.
            let at = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            check_any(&format!("{}{insert}{}", &text[..at], &text[at..]));
            check_any(&text[..at]);
            check_any(&text.replacen("500", number, 1));
            check_any(&graph_json(&gt()).replacen("1000", number, 2));
        }

        #[test]
        fn random_graphs_score_within_bounds(seed in any::<u64>()) {
            // Random predicted graphs (boxes anywhere, sizes 0..6) against
            // random ground truths: every reward stays in its range.
            let mut rng = crate::scene::Rng::new(seed);
            let graph = |rng: &mut crate::scene::Rng| {
                let n = rng.below(6);
                let labels = ["man", "horse", "pony", "hat"];
                let objects: Vec<Object> = (0..n)
                    .map(|i| {
                        let (x, y) = (rng.uniform(), rng.uniform());
                        obj(&format!("{}.{}", labels[rng.below(4)], i + 1), [x, y, (x + rng.uniform()).min(1.0), (y + rng.uniform()).min(1.0)])
                    })
                    .collect();
                let relations = (0..if n > 0 { rng.below(8) } else { 0 })
                    .map(|_| {
                        let (s, o) = (rng.below(n), rng.below(n));
                        Relation::new(&objects[s].id, ["on", "riding"][rng.below(2)], &objects[o].id)
                    })
                    .collect();
                SceneGraph { objects, relations }
            };
            let (p, g) = (graph(&mut rng), graph(&mut rng));
            for edge in [EdgeReward::HardRecall, EdgeReward::HardRelax, EdgeReward::Soft] {
                let cfg = RewardConfig { edge, ..RewardConfig::default() };
                let parsed = ParsedAnswer { graph: Some(p.clone()), format: Ok(()) };
                assert_bounded(&score(&parsed, &g, &cfg, &HalfPony), &cfg.weights);
            }
            // A graph scored against itself is perfect on node rewards.
            if !g.objects.is_empty() {
                let (acc, boxes) = node_rewards(&g, &g, &ExactMatch, &MatchCost::default());
                prop_assert!((acc - 1.0).abs() < TOL && (boxes - 1.0).abs() < TOL);
            }
        }
    }
}
