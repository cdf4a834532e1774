//! R1-SGG's own evaluation, reproduced: the numbers of its Table 1 come from
//! `src/sgg_gather_preds.py` (answers to predictions) and `src/vg150_eval.py`
//! with `src/utils/sgg_eval.py` / `sgg_metrics.py` (`SggEvaluator`, mode
//! `sgdet`), gpt4vision/R1-SGG at e4de64d. Use it to set results beside the
//! paper's; [`crate::eval::Evaluator`] is this crate's stricter evaluation
//! (below, *how they differ*).
//!
//! **Per image** ([`R1SggEval::gather`], `sgg_gather_preds.py` `main`): the
//! answer's JSON is found by `extract_answer_content` (every ```` ``` ```` and
//! every `json` replaced by a space, then the text between `<answer>` and
//! `</answer>`, or after `<answer>`, or all of it) and read with `json.loads`;
//! it must be an object with `objects` (each with a 4-number `bbox` and a
//! string `id`) and `relationships` (each with string `subject`,
//! `predicate`, `object`), else the image is a *failure*. Ids and labels are
//! cleaned by `refine_node_edge` ([`normalize_label`]); boxes are scaled
//! from `box_scale` units to the image's pixels. An object's category (the
//! id before the first `.`) outside the vocabulary is mapped through
//! R1-SGG's synonym lists and WordNet (`synonyms.rs`); objects still outside
//! are dropped. A relation is kept when its endpoints name kept objects (by
//! cleaned id, the first with that id) and its predicate, after
//! `pass2act_list` (`worn by` becomes `wearing`, subject and object swapped)
//! and the synonym lists and WordNet, is one of the dataset's.
//!
//! **Recall** (`SGRecall.calculate_recall`, `_compute_pred_matches`): a GT
//! triplet is hit by one of the first K kept relations, in the answer's
//! order, with the same subject class, predicate and object class and both
//! boxes at IoU >= 0.5, IoU computed in f32 on pixel boxes with the +1-pixel
//! convention (`bounding_box.py`, `boxlist_iou`):
//! `area = (x2 - x1 + 1)(y2 - y1 + 1)`, `inter = max(0, min x2 - max x1 + 1)
//! max(0, min y2 - max y1 + 1)`, `IoU = inter / (area_a + area_b - inter)`.
//! R@K is the mean over the *counted* images of `hits / |GT triplets|`. An
//! image is counted when it has GT triplets and either kept relations or
//! none of its answer's objects kept (a failure, or no object in the
//! vocabulary: R1-SGG pads those with a dummy triplet that hits nothing);
//! an answer whose objects were kept but none of its relations is left out
//! (`evaluate_relation_of_one_image` returns early on no predicted pairs).
//! mR@K (`SGMeanRecall`): for each predicate, the mean over the counted
//! images holding it of its recall there; then the mean over all of the
//! dataset's predicates (50 or 56), those absent counting 0.
//!
//! **Triplet recall** (`vg150_eval.py`'s own loop): over every image and
//! every GT triplet, whether any kept relation has its predicate and
//! categories with both boxes at IoU >= 0.5 (f64, no +1), no K; the
//! fraction of GT triplets hit, and its mean over the predicates present.
//!
//! **How they differ from [`crate::eval::Evaluator`]**, which is stricter:
//! ours counts every image with GT triplets in R@K, ranks every relation
//! written (labels outside the vocabulary use up K), resolves relation
//! endpoints by the id as written, compares labels without synonyms, takes
//! IoU on normalized boxes without the +1 pixel, and divides mR@K by the
//! predicates present. On the same predictions R1-SGG's numbers are higher.
//!
//! **Where this departs from R1-SGG**, in inputs its code accepts and ours
//! cannot read the same way: JSON that only Python's `json.loads` reads
//! (`NaN`, `Infinity`, numbers beyond f64, unpaired surrogate escapes,
//! nesting deeper than 128) is a failure here; and a padded image's dummy
//! box, uninitialized memory in R1-SGG (`torch.empty`), hits nothing here
//! (for PSG its dummy class is `person`, which R1-SGG could in principle
//! match by chance).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::Value;

use crate::data::scene::{is_python_space, normalize_label};

pub mod records;
mod synonyms;

use synonyms::{Synonyms, TargetSet};

pub use records::{Record, RecordError};

/// The K of R@K and mR@K, as `SGRecall` registers them.
pub const KS: [usize; 3] = [20, 50, 100];

/// IoU threshold of a hit (`SggEvaluator`'s `iou_thres`).
const IOU_THRESHOLD: f64 = 0.5;

/// The dataset whose vocabulary and label maps the evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    /// VG150: 150 object classes, 50 predicates.
    Vg150,
    /// PSG: 133 object classes, 56 predicates.
    Psg,
}

impl Dataset {
    /// The R1-SGG dataset of `vocab`, if it is one of them.
    pub fn of(vocab: &crate::data::scene::Vocabulary) -> Option<Self> {
        use crate::data::scene::{PSG, VG150};
        match *vocab {
            v if v == VG150 => Some(Dataset::Vg150),
            v if v == PSG => Some(Dataset::Psg),
            _ => None,
        }
    }
}

/// Why an image cannot be evaluated: a ground truth R1-SGG's code could not
/// read either (it raises; its datasets never hold one), or a
/// [`Prediction`] whose indices do not fit together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("image {image_id}: {reason}")]
pub struct ImageError {
    /// The record's image id.
    pub image_id: String,
    /// What is wrong, naming the ground truth or the prediction.
    pub reason: String,
}

/// What `sgg_gather_preds.py` makes of one answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Gathered {
    /// No graph could be read (counted in the failure rate); the reason.
    Failed(String),
    /// The graph, restricted to the dataset's vocabulary (possibly with no
    /// object: R1-SGG then pads the image as it pads a failure).
    Graph(Prediction),
}

/// A prediction as `sgg_gather_preds.py` writes it to `sgg_pred_results.json`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prediction {
    /// Kept objects' cleaned ids, in the answer's order.
    pub names: Vec<String>,
    /// Their categories after the synonym maps (`names_target`).
    pub categories: Vec<String>,
    /// Their class indices (`labels`).
    pub labels: Vec<usize>,
    /// Their boxes in pixels, `xyxy` (`boxes`).
    pub boxes: Vec<[f64; 4]>,
    /// Kept relations in the answer's order: `(subject, object, predicate
    /// index)`, objects as indices into the above (`all_node_pairs`,
    /// `all_relation`).
    pub relations: Vec<(usize, usize, usize)>,
}

/// A ground truth as R1-SGG's `MyDataset` and `vg150_eval.py` read it.
#[derive(Debug, Clone)]
struct Truth {
    labels: Vec<usize>,
    /// f32, as `BoxList` holds them.
    boxes: Vec<[f32; 4]>,
    /// `(subject, object, predicate index)`.
    edges: Vec<(usize, usize, usize)>,
    /// The same edges as the triplet-recall loop reads them.
    triplets: Vec<GtTriplet>,
}

/// A GT triplet for `vg150_eval.py`'s loop: cleaned categories and
/// predicate, boxes as Python numbers (of the last object with the cleaned id).
#[derive(Debug, Clone)]
struct GtTriplet {
    subject: String,
    subject_box: [f64; 4],
    object: String,
    object_box: [f64; 4],
    predicate: String,
}

/// One image's scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageScore {
    /// The record's image id.
    pub image_id: String,
    /// Why the answer could not be read, if it could not.
    pub failure: Option<String>,
    /// Kept objects and kept relations.
    pub kept: (usize, usize),
    /// GT triplets.
    pub gt_triplets: usize,
    /// R@20, R@50, R@100 of this image when it is counted in R@K.
    pub recall: Option<[f64; 3]>,
    /// GT triplets the triplet-recall loop hits.
    pub triplet_hits: usize,
}

/// Metrics over every image, as R1-SGG prints them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct R1SggSummary {
    /// Images (records).
    pub images: usize,
    /// Answers with no readable graph (`fails[0]`).
    pub failures: usize,
    /// `failures / images`.
    pub failure_rate: f64,
    /// Images counted in R@K and mR@K.
    pub recall_images: usize,
    /// `(K, R@K)`; 0 when no image is counted (R1-SGG: NaN).
    pub recall: Vec<(usize, f64)>,
    /// `(K, mR@K)`.
    pub mean_recall: Vec<(usize, f64)>,
    /// Each of the dataset's predicates, in its order, with its recall at
    /// each K (0 where no counted image holds it, as in mR@K).
    pub per_predicate: Vec<(String, Vec<f64>)>,
    /// `vg150_eval.py`'s "whole ngR": GT triplets hit / GT triplets.
    pub triplet_recall: f64,
    /// Its "whole mean of ngR": the mean over the predicates present of
    /// their hit fraction (R1-SGG prints each rounded to 4 decimals first).
    pub triplet_mean_recall: f64,
}

/// R1-SGG's evaluation over one dataset's vocabulary.
#[derive(Debug)]
pub struct R1SggEval {
    dataset: Dataset,
    synonyms: &'static Synonyms,
    /// `target_objects`: the labels an object category is not mapped from.
    target_objects: Vec<String>,
    /// `NAME2CAT`: category -> class index, as gather keeps objects.
    name_to_class: HashMap<String, usize>,
    /// `MyDataset.name2classes`: the ground truth's raw category -> class.
    gt_classes: HashMap<String, usize>,
    /// `target_predicates`: `__background__` then the dataset's predicates.
    predicates: Vec<String>,
    per_image: Vec<ImageScore>,
    /// Per K, the recall of each counted image.
    recall: Vec<Vec<f64>>,
    /// Per K, per predicate index, the recall of each counted image holding it.
    predicate_recall: Vec<Vec<Vec<f64>>>,
    /// Per cleaned GT predicate: (hits, triplets) of the triplet-recall loop.
    triplet_by_predicate: BTreeMap<String, (usize, usize)>,
}

impl R1SggEval {
    /// An empty evaluation over `dataset`'s vocabulary.
    pub fn new(dataset: Dataset) -> Self {
        let synonyms = Synonyms::get();
        let (target_objects, name_to_class, gt_classes, predicates) = match dataset {
            Dataset::Vg150 => {
                let lists = synonyms.vg150();
                let classes: HashMap<String, usize> = lists
                    .objects
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| *n != "__background__")
                    .map(|(i, n)| (n.clone(), i))
                    .collect();
                (
                    lists.objects[1..].to_vec(),
                    classes.clone(),
                    classes,
                    lists.predicates.clone(),
                )
            }
            Dataset::Psg => {
                let lists = synonyms.psg();
                // gather keeps PSG objects by their cleaned names ("door stuff"),
                // MyDataset reads the ground truth's raw ones ("door-stuff").
                let index = |clean: bool| {
                    lists
                        .objects
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (if clean { normalize_label(n) } else { n.clone() }, i))
                        .collect()
                };
                let mut predicates = vec!["__background__".to_string()];
                predicates.extend(lists.predicates.iter().cloned());
                // R1-SGG's `target_objects = PSG_PREDICATES` (sic): every PSG
                // object category goes through the maps, against the predicates.
                (lists.predicates.clone(), index(true), index(false), predicates)
            }
        };
        let n = predicates.len();
        Self {
            dataset,
            synonyms,
            target_objects,
            name_to_class,
            gt_classes,
            predicates,
            per_image: Vec::new(),
            recall: vec![Vec::new(); KS.len()],
            predicate_recall: vec![vec![Vec::new(); n]; KS.len()],
            triplet_by_predicate: BTreeMap::new(),
        }
    }

    /// R1-SGG's commit, NLTK's version and WordNet's, whose label maps
    /// this evaluation uses (`assets/r1_sgg/synonyms.json`).
    pub fn provenance(&self) -> (&str, &str, &str) {
        self.synonyms.versions()
    }

    /// The dataset evaluated.
    pub fn dataset(&self) -> Dataset {
        self.dataset
    }

    /// The dataset's predicates, `__background__` first (`target_predicates`).
    pub fn predicates(&self) -> &[String] {
        &self.predicates
    }

    /// One answer as `sgg_gather_preds.py` reads it (see the module docs):
    /// `box_scale` the units of the answer's boxes (Qwen2-VL: 1000 x 1000),
    /// `size` the image's width and height in pixels.
    pub fn gather(&self, response: &str, box_scale: [f64; 2], size: (f64, f64)) -> Gathered {
        let parsed = match read_answer(response) {
            Ok(p) => p,
            Err(reason) => return Gathered::Failed(reason),
        };
        // scale_factors = (iw / box_scale[0], ih / box_scale[1])
        let (sw, sh) = (size.0 / box_scale[0], size.1 / box_scale[1]);
        let mut pred = Prediction::default();
        for (id, b) in parsed.objects {
            let category = id.split('.').next().unwrap_or_default();
            let category = self.map_object(category);
            if let Some(&class) = self.name_to_class.get(category) {
                pred.categories.push(category.to_string());
                pred.labels.push(class);
                pred.boxes.push([b[0] * sw, b[1] * sh, b[2] * sw, b[3] * sh]);
                pred.names.push(id);
            }
        }
        if pred.names.is_empty() {
            return Gathered::Graph(pred);
        }
        for (subject, predicate, object) in parsed.relations {
            let (mut subject, mut object, mut predicate) =
                (subject.as_str(), object.as_str(), predicate.as_str());
            if !self.is_predicate(predicate) {
                if let Some((target, swap)) = self.synonyms.passive().get(predicate) {
                    predicate = target;
                    if *swap {
                        std::mem::swap(&mut subject, &mut object);
                    }
                }
            }
            let first = |name: &str| pred.names.iter().position(|n| n == name);
            let (Some(s), Some(o)) = (first(subject), first(object)) else {
                continue;
            };
            let predicate = self.map_predicate(predicate);
            if let Some(p) = self.predicates.iter().position(|q| q == predicate) {
                pred.relations.push((s, o, p));
            }
        }
        Gathered::Graph(pred)
    }

    fn is_predicate(&self, label: &str) -> bool {
        self.predicates.iter().any(|p| p == label)
    }

    /// An object category after gather's maps: unchanged when it is one of
    /// `target_objects`, else the synonym list's target, else WordNet's,
    /// else unchanged.
    fn map_object<'a>(&'a self, category: &'a str) -> &'a str {
        if self.target_objects.iter().any(|t| t == category) {
            return category;
        }
        let set = match self.dataset {
            Dataset::Vg150 => TargetSet::Vg150Objects,
            Dataset::Psg => TargetSet::PsgPredicates,
        };
        match self.synonyms.objects(self.dataset == Dataset::Psg).get(category) {
            Some(target) => target,
            None => self.synonyms.find(set, category).unwrap_or(category),
        }
    }

    /// A predicate after gather's maps (`rel2vg_list`, then WordNet against
    /// `target_predicates[1:]`).
    fn map_predicate<'a>(&'a self, predicate: &'a str) -> &'a str {
        if self.is_predicate(predicate) {
            return predicate;
        }
        let psg = self.dataset == Dataset::Psg;
        if let Some(target) = self.synonyms.relations(psg).and_then(|m| m.get(predicate)) {
            return target;
        }
        let set = if psg {
            TargetSet::PsgPredicates
        } else {
            TargetSet::Vg150Predicates
        };
        self.synonyms.find(set, predicate).unwrap_or(predicate)
    }

    /// Reads a record's ground truth as `MyDataset` does: categories must
    /// be the dataset's classes as written, relations must name objects by
    /// id and use the dataset's predicates.
    fn truth(&self, image_id: &str, objects: &Value, relations: &Value) -> Result<Truth, ImageError> {
        let bad = |reason: String| ImageError {
            image_id: image_id.to_string(),
            reason: format!("ground truth {reason}"),
        };
        let objects = json_list(objects).map_err(|e| bad(format!("objects: {e}")))?;
        let relations = json_list(relations).map_err(|e| bad(format!("relationships: {e}")))?;
        let mut names = Vec::new();
        let mut truth = Truth {
            labels: Vec::new(),
            boxes: Vec::new(),
            edges: Vec::new(),
            triplets: Vec::new(),
        };
        // vg150_eval.py's loop looks boxes up by cleaned id, the last one written.
        let mut clean_boxes: HashMap<String, [f64; 4]> = HashMap::new();
        for (i, o) in objects.iter().enumerate() {
            let id = o.get("id").and_then(Value::as_str);
            let bbox = o
                .get("bbox")
                .and_then(Value::as_array)
                .map(|b| b.iter().map(py_number).collect::<Option<Vec<f64>>>());
            let (Some(id), Some(Some(b))) = (id, bbox) else {
                return Err(bad(format!(
                    "objects[{i}] needs a string id and a bbox of numbers"
                )));
            };
            let &[x1, y1, x2, y2] = b.as_slice() else {
                return Err(bad(format!("objects[{i}] has a bbox of {} numbers", b.len())));
            };
            let category = id.split('.').next().unwrap_or_default();
            let class = *self
                .gt_classes
                .get(category)
                .ok_or_else(|| bad(format!("category {category:?} is not one of the dataset's")))?;
            names.push(id);
            truth.labels.push(class);
            truth.boxes.push([x1 as f32, y1 as f32, x2 as f32, y2 as f32]);
            clean_boxes.insert(normalize_label(id), [x1, y1, x2, y2]);
        }
        for (i, r) in relations.iter().enumerate() {
            let field = |k: &str| r.get(k).and_then(Value::as_str);
            let (Some(s), Some(p), Some(o)) = (field("subject"), field("predicate"), field("object")) else {
                return Err(bad(format!(
                    "relationships[{i}] needs string subject, predicate, object"
                )));
            };
            let index = |id: &str| {
                names
                    .iter()
                    .position(|n| *n == id)
                    .ok_or_else(|| bad(format!("relationships[{i}] names the undefined object {id:?}")))
            };
            let predicate = self
                .predicates
                .iter()
                .position(|q| q == p)
                .filter(|&k| k > 0)
                .ok_or_else(|| bad(format!("predicate {p:?} is not one of the dataset's")))?;
            truth.edges.push((index(s)?, index(o)?, predicate));
            let (s, o) = (normalize_label(s), normalize_label(o));
            let (Some(&sb), Some(&ob)) = (clean_boxes.get(&s), clean_boxes.get(&o)) else {
                return Err(bad(format!("relationships[{i}]: no object with the cleaned id")));
            };
            truth.triplets.push(GtTriplet {
                subject: category_part(&s),
                subject_box: sb,
                object: category_part(&o),
                object_box: ob,
                predicate: normalize_label(p),
            });
        }
        Ok(truth)
    }

    /// Scores one image: its answer as [`gather`](Self::gather) reads it,
    /// against its ground truth (`objects` and `relationships` as R1-SGG's
    /// datasets hold them: JSON lists, or strings holding them, boxes in
    /// pixels). Returns the image's scores, also kept for the summary.
    pub fn add(
        &mut self,
        image_id: &str,
        gathered: &Gathered,
        gt_objects: &Value,
        gt_relationships: &Value,
    ) -> Result<&ImageScore, ImageError> {
        let truth = self.truth(image_id, gt_objects, gt_relationships)?;
        let empty = Prediction::default();
        let (pred, failure) = match gathered {
            Gathered::Failed(reason) => (&empty, Some(reason.clone())),
            Gathered::Graph(p) => (p, None),
        };
        // A prediction built by hand or read from a file must index itself.
        let n = pred.names.len();
        let fits = pred.categories.len() == n
            && pred.labels.len() == n
            && pred.boxes.len() == n
            && pred
                .relations
                .iter()
                .all(|&(s, o, p)| s < n && o < n && p < self.predicates.len());
        if !fits {
            return Err(ImageError {
                image_id: image_id.to_string(),
                reason: "prediction: its lists differ in length or a relation indexes outside them".into(),
            });
        }
        // R1-SGG pads an image without kept objects with one dummy pair
        // (class 0, uninitialized box) that hits nothing, so it counts as 0;
        // one with objects but no kept relation returns early, uncounted.
        let padded = pred.names.is_empty();
        let counted = !truth.edges.is_empty() && (padded || !pred.relations.is_empty());
        let recall = counted.then(|| self.add_recall(&truth, pred));
        let triplet_hits = self.add_triplets(&truth, pred);
        self.per_image.push(ImageScore {
            image_id: image_id.to_string(),
            failure,
            kept: (pred.names.len(), pred.relations.len()),
            gt_triplets: truth.edges.len(),
            recall,
            triplet_hits,
        });
        Ok(self.per_image.last().expect("just pushed"))
    }

    /// `SGRecall` and `SGMeanRecall` on one counted image.
    fn add_recall(&mut self, truth: &Truth, pred: &Prediction) -> [f64; 3] {
        // _compute_pred_matches: per prediction, the GT triplets it hits.
        let hits: Vec<Vec<usize>> = pred
            .relations
            .iter()
            .map(|&(s, o, p)| {
                // SGRecall takes argmax of the one-hot row past __background__.
                let p = p.max(1);
                truth
                    .edges
                    .iter()
                    .enumerate()
                    .filter(|(_, &(gs, go, gp))| {
                        truth.labels[gs] == pred.labels[s]
                            && gp == p
                            && truth.labels[go] == pred.labels[o]
                            && iou_plus_one(&truth.boxes[gs], &pred.boxes[s]) >= IOU_THRESHOLD
                            && iou_plus_one(&truth.boxes[go], &pred.boxes[o]) >= IOU_THRESHOLD
                    })
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let n = truth.edges.len();
        let mut out = [0.0; 3];
        for (k_index, &k) in KS.iter().enumerate() {
            let mut hit = vec![false; n];
            for i in hits.iter().take(k).flatten() {
                hit[*i] = true;
            }
            let recall = hit.iter().filter(|&&h| h).count() as f64 / n as f64;
            self.recall[k_index].push(recall);
            out[k_index] = recall;
            // Per predicate present: hits / count on this image.
            let mut count = vec![0usize; self.predicates.len()];
            let mut found = vec![0usize; self.predicates.len()];
            for (i, &(_, _, p)) in truth.edges.iter().enumerate() {
                count[p] += 1;
                found[p] += usize::from(hit[i]);
            }
            for p in 1..self.predicates.len() {
                if count[p] > 0 {
                    self.predicate_recall[k_index][p].push(found[p] as f64 / count[p] as f64);
                }
            }
        }
        out
    }

    /// `vg150_eval.py`'s own loop on one image: GT triplets hit by any kept
    /// relation (categories, predicate, both boxes at IoU >= 0.5 in f64).
    fn add_triplets(&mut self, truth: &Truth, pred: &Prediction) -> usize {
        let mut total = 0;
        for t in &truth.triplets {
            let hit = pred.relations.iter().any(|&(s, o, p)| {
                normalize_label(&self.predicates[p]) == t.predicate
                    && category_part(&normalize_label(&pred.categories[s])) == t.subject
                    && category_part(&normalize_label(&pred.categories[o])) == t.object
                    && iou_python(&t.subject_box, &pred.boxes[s]) >= IOU_THRESHOLD
                    && iou_python(&t.object_box, &pred.boxes[o]) >= IOU_THRESHOLD
            });
            let entry = self.triplet_by_predicate.entry(t.predicate.clone()).or_default();
            entry.0 += usize::from(hit);
            entry.1 += 1;
            total += usize::from(hit);
        }
        total
    }

    /// Every image added so far, in order.
    pub fn images(&self) -> &[ImageScore] {
        &self.per_image
    }

    /// The metrics so far (see [`R1SggSummary`]).
    pub fn summary(&self) -> R1SggSummary {
        let images = self.per_image.len();
        let failures = self.per_image.iter().filter(|i| i.failure.is_some()).count();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let named = self.predicates.len() - 1;
        let per_predicate: Vec<(String, Vec<f64>)> = (1..self.predicates.len())
            .map(|p| {
                let at_k = (0..KS.len())
                    .map(|k| mean(&self.predicate_recall[k][p]))
                    .collect();
                (self.predicates[p].clone(), at_k)
            })
            .collect();
        let (hits, triplets) = self
            .triplet_by_predicate
            .values()
            .fold((0, 0), |(h, t), &(a, b)| (h + a, t + b));
        let fractions: Vec<f64> = self
            .triplet_by_predicate
            .values()
            .map(|&(h, t)| h as f64 / t as f64)
            .collect();
        R1SggSummary {
            images,
            failures,
            failure_rate: failures as f64 / images.max(1) as f64,
            recall_images: self.recall[0].len(),
            recall: KS.iter().zip(&self.recall).map(|(&k, r)| (k, mean(r))).collect(),
            mean_recall: KS
                .iter()
                .enumerate()
                .map(|(k, &kk)| {
                    (
                        kk,
                        per_predicate.iter().map(|(_, r)| r[k]).sum::<f64>() / named as f64,
                    )
                })
                .collect(),
            per_predicate,
            triplet_recall: hits as f64 / triplets.max(1) as f64,
            triplet_mean_recall: mean(&fractions),
        }
    }
}

/// An answer's objects `(cleaned id, box)` and relations `(subject,
/// predicate, object)`, cleaned, as gather reads them; `Err` with the
/// reason where its `try` block raises.
struct Answer {
    objects: Vec<(String, [f64; 4])>,
    relations: Vec<(String, String, String)>,
}

fn read_answer(response: &str) -> Result<Answer, String> {
    let content = extract_answer_content(response);
    let value: Value = serde_json::from_str(&content).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(map) = &value else {
        return Err("the answer is not a JSON object".into());
    };
    let (Some(objects), Some(relations)) = (map.get("objects"), map.get("relationships")) else {
        return Err("no \"objects\" or no \"relationships\"".into());
    };
    let objects = py_items(objects, "objects")?
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            read_object(o)
                .ok_or_else(|| format!("objects[{i}] needs a string \"id\" and a \"bbox\" of 4 numbers"))
        })
        .collect::<Result<_, _>>()?;
    let relations = py_items(relations, "relationships")?
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let field = |k: &str| r.get(k).and_then(Value::as_str).map(normalize_label);
            match (field("subject"), field("predicate"), field("object")) {
                (Some(s), Some(p), Some(o)) => Ok((s, p, o)),
                _ => Err(format!(
                    "relationships[{i}] needs string \"subject\", \"predicate\", \"object\""
                )),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(Answer { objects, relations })
}

/// The items Python's `for x in value` gives, where gather's loop body can
/// take them: a list's items; nothing for an empty dict or string (their
/// keys and characters, strings, would raise in the body); `Err` otherwise.
fn py_items<'a>(value: &'a Value, key: &str) -> Result<Vec<&'a Value>, String> {
    match value {
        Value::Array(items) => Ok(items.iter().collect()),
        Value::Object(m) if m.is_empty() => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        _ => Err(format!("\"{key}\" is not a list")),
    }
}

/// An object dict with a string `id` and a `bbox` list of 4 numbers
/// (booleans are numbers to Python's `isinstance(e, (int, float))`).
fn read_object(o: &Value) -> Option<(String, [f64; 4])> {
    let b = o.get("bbox")?.as_array()?;
    let coords: Vec<f64> = b.iter().map(py_number).collect::<Option<_>>()?;
    let &[x1, y1, x2, y2] = coords.as_slice() else {
        return None;
    };
    let id = o.get("id")?.as_str()?;
    Some((normalize_label(id), [x1, y1, x2, y2]))
}

/// A JSON value as a Python number: numbers, and booleans as 1 and 0.
fn py_number(v: &Value) -> Option<f64> {
    match v {
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => v.as_f64(),
    }
}

/// A list given either as a JSON list or as a string holding one (R1-SGG's
/// datasets store `objects` and `relationships` as JSON strings).
fn json_list(value: &Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(items) => Ok(items.clone()),
        Value::String(s) => match serde_json::from_str(s) {
            Ok(Value::Array(items)) => Ok(items),
            _ => Err("is a string that is not a JSON list".into()),
        },
        _ => Err("is not a list".into()),
    }
}

/// R1-SGG's `extract_answer_content`: every ```` ``` ```` and every `json`
/// replaced by a space, stripped; then the text between the first
/// `<answer>` and the next `</answer>`, or after `<answer>` when none
/// closes it, or all of it; stripped.
pub fn extract_answer_content(text: &str) -> String {
    let text = text.replace("```", " ").replace("json", " ");
    let text = text.trim_matches(is_python_space);
    let inner = match text.find("<answer>") {
        Some(start) => {
            let rest = &text[start + "<answer>".len()..];
            rest.find("</answer>").map_or(rest, |end| &rest[..end])
        }
        None => text,
    };
    inner.trim_matches(is_python_space).to_string()
}

/// `s.split('.')[0].strip()`.
fn category_part(s: &str) -> String {
    s.split('.')
        .next()
        .unwrap_or_default()
        .trim_matches(is_python_space)
        .to_string()
}

/// torch's `maximum`/`minimum` propagate NaN, where Rust's `max`/`min` drop it.
fn nan_or(a: f32, b: f32, f: fn(f32, f32) -> f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        f(a, b)
    }
}

/// `boxlist_iou` on one GT box (f32) and one predicted box (f64 pixels, as
/// `torch.as_tensor` rounds them to f32): `+1` on every side, f32
/// arithmetic, `clamp(min=0)` keeping NaN, no guard on the union.
fn iou_plus_one(gt: &[f32; 4], pred: &[f64; 4]) -> f64 {
    let p = pred.map(|v| v as f32);
    let area = |b: &[f32; 4]| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0);
    let clamp0 = |v: f32| if v < 0.0 { 0.0 } else { v };
    let w = clamp0(nan_or(gt[2], p[2], f32::min) - nan_or(gt[0], p[0], f32::max) + 1.0);
    let h = clamp0(nan_or(gt[3], p[3], f32::min) - nan_or(gt[1], p[1], f32::max) + 1.0);
    let inter = w * h;
    f64::from(inter / (area(gt) + area(&p) - inter))
}

/// `vg150_eval.py`'s `compute_iou`, in f64 as Python computes it: no +1,
/// `max(0, x)` (0 unless `x > 0`), 0 when the union is 0.
fn iou_python(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let pos = |v: f64| if v > 0.0 { v } else { 0.0 };
    // Python's max/min keep the first argument unless the second compares
    // greater (smaller): NaN never does.
    let max = |x: f64, y: f64| if y > x { y } else { x };
    let min = |x: f64, y: f64| if y < x { y } else { x };
    let inter = pos(min(a[2], b[2]) - max(a[0], b[0])) * pos(min(a[3], b[3]) - max(a[1], b[1]));
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union == 0.0 {
        0.0
    } else {
        inter / union
    }
}

#[cfg(test)]
mod tests {
    use super::records::{evaluate_records, read_gathered, read_records, write_gathered};
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn fixture(dataset: &str, file: &str) -> String {
        let path = format!(
            "{}/fixtures/r1_sgg_eval/{dataset}/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path).unwrap()
    }

    fn close(what: &str, ours: f64, theirs: &Value, worst: &mut f64) {
        let theirs = theirs.as_f64().unwrap_or_else(|| panic!("{what}: {theirs}"));
        let diff = (ours - theirs).abs();
        assert!(diff <= 1e-12, "{what}: ours {ours}, R1-SGG {theirs}");
        *worst = worst.max(diff);
    }

    /// Generated records (`scripts/r1_sgg_eval_reference.py`) scored by
    /// R1-SGG's own `sgg_gather_preds.py` and `vg150_eval.py`: the same
    /// failures, the same counted images, R@K, mR@K, per-predicate recall
    /// and triplet recall, overall and per image.
    #[test]
    fn equals_r1_sgg_evaluation() {
        for (name, dataset) in [("vg150", Dataset::Vg150), ("psg", Dataset::Psg)] {
            let path = format!(
                "{}/fixtures/r1_sgg_eval/{name}/records.jsonl",
                env!("CARGO_MANIFEST_DIR")
            );
            let records = read_records(std::path::Path::new(&path)).unwrap();
            let expected: Value = serde_json::from_str(&fixture(name, "expected.json")).unwrap();
            let (eval, gathered) = evaluate_records(&records, dataset, &HashMap::new()).unwrap();
            let s = eval.summary();
            let want = &expected["summary"];
            assert_eq!(s.images, want["images"].as_u64().unwrap() as usize, "{name}");
            assert_eq!(s.failures, want["failures"].as_u64().unwrap() as usize, "{name}");
            assert_eq!(
                s.recall_images,
                want["recall_images"].as_u64().unwrap() as usize,
                "{name}"
            );
            let mut worst = 0.0f64;
            for (i, &k) in KS.iter().enumerate() {
                close(
                    &format!("{name} R@{k}"),
                    s.recall[i].1,
                    &want["recall"][k.to_string()],
                    &mut worst,
                );
                close(
                    &format!("{name} mR@{k}"),
                    s.mean_recall[i].1,
                    &want["mean_recall"][k.to_string()],
                    &mut worst,
                );
                for (p, (label, r)) in s.per_predicate.iter().enumerate() {
                    close(
                        &format!("{name} {label} @{k}"),
                        r[i],
                        &want["per_predicate"][k.to_string()][p],
                        &mut worst,
                    );
                }
            }
            close(
                &format!("{name} triplet recall"),
                s.triplet_recall,
                &want["triplet_recall"],
                &mut worst,
            );
            close(
                &format!("{name} triplet mR"),
                s.triplet_mean_recall,
                &want["triplet_mean_recall"],
                &mut worst,
            );
            for image in eval.images() {
                let theirs = &expected["images"][&image.image_id]["recall"];
                match image.recall {
                    None => assert!(theirs.is_null(), "{}: R1-SGG counts it: {theirs}", image.image_id),
                    Some(r) => {
                        for (i, v) in r.iter().enumerate() {
                            close(&image.image_id, *v, &theirs[i], &mut worst);
                        }
                    }
                }
            }
            println!(
                "{name}: {} images, R@K {:?}, max |ours - R1-SGG| {worst:e}",
                s.images, s.recall
            );

            // The gathered file written and read back scores the same.
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("sgg_pred_results.json");
            write_gathered(&eval, &gathered, &file).unwrap();
            let back = read_gathered(&file).unwrap();
            let mut again = R1SggEval::new(dataset);
            for r in &records {
                again
                    .add(
                        &r.image_id,
                        &Gathered::Graph(back[&r.image_id].clone()),
                        &r.gt_objects,
                        &r.gt_relationships,
                    )
                    .unwrap();
            }
            let t = again.summary();
            assert_eq!(
                (t.recall, t.mean_recall, t.triplet_recall),
                (s.recall, s.mean_recall, s.triplet_recall)
            );
        }
    }

    /// A man riding a horse in a 100 x 100 image, boxes in pixels.
    fn man_horse() -> (Value, Value) {
        (
            json!([{"id": "man.1", "bbox": [0, 0, 9, 9]}, {"id": "horse.2", "bbox": [20, 20, 59, 59]}]),
            json!([{"subject": "man.1", "predicate": "riding", "object": "horse.2"}]),
        )
    }

    fn answer(objects: &str, relations: &str) -> String {
        format!(r#"<answer>{{"objects": [{objects}], "relationships": [{relations}]}}</answer>"#)
    }

    fn score(text: &str) -> ImageScore {
        let mut eval = R1SggEval::new(Dataset::Vg150);
        let (objects, relations) = man_horse();
        let g = eval.gather(text, [1000.0, 1000.0], (100.0, 100.0));
        eval.add("1", &g, &objects, &relations).unwrap().clone()
    }

    #[test]
    fn r1_sgg_rules_by_hand() {
        let horse = r#"{"id": "horse.2", "bbox": [200, 200, 590, 590]}"#;
        let riding = r#"{"subject": "man.1", "predicate": "riding", "object": "horse.2"}"#;
        // (d) +1 pixel: the man [0,0,4,9] against [0,0,9,9]: 5*10 / 100 = 0.5, a hit
        // (without the +1 pixel, 4*9/81 < 0.5).
        let man = r#"{"id": "man.1", "bbox": [0, 0, 40, 90]}"#;
        assert_eq!(
            score(&answer(&format!("{man}, {horse}"), riding)).recall,
            Some([1.0; 3])
        );
        // (c) endpoints after cleaning: "Man.1" finds "man.1".
        let loud = riding.replace("\"man.1\"", "\"Man_1\"").replace("Man_1", "MAN.1");
        assert_eq!(
            score(&answer(&format!("{man}, {horse}"), &loud)).recall,
            Some([1.0; 3])
        );
        // (f) synonyms: "gentleman" is not VG150's; WordNet gives "man".
        // "horseback riding"? No: a predicate outside the lists is dropped (b),
        // and with no relation left the image is not counted (a).
        let gent = man.replace("man.1", "gentleman.1");
        let rel = riding.replace("man.1", "gentleman.1");
        let s = score(&answer(&format!("{gent}, {horse}"), &rel));
        assert_eq!((s.kept, s.recall), ((2, 1), Some([1.0; 3])));
        let teleport = riding.replace("riding", "teleporting");
        let s = score(&answer(&format!("{man}, {horse}"), &teleport));
        assert_eq!((s.kept, s.recall, s.failure), ((2, 0), None, None));
        // (b) out-of-vocabulary relations ahead do not use up K.
        let junk = vec![teleport.as_str(); 30].join(", ");
        let s = score(&answer(&format!("{man}, {horse}"), &format!("{junk}, {riding}")));
        assert_eq!(s.recall, Some([1.0; 3]));
        // pass2act: "being ridden by" is "riding" with the ends swapped.
        let ridden = r#"{"subject": "horse.2", "predicate": "being ridden by", "object": "man.1"}"#;
        assert_eq!(
            score(&answer(&format!("{man}, {horse}"), ridden)).recall,
            Some([1.0; 3])
        );
        // A failure counts as 0; so does an answer with no object of the vocabulary.
        assert_eq!(score("no graph").recall, Some([0.0; 3]));
        let unicorn = man.replace("man.1", "unicorn.1");
        assert_eq!(score(&answer(&unicorn, "")).recall, Some([0.0; 3]));
        assert!(score("no graph").failure.is_some());
    }

    #[test]
    fn mean_recall_divides_by_every_predicate() {
        let (objects, relations) = man_horse();
        let mut eval = R1SggEval::new(Dataset::Vg150);
        let perfect = answer(
            r#"{"id": "man.1", "bbox": [0, 0, 90, 90]}, {"id": "horse.2", "bbox": [200, 200, 590, 590]}"#,
            r#"{"subject": "man.1", "predicate": "riding", "object": "horse.2"}"#,
        );
        let g = eval.gather(&perfect, [1000.0, 1000.0], (100.0, 100.0));
        eval.add("1", &g, &objects, &relations).unwrap();
        let s = eval.summary();
        assert_eq!(s.recall[0].1, 1.0);
        // riding recalled; the other 49 predicates count 0: 1/50.
        assert_eq!(s.mean_recall[0].1, 1.0 / 50.0);
        assert_eq!(s.per_predicate.len(), 50);
        // A ground truth R1-SGG cannot read is an error, not a panic; so is
        // a prediction whose relation points past its objects.
        let bad = json!([{"id": "unicorn.1", "bbox": [0, 0, 1, 1]}]);
        assert!(eval.add("2", &g, &bad, &json!([])).is_err());
        let mut broken = match g {
            Gathered::Graph(p) => p,
            Gathered::Failed(e) => panic!("{e}"),
        };
        broken.relations.push((0, 9, 1));
        assert!(eval
            .add("3", &Gathered::Graph(broken), &objects, &relations)
            .is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Any text, and any edit of a valid answer, is gathered and scored
        /// without a panic; every metric stays in [0, 1].
        #[test]
        fn never_panics_on_any_answer(text in ".*", cut in 0usize..200, insert in ".{0,8}") {
            let base = answer(
                r#"{"id": "Man.1", "bbox": [0, 0, 90, 90]}, {"id": "horse.2", "bbox": [200, 200, 590, 590]}"#,
                r#"{"subject": "man.1", "predicate": "worn by", "object": "horse.2"}"#,
            );
            let at = (0..=cut.min(base.len())).rev().find(|&i| base.is_char_boundary(i)).unwrap_or(0);
            let edited = format!("{}{insert}{}", &base[..at], &base[at..]);
            let (objects, relations) = man_horse();
            for dataset in [Dataset::Vg150, Dataset::Psg] {
                let mut eval = R1SggEval::new(dataset);
                for (i, t) in [text.as_str(), edited.as_str(), &base[..at]].into_iter().enumerate() {
                    let g = eval.gather(t, [1000.0, 1000.0], (100.0, 100.0));
                    if dataset == Dataset::Vg150 {
                        eval.add(&i.to_string(), &g, &objects, &relations).unwrap();
                    }
                }
                let s = eval.summary();
                let metrics = s.recall.iter().chain(&s.mean_recall).map(|x| x.1)
                    .chain([s.failure_rate, s.triplet_recall, s.triplet_mean_recall]);
                for m in metrics {
                    prop_assert!((0.0..=1.0).contains(&m), "{m}");
                }
            }
        }
    }
}
