//! Scene graphs: objects with boxes, relation triplets between them, the
//! closed vocabularies they are drawn from, and the box geometry the rewards
//! are built on.
//!
//! **Coordinates.** Every box in a [`SceneGraph`] is `[x1, y1, x2, y2]`
//! (top-left, bottom-right) in normalized image coordinates: `0` is the left
//! (top) edge, `1` the right (bottom) edge, whatever the image's pixel size.
//! The answer text scales them to integers `0..=1000` (see `format.rs`), the
//! real-data loader divides absolute pixel boxes by the image size.
//!
//! **Ids.** An object's id is `"category.N"` as in R1-SGG (arXiv 2504.13617):
//! the category is the text before the first `.` (see [`category_of`]), `N`
//! a number that makes the id unique in its graph. Relations name their
//! subject and object by id.
//!
//! **Labels** are compared after [`normalize_label`], which cleans them as
//! R1-SGG's `refine_node_edge` does (`_` and `-` as spaces, trimmed,
//! lowercase), so `"door-stuff"` and `"Door stuff"` are the same category.

use std::collections::{HashMap, HashSet};

/// `[x1, y1, x2, y2]` in normalized image coordinates (`0..=1`).
pub type BBox = [f32; 4];

/// One node of a scene graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// `"category.N"`, unique in the graph.
    pub id: String,
    /// The object's class, as written in the vocabulary.
    pub category: String,
    /// Normalized `xyxy` box.
    pub bbox: BBox,
}

impl Object {
    /// An object whose category is read from its id (`"man.1"` is a `"man"`).
    pub fn from_id(id: impl Into<String>, bbox: BBox) -> Self {
        let id = id.into();
        let category = category_of(&id).to_string();
        Self { id, category, bbox }
    }
}

/// One edge: `subject --predicate--> object`, both named by object id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Relation {
    /// Id of the subject object.
    pub subject: String,
    /// Relation class, as written in the vocabulary.
    pub predicate: String,
    /// Id of the object object.
    pub object: String,
}

impl Relation {
    /// `subject --predicate--> object`.
    pub fn new(subject: impl Into<String>, predicate: impl Into<String>, object: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            predicate: predicate.into(),
            object: object.into(),
        }
    }
}

/// A relation with its endpoints resolved to object indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Triplet<'a> {
    /// Index of the subject in [`SceneGraph::objects`].
    pub subject: usize,
    /// The relation's predicate.
    pub predicate: &'a str,
    /// Index of the object in [`SceneGraph::objects`].
    pub object: usize,
}

/// Objects and the relations between them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SceneGraph {
    /// The nodes, in the order they are written.
    pub objects: Vec<Object>,
    /// The edges, in the order they are written (for recall@K, the model's
    /// ranking).
    pub relations: Vec<Relation>,
}

impl SceneGraph {
    /// Index of the first object with this id.
    pub fn object_index(&self, id: &str) -> Option<usize> {
        self.objects.iter().position(|o| o.id == id)
    }

    /// The relations whose subject and object both exist, resolved to
    /// indices (to the first object of a duplicated id), in written order.
    pub fn triplets(&self) -> Vec<Triplet<'_>> {
        let index: HashMap<&str, usize> = self
            .objects
            .iter()
            .enumerate()
            .rev() // so the first of duplicated ids wins
            .map(|(i, o)| (o.id.as_str(), i))
            .collect();
        self.relations
            .iter()
            .filter_map(|r| {
                Some(Triplet {
                    subject: *index.get(r.subject.as_str())?,
                    predicate: &r.predicate,
                    object: *index.get(r.object.as_str())?,
                })
            })
            .collect()
    }

    /// Checks that this graph is a well-formed ground truth: unique non-empty
    /// ids, each id's category equal to the object's category, boxes finite
    /// inside `[0, 1]` with `x1 <= x2` and `y1 <= y2`, every relation naming
    /// existing objects. Returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = HashMap::new();
        for (i, o) in self.objects.iter().enumerate() {
            if o.id.is_empty() {
                return Err(format!("object {i} has an empty id"));
            }
            if let Some(j) = seen.insert(o.id.as_str(), i) {
                return Err(format!("objects {j} and {i} share the id {:?}", o.id));
            }
            if category_of(&o.id) != o.category {
                return Err(format!("object {:?} has category {:?}", o.id, o.category));
            }
            let [x1, y1, x2, y2] = o.bbox;
            let in_unit = o.bbox.iter().all(|v| (0.0..=1.0).contains(v));
            if !in_unit || x1 > x2 || y1 > y2 {
                return Err(format!("object {:?} has box {:?}", o.id, o.bbox));
            }
        }
        for r in &self.relations {
            for end in [&r.subject, &r.object] {
                if !seen.contains_key(end.as_str()) {
                    return Err(format!("relation {r:?} names the undefined object {end:?}"));
                }
            }
        }
        Ok(())
    }

    /// The graph restricted to a vocabulary: objects of other categories are
    /// dropped, and so are relations with another predicate or a dropped
    /// endpoint (R1-SGG filters VG150 to its base classes the same way).
    pub fn restrict_to(&self, vocab: &Vocabulary) -> SceneGraph {
        let objects: Vec<Object> = self
            .objects
            .iter()
            .filter(|o| vocab.has_object(&o.category))
            .cloned()
            .collect();
        let kept = |id: &str| objects.iter().any(|o| o.id == id);
        let relations = self
            .relations
            .iter()
            .filter(|r| vocab.has_predicate(&r.predicate) && kept(&r.subject) && kept(&r.object))
            .cloned()
            .collect();
        SceneGraph { objects, relations }
    }
}

/// The category part of an id: the text before the first `.` (all of it if
/// there is none), as R1-SGG's `id.split('.')[0]`.
pub fn category_of(id: &str) -> &str {
    id.split('.').next().unwrap_or(id)
}

/// A label cleaned as R1-SGG's `refine_node_edge` cleans it before spaCy
/// compares it: `_` and `-` read as spaces, surrounding whitespace trimmed
/// (the characters Python's `str.strip` removes), lowercase (full Unicode
/// mapping, as `str.lower`). Inner whitespace stays as written, as there:
/// spaCy reads `"in  front of"` as four tokens, so it is another label than
/// `"in front of"`.
pub fn normalize_label(label: &str) -> String {
    let spaced: String = label
        .chars()
        .map(|c| if c == '_' || c == '-' { ' ' } else { c })
        .collect();
    spaced.trim_matches(is_python_space).to_lowercase()
}

/// Python's `str.isspace`: Unicode's `White_Space` and the four separator
/// controls `\x1c..=\x1f`, which Python counts as whitespace and Rust does not.
pub(crate) fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A closed vocabulary: the object categories and predicates a prompt lists
/// and a model may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vocabulary {
    /// Short name, for logs.
    pub name: &'static str,
    /// Object categories.
    pub objects: &'static [&'static str],
    /// Relation predicates.
    pub predicates: &'static [&'static str],
}

impl Vocabulary {
    /// Whether `category` is one of the object classes (after [`normalize_label`]).
    pub fn has_object(&self, category: &str) -> bool {
        contains_label(self.objects, category)
    }

    /// Whether `predicate` is one of the predicates (after [`normalize_label`]).
    pub fn has_predicate(&self, predicate: &str) -> bool {
        contains_label(self.predicates, predicate)
    }

    /// Every object category and predicate, normalized ([`normalize_label`]).
    pub fn normalized_labels(&self) -> HashSet<String> {
        self.objects
            .iter()
            .chain(self.predicates)
            .map(|l| normalize_label(l))
            .collect()
    }
}

fn contains_label(labels: &[&str], label: &str) -> bool {
    let label = normalize_label(label);
    labels.iter().any(|l| normalize_label(l) == label)
}

/// The vocabularies with a label-similarity table: the demo's and the two
/// R1-SGG trains on.
pub const KNOWN_VOCABULARIES: [Vocabulary; 3] = [SYNTHETIC, VG150, PSG];

/// Of [`KNOWN_VOCABULARIES`], the one holding the most of the graphs'
/// distinct labels (object categories and predicates, normalized), with the
/// share of those labels it holds (1 when there are none); the first listed
/// wins a tie. How R1-SGG-layout data that names no vocabulary gets one.
pub fn covering_vocabulary<'a>(graphs: impl IntoIterator<Item = &'a SceneGraph>) -> (Vocabulary, f64) {
    let mut labels = HashSet::new();
    for g in graphs {
        add_labels(g, &mut labels);
    }
    covering_labels(&labels)
}

/// Adds the object categories and predicates of `graph` to `labels`,
/// normalized ([`normalize_label`]): what [`covering_labels`] weighs.
pub fn add_labels(graph: &SceneGraph, labels: &mut HashSet<String>) {
    labels.extend(graph.objects.iter().map(|o| normalize_label(&o.category)));
    labels.extend(graph.relations.iter().map(|r| normalize_label(&r.predicate)));
}

/// [`covering_vocabulary`] of labels gathered with [`add_labels`] (a
/// streamed training set's, gathered without holding its graphs).
pub fn covering_labels(labels: &HashSet<String>) -> (Vocabulary, f64) {
    let mut best = (KNOWN_VOCABULARIES[0], 0);
    for vocab in KNOWN_VOCABULARIES {
        let known = vocab.normalized_labels();
        let held = labels.iter().filter(|l| known.contains(*l)).count();
        if held > best.1 {
            best = (vocab, held);
        }
    }
    let share = if labels.is_empty() {
        1.0
    } else {
        best.1 as f64 / labels.len() as f64
    };
    (best.0, share)
}

/// The synthetic shapes world of the demo: eight shape categories (each
/// drawn in its own colour by `data.rs`) and six geometric predicates.
#[rustfmt::skip]
pub const SYNTHETIC: Vocabulary = Vocabulary {
    name: "synthetic",
    objects: &[
        "circle", "square", "triangle", "diamond", "cross", "ring", "star", "frame",
    ],
    predicates: &["inside", "on", "near", "bigger than", "left of", "above"],
};

/// Visual Genome's VG150 split (Xu et al., "Scene Graph Generation by
/// Iterative Message Passing", 2017): 150 object and 50 predicate classes,
/// in the split's alphabetical order, without `__background__`. Written
/// from the split's published class lists; checked against the lists
/// R1-SGG's prompts use.
#[rustfmt::skip]
pub const VG150: Vocabulary = Vocabulary {
    name: "vg150",
    objects: &[
        "airplane", "animal", "arm", "bag", "banana", "basket", "beach", "bear", "bed", "bench", "bike",
        "bird", "board", "boat", "book", "boot", "bottle", "bowl", "box", "boy", "branch", "building",
        "bus", "cabinet", "cap", "car", "cat", "chair", "child", "clock", "coat", "counter", "cow", "cup",
        "curtain", "desk", "dog", "door", "drawer", "ear", "elephant", "engine", "eye", "face", "fence",
        "finger", "flag", "flower", "food", "fork", "fruit", "giraffe", "girl", "glass", "glove", "guy",
        "hair", "hand", "handle", "hat", "head", "helmet", "hill", "horse", "house", "jacket", "jean",
        "kid", "kite", "lady", "lamp", "laptop", "leaf", "leg", "letter", "light", "logo", "man", "men",
        "motorcycle", "mountain", "mouth", "neck", "nose", "number", "orange", "pant", "paper", "paw",
        "people", "person", "phone", "pillow", "pizza", "plane", "plant", "plate", "player", "pole",
        "post", "pot", "racket", "railing", "rock", "roof", "room", "screen", "seat", "sheep", "shelf",
        "shirt", "shoe", "short", "sidewalk", "sign", "sink", "skateboard", "ski", "skier", "sneaker",
        "snow", "sock", "stand", "street", "surfboard", "table", "tail", "tie", "tile", "tire", "toilet",
        "towel", "tower", "track", "train", "tree", "truck", "trunk", "umbrella", "vase", "vegetable",
        "vehicle", "wave", "wheel", "window", "windshield", "wing", "wire", "woman", "zebra",
    ],
    predicates: &[
        "above", "across", "against", "along", "and", "at", "attached to", "behind", "belonging to",
        "between", "carrying", "covered in", "covering", "eating", "flying in", "for", "from",
        "growing on", "hanging from", "has", "holding", "in", "in front of", "laying on", "looking at",
        "lying on", "made of", "mounted on", "near", "of", "on", "on back of", "over", "painted on",
        "parked on", "part of", "playing", "riding", "says", "sitting on", "standing on", "to", "under",
        "using", "walking in", "walking on", "watching", "wearing", "wears", "with",
    ],
};

/// Panoptic Scene Graph (Yang et al., "Panoptic Scene Graph Generation",
/// 2022): COCO panoptic's 80 thing and 53 stuff classes (stuff names keep
/// COCO's `-merged` / `-other` / `-stuff` suffixes, as PSG's files and
/// R1-SGG's prompt do) and PSG's 56 predicates, in PSG's order. Written from
/// the datasets' class lists; checked against the lists R1-SGG's prompts use.
#[rustfmt::skip]
pub const PSG: Vocabulary = Vocabulary {
    name: "psg",
    objects: &[
        // things
        "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
        "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
        "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
        "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
        "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
        "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
        "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
        "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
        "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
        "teddy bear", "hair drier", "toothbrush",
        // stuff
        "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood",
        "flower", "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform",
        "playingfield", "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs",
        "tent", "towel", "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other",
        "window-blind", "window-other", "tree-merged", "fence-merged", "ceiling-merged",
        "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged", "pavement-merged",
        "mountain-merged", "grass-merged", "dirt-merged", "paper-merged", "food-other-merged",
        "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
    ],
    predicates: &[
        "over", "in front of", "beside", "on", "in", "attached to", "hanging from", "on back of",
        "falling off", "going down", "painted on", "walking on", "running on", "crossing", "standing on",
        "lying on", "sitting on", "flying over", "jumping over", "jumping from", "wearing", "holding",
        "carrying", "looking at", "guiding", "kissing", "eating", "drinking", "feeding", "biting",
        "catching", "picking", "playing with", "chasing", "climbing", "cleaning", "playing", "touching",
        "pushing", "pulling", "opening", "cooking", "talking to", "throwing", "slicing", "driving",
        "riding", "parked on", "driving on", "about to hit", "kicking", "swinging", "entering",
        "exiting", "enclosing", "leaning on",
    ],
};

/// Area of a box; an inverted side counts as zero width.
pub fn area(b: &BBox) -> f64 {
    let w = (b[2] as f64 - b[0] as f64).max(0.0);
    let h = (b[3] as f64 - b[1] as f64).max(0.0);
    w * h
}

/// Area of the intersection and of the union of two boxes.
fn intersection_union(a: &BBox, b: &BBox) -> (f64, f64) {
    let w = (a[2].min(b[2]) as f64 - a[0].max(b[0]) as f64).max(0.0);
    let h = (a[3].min(b[3]) as f64 - a[1].max(b[1]) as f64).max(0.0);
    let inter = w * h;
    (inter, area(a) + area(b) - inter)
}

/// Intersection over union, in `[0, 1]`; 0 when the union is empty.
pub fn iou(a: &BBox, b: &BBox) -> f64 {
    let (inter, union) = intersection_union(a, b);
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Generalized IoU (Rezatofighi et al., CVPR 2019):
/// `IoU - (|C| - |A u B|) / |C|` with `C` the smallest box enclosing both,
/// in `[-1, 1]`; 0 when the union is empty (as R1-SGG's `compute_giou`).
pub fn giou(a: &BBox, b: &BBox) -> f64 {
    let (inter, union) = intersection_union(a, b);
    if union <= 0.0 {
        return 0.0;
    }
    let enclosing = area(&[a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])]);
    inter / union - (enclosing - union) / enclosing
}

/// Summed absolute coordinate difference `sum_i |a_i - b_i|` (in `[0, 4]`
/// for boxes inside the unit square).
pub fn l1(a: &BBox, b: &BBox) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x1: f32, y1: f32, x2: f32, y2: f32) -> BBox {
        [x1, y1, x2, y2]
    }

    #[test]
    fn vocabulary_sizes() {
        assert_eq!(VG150.objects.len(), 150);
        assert_eq!(VG150.predicates.len(), 50);
        assert_eq!(PSG.objects.len(), 133);
        assert_eq!(PSG.predicates.len(), 56);
        assert_eq!(SYNTHETIC.objects.len(), 8);
        assert_eq!(SYNTHETIC.predicates.len(), 6);
        for vocab in [VG150, PSG, SYNTHETIC] {
            for labels in [vocab.objects, vocab.predicates] {
                let mut normalized: Vec<String> = labels.iter().map(|l| normalize_label(l)).collect();
                normalized.sort();
                normalized.dedup();
                assert_eq!(normalized.len(), labels.len(), "{}: duplicate label", vocab.name);
                // A dot would split an id's category.
                assert!(labels.iter().all(|l| !l.contains('.')));
            }
        }
    }

    #[test]
    fn labels_and_ids() {
        assert_eq!(category_of("man.1"), "man");
        assert_eq!(category_of("traffic light.12"), "traffic light");
        assert_eq!(category_of("man"), "man");
        assert_eq!(category_of(""), "");
        assert_eq!(normalize_label("  Door-stuff "), "door stuff");
        assert_eq!(normalize_label("In_Front of"), "in front of");
        // As refine_node_edge: inner whitespace is kept, the ends trimmed
        // as Python's strip (\x1f included), lowercase with the final sigma.
        assert_eq!(normalize_label("in  front of"), "in  front of");
        assert_eq!(normalize_label("\u{1f}\t-on- \u{a0}"), "on");
        assert_eq!(normalize_label("ΟΔΟΣ"), "οδος");
        assert!(PSG.has_object("door stuff"));
        assert!(VG150.has_predicate("In Front Of"));
        assert!(!VG150.has_object("unicorn"));
    }

    #[test]
    fn covering_vocabulary_takes_the_one_holding_most_labels() {
        let graph = |labels: &[&str], predicate: &str| SceneGraph {
            objects: labels
                .iter()
                .enumerate()
                .map(|(i, l)| Object::from_id(format!("{l}.{}", i + 1), [0.0; 4]))
                .collect(),
            relations: vec![Relation::new(
                format!("{}.1", labels[0]),
                predicate,
                format!("{}.2", labels[1]),
            )],
        };
        // man, horse, riding: VG150's; "unicorn" is nobody's: 3 of 4.
        let (vocab, share) = covering_vocabulary(&[graph(&["man", "horse", "unicorn"], "riding")]);
        assert_eq!((vocab, share), (VG150, 0.75));
        // door-stuff and "in front of" (written with an underscore): PSG's.
        let (vocab, share) = covering_vocabulary(&[graph(&["door-stuff", "person"], "in_front_of")]);
        assert_eq!((vocab, share), (PSG, 1.0));
        let (vocab, share) = covering_vocabulary(&[graph(&["circle", "ring"], "inside")]);
        assert_eq!((vocab, share), (SYNTHETIC, 1.0));
        // No labels: the first, fully covering.
        assert_eq!(covering_vocabulary(std::iter::empty()), (SYNTHETIC, 1.0));
    }

    #[test]
    fn box_geometry_by_hand() {
        // a = [0,0,2,2] (area 4), c = [1,1,3,3] (area 4): intersection 1,
        // union 7, IoU 1/7; enclosing [0,0,3,3] area 9: GIoU 1/7 - 2/9.
        let a = b(0.0, 0.0, 2.0, 2.0);
        let c = b(1.0, 1.0, 3.0, 3.0);
        assert!((iou(&a, &c) - 1.0 / 7.0).abs() < 1e-12);
        assert!((giou(&a, &c) - (1.0 / 7.0 - 2.0 / 9.0)).abs() < 1e-12);
        // Disjoint [0,0,1,1] and [2,0,3,1]: IoU 0, union 2, enclosing 3:
        // GIoU = -1/3.
        let d = b(0.0, 0.0, 1.0, 1.0);
        let e = b(2.0, 0.0, 3.0, 1.0);
        assert_eq!(iou(&d, &e), 0.0);
        assert!((giou(&d, &e) + 1.0 / 3.0).abs() < 1e-12);
        // L1: |0-1| + |0-1| + |2-3| + |2-3| = 4.
        assert!((l1(&a, &c) - 4.0).abs() < 1e-12);
        assert_eq!(iou(&a, &a), 1.0);
        assert_eq!(giou(&a, &a), 1.0);
        // Degenerate and inverted boxes have no area and give 0, not NaN.
        let point = b(0.5, 0.5, 0.5, 0.5);
        assert_eq!(iou(&point, &point), 0.0);
        assert_eq!(giou(&point, &point), 0.0);
        let inverted = b(0.8, 0.8, 0.2, 0.2);
        assert_eq!(area(&inverted), 0.0);
        assert_eq!(iou(&inverted, &a), 0.0);
    }

    #[test]
    fn graph_resolution_and_checks() {
        let mut g = SceneGraph {
            objects: vec![
                Object::from_id("man.1", b(0.1, 0.1, 0.5, 0.9)),
                Object::from_id("horse.2", b(0.2, 0.4, 0.9, 1.0)),
            ],
            relations: vec![
                Relation::new("man.1", "riding", "horse.2"),
                Relation::new("man.1", "near", "tree.3"),
            ],
        };
        let t = g.triplets();
        assert_eq!(
            t,
            vec![Triplet {
                subject: 0,
                predicate: "riding",
                object: 1
            }]
        );
        assert!(g.check().unwrap_err().contains("tree.3"));
        g.relations.pop();
        assert_eq!(g.check(), Ok(()));
        g.objects[1].bbox = b(0.9, 0.0, 0.1, 1.0);
        assert!(g.check().unwrap_err().contains("horse.2"));
        g.objects[1].bbox = b(0.2, 0.4, 0.9, 1.0);
        g.objects.push(Object::from_id("man.1", b(0.0, 0.0, 0.1, 0.1)));
        assert!(g.check().unwrap_err().contains("share"));
        // man, horse and riding are all VG150 classes; none is a shape.
        let restricted = g.restrict_to(&VG150);
        assert_eq!(restricted.relations.len(), 1);
        let shapes_only = g.restrict_to(&SYNTHETIC);
        assert!(shapes_only.objects.is_empty() && shapes_only.relations.is_empty());
    }
}
