#!/usr/bin/env python3
"""R1-SGG's evaluation and rewards, run by R1-SGG's own code, as references for this crate.

`r1_sgg::eval::r1_sgg` reproduces the evaluation R1-SGG reports (gpt4vision/R1-SGG:
`src/sgg_gather_preds.py` turns the per-image answers into predictions, `src/vg150_eval.py` with
`src/utils/sgg_eval.py` and `src/utils/sgg_metrics.py` scores them). This script writes what that
needs and what tests it:

- assets/r1_sgg/synonyms.json: the label maps `sgg_gather_preds.py` applies to labels outside the
  vocabulary: `obj2vg_list`, `rel2vg_list`, `pass2act_list` and `obj2psg_list` from
  `src/vg_synonyms.py` (GPT-4o-written lists, facts we transcribe), and, for its WordNet fallback
  (`src/utils/wordnet.py`, `find_synonym_map`), NLTK's lookup precomputed over WordNet 3.0: for
  each target label set and part of speech, every WordNet form whose synsets hold a target lemma
  (the first such lemma, in NLTK's order), the exception-list entries that change a lookup, and
  NLTK's suffix rules. Rust has no WordNet; with these tables `find_synonym_map` gives NLTK's
  answer for every word (see `wordnet_samples.json`).
- fixtures/r1_sgg_eval/wordnet_samples.json: `find_synonym_map` itself (R1-SGG's function, real
  NLTK and WordNet) against each target set on 2,020 words and phrases: every candidate with a
  synonym (the targets and their inflections, sampled WordNet forms and their inflections,
  exception-list words, the synonym lists' sources, phrases) and 800 without.
- fixtures/r1_sgg_eval/{vg150,psg}/records.jsonl: generated per-image records in the layout
  R1-SGG's inference script writes (`image_id`, `response`, `gt_objects`, `gt_relationships`,
  `box_scale`; plus `width` and `height`, the image size `sgg_gather_preds.py` reads from the
  dataset): VG150-like and PSG-like ground truths with answers well-formed, unusual and broken.
- fixtures/r1_sgg_eval/{vg150,psg}/expected.json: what R1-SGG's code gives them:
  `sgg_gather_preds.py` and then `vg150_eval.py`, each run as `__main__` on the records (the
  Hugging Face dataset replaced by the records' own ground truth and image sizes): the failure
  rate, R@20/50/100, mR@20/50/100 and the per-predicate recall of `SggEvaluator` (from its
  result dict), the per-image recall and whether the image counted, the triplet recall of
  `vg150_eval.py`'s own loop; and per record the values of `open_r1/grpo.py`'s reward functions
  (node_acc, node_box, the soft, hard and relaxed edge rewards, format) with spaCy replaced by
  exact match (`nlp(a).similarity(nlp(b))` = 1 for equal text, else 0: this crate's `ExactMatch`;
  `fixtures/labels/rewards.jsonl` covers real spaCy), and the rewards where this crate's rules
  deliberately differ, each with the reason (`src/reward/mod.rs` states each rule).

R1-SGG's files are read from a checkout at R1_SGG_COMMIT, checked by sha256, never copied. What
runs them is replaced where it must be, and said so: `datasets.load_dataset` (returns the records'
ground truth), `spacy` (only R1-SGG's DEBUG drawing uses it in the evaluation; exact match in the
rewards), `matplotlib` and `torchvision` (imported, unused on these paths).

    python3.11 -m venv /work/venv-eval
    /work/venv-eval/bin/pip install -r apps/r1-sgg/scripts/requirements-eval.txt
    apt-get install wordnet-base wordnet-sense-index     # WordNet 3.0 (Debian 1:3.0-37)
    # /tmp/R1-SGG: a checkout of gpt4vision/R1-SGG at e4de64d
    /work/venv-eval/bin/python apps/r1-sgg/scripts/r1_sgg_eval_reference.py \
        --r1-sgg /tmp/R1-SGG --wordnet /usr/share/wordnet

NLTK reads WordNet from an `nltk_data` folder the script lays out in a temporary directory
(Debian's files, checked by sha256, and the `lexnames` list of WordNet's lexnames(5WN)). A rerun
with the pinned versions writes byte-identical files.
"""

import argparse
import ast
import contextlib
import copy
import datetime
import hashlib
import importlib.metadata as metadata
import io
import json
import os
import random
import re
import runpy
import sys
import tempfile
import types
from functools import lru_cache
from pathlib import Path

CRATE_DIR = Path(__file__).resolve().parents[1]
ASSET = CRATE_DIR / "assets" / "r1_sgg" / "synonyms.json"
FIXTURE_DIR = CRATE_DIR / "fixtures" / "r1_sgg_eval"

R1_SGG_COMMIT = "e4de64d4c4c97edec648021d012198b21a9b1864"
R1_SGG_FILES = {
    "src/sgg_gather_preds.py": "234107c072527e4e80c99307f5c1815ddcba4942d2bbb7fba2ff8c562e582e59",
    "src/vg150_eval.py": "96084937507e5a8176dac03996ce04408811342060c2a415a5102f1d7b56ac04",
    "src/utils/sgg_eval.py": "6f1838a49c0211965fdb19289c01912fe36d930abd2487794cfb2cf5a9f3611c",
    "src/utils/sgg_metrics.py": "aa8bb16ca4a67539b95d3b0faa18e98bdb22268ba0b6eca6918a7532962c5ba8",
    "src/utils/bounding_box.py": "ff1cdea4568470a724bc4bb974b6fd6a134a845e34b01d8990245944332a657b",
    "src/utils/cocoeval.py": "e410808d9b45335249480dc2dfc4187c8b024c40fb6382cf929bc68793e93e16",
    "src/utils/misc.py": "767953e4353650e382087ca3c52f0491be83724b7a01a3ae48c897be304c08ae",
    "src/utils/wordnet.py": "1ce7b3cf0be3deefd40c1081f193701fbf3518bff78dcb4e491296664fb26206",
    "src/utils/zeroshot_triplet.pytorch": "3ab7a6a815da643902115adeb96f188bfe963938b31d74fa7719c764b98fb88a",
    "src/vg_synonyms.py": "f71db0017aafdb92adc93e2796a78b2675de1cbe9cae5d638abfc882d476c9b8",
    "src/psg_categories.json": "05a2b66b01aa940dcd55b7cc6279f0883cd6cb48ee52329af894b9323efdda5b",
    "open_r1/grpo.py": "d53ec7ebf895d26721c6c86c54b0c107b2f70f9362a750e6a86b4b22ad138efd",
}
# WordNet 3.0 as Debian's wordnet-base and wordnet-sense-index 1:3.0-37 ship it.
WORDNET_FILES = {
    "data.noun": "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
    "data.verb": "adcf43e35b581e8036d8b5a52d63d9cd3d3b4870b2720d3c03c799df44777bc2",
    "data.adj": "c89120dfc1f046ddff4a631bf9b7e9fa1a36b5e86565a23bf82dbe14f30b88a7",
    "data.adv": "444a63bf3955080ab7524f5079cfc07ff9bc682cb98bdb1db73b0fb9829f1139",
    "index.noun": "a490d99d93d017bf4822fe2f0ffa51fd73911ce271dc7535fade21f8814b5a04",
    "index.verb": "e2ac24816c3a8289dcb72aaa9cf8db81fdf25ec34d792bfc96ac5b7a20c8b4ae",
    "index.adj": "c9865d7b4d1f805bdef82ccdcea5282436e23083e6f6f1b33e716327c4eda810",
    "index.adv": "6f5465ed5758fe9c8a2f7ec17b1300f3aa875756c70ff7cba162f7e71bcf88ea",
    "noun.exc": "2b5d675c380b39ecf595af9fa9d4e7feb1d58c643b0bff08c40ed5bfe41fab7a",
    "verb.exc": "dbbcf9a601b2d77e934e413b91d90e88ec7f933a8b77cfc00602a923b891b42c",
    "adj.exc": "8824cc24bbedd797b9702316b27f07cd4c2b76b629539f0a1276f03926758016",
    "adv.exc": "e7291461b629abfe63301bbe1998cee09fd575ed7107abd7ea9763adb05bf0a8",
    "index.sense": "ce997000ec806318ff1dfadf77d314ac527358e127d7bbe3d1f4e83a1c5c1c2b",
}
# WordNet's lexicographer files, lexnames(5WN): NLTK reads the list (Debian ships only the man page).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
POS_ORDER = ["n", "v", "a", "r"]  # NLTK's POS_LIST: the order `synsets(word)` goes through
BOX_UNITS = 1000  # Qwen2-VL's box_scale, R1-SGG's default


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_files(root, files, what):
    for rel, digest in files.items():
        if sha256(Path(root) / rel) != digest:
            raise SystemExit(f"{Path(root) / rel} is not the file of {what}")


def dumps(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Running R1-SGG's code.


def nltk_data_dir(wordnet_dir, tmp):
    """An nltk_data folder holding `corpora/wordnet`: Debian's files and the lexnames list."""
    check_files(wordnet_dir, WORDNET_FILES, "WordNet 3.0 (Debian wordnet-base 1:3.0-37)")
    corpus = Path(tmp) / "nltk_data" / "corpora" / "wordnet"
    corpus.mkdir(parents=True)
    for name in WORDNET_FILES:
        (corpus / name).symlink_to(Path(wordnet_dir).resolve() / name)
    category = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    (corpus / "lexnames").write_text("".join(
        f"{i:02d}\t{name}\t{category[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)))
    return corpus.parent.parent


class Image:
    """What `sgg_gather_preds.py` reads of a dataset image: its size."""

    def __init__(self, width, height):
        self.size = (width, height)


def install_stubs(dataset_rows):
    """Modules R1-SGG imports that these paths do not use, and `datasets.load_dataset`, which
    returns `dataset_rows[0]` (the records' ground truth and image sizes) for any name."""
    stubs = {}
    spacy = types.ModuleType("spacy")
    spacy.load = lambda name: (lambda text: None)  # only the DEBUG drawing calls nlp
    stubs["spacy"] = spacy
    stubs["matplotlib"] = types.ModuleType("matplotlib")
    stubs["matplotlib.pyplot"] = types.ModuleType("matplotlib.pyplot")
    stubs["matplotlib"].pyplot = stubs["matplotlib.pyplot"]
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.29.2"  # misc.py reads the minor version only
    stubs["torchvision"] = torchvision
    datasets = types.ModuleType("datasets")
    datasets.load_dataset = lambda name, *a, **k: {"train": dataset_rows[0]}
    stubs["datasets"] = datasets
    sys.modules.update(stubs)


def run_main(path, argv):
    """Runs an R1-SGG script as `__main__` (its printout kept, not shown); returns its globals."""
    out = io.StringIO()
    saved = sys.argv
    sys.argv = [str(path)] + [str(a) for a in argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            namespace = runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved
    return namespace, out.getvalue()


class ExactDoc:
    """spaCy replaced by exact match: `nlp(a).similarity(nlp(b))` is 1 for equal text, else 0."""

    def __init__(self, text):
        self.text = text

    def similarity(self, other):
        return 1.0 if self.text == other.text else 0.0


def load_rewards(root):
    """`open_r1/grpo.py`'s reward functions with the exact-match `nlp`."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    module = ast.parse((Path(root) / "open_r1/grpo.py").read_text())
    wanted = {
        "extract_answer_content", "refine_node_edge", "get_doc", "category_semantic_similarity",
        "compute_iou", "compute_giou", "box_L1", "cost_function", "_freeze_objs", "_bi_match_impl",
        "_bi_match_cached", "bi_match", "scale_box", "node_acc_reward", "node_box_reward",
        "edge_reward", "edge_hard_reward", "edge_hard_relax_reward", "is_valid_id_format",
        "is_valid_box", "is_valid_predicate", "format_reward", "SEM_WEIGHT", "IOU_WEIGHT",
        "BOX_L1_WEIGHT", "FORMAT_REWARD_WEIGHT", "NODE_REWARD_WEIGHT", "EDGE_REWARD_WEIGHT",
        "STRICT_FORMAT",
    }
    nodes = [
        n for n in module.body
        if (isinstance(n, ast.FunctionDef) and n.name in wanted)
        or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in wanted for t in n.targets))
    ]
    found = {n.name if isinstance(n, ast.FunctionDef) else n.targets[0].id for n in nodes}
    if found != wanted:
        raise SystemExit(f"missing from grpo.py: {sorted(wanted - found)}")
    # Weights and STRICT_FORMAT come from the environment there: removed, for its defaults.
    for var in ("FORMAT_REWARD_WEIGHT", "NODE_REWARD_WEIGHT", "EDGE_REWARD_WEIGHT", "STRICT_FORMAT"):
        os.environ.pop(var, None)
    namespace = {
        "os": os, "re": re, "json": json, "np": np, "lru_cache": lru_cache,
        "linear_sum_assignment": linear_sum_assignment, "datetime": datetime.datetime,
        "nlp": ExactDoc, "DEBUG_MODE": False, "LOG_PATH": os.devnull,
    }
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "R1-SGG/open_r1/grpo.py", "exec"),
         namespace)
    return namespace


# ---------------------------------------------------------------------------------------------
# The synonym asset and the WordNet samples.


def wordnet_tables(wn, targets):
    """NLTK's `synsets(word)` lookup against one target set, as tables (see the module docs)."""
    targets = set(targets)
    index = wn._lemma_pos_offset_map
    best = {p: {} for p in POS_ORDER}
    for form, by_pos in index.items():
        for p in POS_ORDER:
            for offset in by_pos.get(p, []):
                lemmas = [l.name() for l in wn.synset_from_pos_and_offset(p, offset).lemmas()]
                hit = next((l for l in lemmas if l in targets), None)
                if hit is not None:
                    best[p][form] = hit
                    break

    def first(p, forms):
        return next((best[p][f] for f in forms if f in best[p]), None)

    exceptions = {p: {} for p in POS_ORDER}
    for p in POS_ORDER:
        rules = wn.MORPHOLOGICAL_SUBSTITUTIONS[p]
        for word, forms in wn._exception_map[p].items():
            by_rules = [word[: -len(old)] + new for old, new in rules if word.endswith(old)]
            if first(p, [word] + forms) != first(p, [word] + by_rules):
                exceptions[p][word] = forms
    return {
        "forms": {p: dict(sorted(best[p].items())) for p in POS_ORDER},
        "exceptions": {p: dict(sorted(exceptions[p].items())) for p in POS_ORDER},
    }


def target_sets(lists, psg):
    """The label sets `find_synonym_map` is called with: VG150's objects and predicates, and PSG's
    predicates (its objects too: `target_objects = PSG_PREDICATES` in sgg_gather_preds.py)."""
    return {
        "vg150_objects": lists["VG150_OBJ_CATEGORIES"][1:],
        "vg150_predicates": lists["VG150_PREDICATES"][1:],
        "psg_predicates": psg["predicate_classes"],
    }


def write_asset(wn, lists, psg, header):
    sets = target_sets(lists, psg)
    asset = {
        **header,
        "obj2vg": [[e["source"], e["target"]] for e in lists["obj2vg_list"]],
        "rel2vg": [[e["source"], e["target"]] for e in lists["rel2vg_list"]],
        "pass2act": [[e["source"], e["target"], e["passive"]] for e in lists["pass2act_list"]],
        "obj2psg": [[e["source"], e["target"]] for e in lists["obj2psg_list"]],
        "vg150": {"objects": lists["VG150_OBJ_CATEGORIES"], "predicates": lists["VG150_PREDICATES"]},
        "psg": {"objects": psg["thing_classes"] + psg["stuff_classes"],
                "predicates": psg["predicate_classes"]},
        "substitutions": {p: wn.MORPHOLOGICAL_SUBSTITUTIONS[p] for p in POS_ORDER},
        "wordnet": {name: {"targets": t, **wordnet_tables(wn, t)} for name, t in sets.items()},
    }
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    ASSET.write_text(json.dumps(asset, ensure_ascii=False, indent=0) + "\n")
    sizes = {k: sum(len(v) for v in t["forms"].values()) for k, t in asset["wordnet"].items()}
    print(f"{ASSET.relative_to(CRATE_DIR)}: {ASSET.stat().st_size} bytes, WordNet forms {sizes}")
    return sets, asset["wordnet"]


def wordnet_samples(wn, find_synonym_map, sets, asset_tables, lists, rng):
    """`find_synonym_map` on words a model might write: WordNet forms, inflections and
    exception-list words near the targets, phrases, and words with no synonym."""
    words = set()
    for targets in sets.values():
        for t in targets:
            words.add(t)
            for w in t.split():
                words.update([w, w + "s", w + "es", w + "ing", w + "ed", w + "er", w[:-1] + "ies"])
    for p in POS_ORDER:
        for form in wn._lemma_pos_offset_map:
            if "_" not in form and rng.random() < 0.002:
                words.update([form, form + "s", form + "es", form + "ing", form + "ed"])
        exceptions = sorted(wn._exception_map[p])
        words.update(rng.sample(exceptions, min(60, len(exceptions))))
    # Every exception-list word that changes a lookup (the asset's entries).
    for tables in asset_tables.values():
        for by_pos in tables["exceptions"].values():
            words.update(by_pos)
    for e in lists["obj2vg_list"] + lists["rel2vg_list"] + lists["obj2psg_list"]:
        words.add(e["source"])
    words.update(["red car", "big tree", "pair of jeans", "men", "women", "leaves", "teeth",
                  "inch", "astatine", "buttocks", "wore", "tennis shoes", "in  front", "x",
                  "", " ", "bus stop", "zebras", "horses", "ridden", "sitting on top of"])
    rows = [[word] + [find_synonym_map([word], t).get(word) for t in sets.values()]
            for word in sorted(words)]
    # Every word with a synonym, and some without.
    mapped = [r for r in rows if any(r[1:])]
    unmapped = [r for r in rows if not any(r[1:])]
    return sorted(mapped + rng.sample(unmapped, min(800, len(unmapped))))


# ---------------------------------------------------------------------------------------------
# Records: ground truths and answers.

VG150_LIKE_OOV = [
    # object labels outside VG150: in obj2vg_list, found by WordNet, or neither
    "wine bottle", "trees", "bicycle", "puppy", "automobile", "unicorn", "table cloth", "kitten",
]
PREDICATE_OOV = ["is riding", "worn by", "next to", "on top of", "sitting in", "holds", "teleporting"]


def box_in(rng, w, h, small=False):
    if small:
        bw, bh = rng.randint(1, 6), rng.randint(1, 6)
    else:
        bw, bh = rng.randint(8, max(9, w // 2)), rng.randint(8, max(9, h // 2))
    x1, y1 = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
    return [x1, y1, x1 + bw, y1 + bh]


def ground_truth(rng, objects, predicates, w, h, max_rels=5):
    n = rng.randint(2, 6)
    objs = []
    for k in range(n):
        label = rng.choice(objects)
        objs.append({"id": f"{label}.{k + 1}", "bbox": box_in(rng, w, h, small=rng.random() < 0.15)})
    rels, pairs = [], set()
    for _ in range(rng.randint(0, max_rels) if rng.random() < 0.1 else rng.randint(1, max_rels)):
        s, o = rng.sample(range(n), 2)
        if (s, o) in pairs:
            continue
        pairs.add((s, o))
        rels.append({"subject": objs[s]["id"], "predicate": rng.choice(predicates),
                     "object": objs[o]["id"]})
    return objs, rels


def to_units(v, side):
    """A pixel coordinate in answer units, as R1-SGG's SFT data writes it: int(x / side * 1000)."""
    return int(v / side * BOX_UNITS)


def jitter(rng, box, amount):
    out = [v + rng.randint(-amount, amount) for v in box]
    return [min(out[0], out[2]), min(out[1], out[3]), max(out[0], out[2]), max(out[1], out[3])]


def answer(rng, vocab, gt_objs, gt_rels, w, h, kind):
    """An answer to the ground truth, changed by `kind`; returns its text."""
    objs = [{"label": o["id"].split(".")[0],
             "box": [to_units(o["bbox"][0], w), to_units(o["bbox"][1], h),
                     to_units(o["bbox"][2], w), to_units(o["bbox"][3], h)]} for o in gt_objs]
    index = {o["id"]: k for k, o in enumerate(gt_objs)}
    rels = [(index[r["subject"]], r["predicate"], index[r["object"]]) for r in gt_rels]
    spell = {}  # object index -> id as written in relations
    if kind in ("jitter", "mixed"):
        amount = rng.choice([1, 3, 10, 40])
        for o in objs:
            o["box"] = jitter(rng, o["box"], amount)
    if kind in ("relabel", "mixed"):
        for o in objs:
            if rng.random() < 0.3:
                o["label"] = rng.choice(vocab["objects"])
        rels = [(s, rng.choice(vocab["predicates"]) if rng.random() < 0.3 else p, o)
                for s, p, o in rels]
    if kind in ("extra", "mixed", "ranking"):
        for _ in range(rng.randint(0, 3)):
            objs.append({"label": rng.choice(vocab["objects"]), "box": box_in(rng, 1000, 1000)})
        for _ in range(rng.randint(1, 4) if kind != "ranking" else rng.randint(45, 70)):
            s, o = rng.sample(range(len(objs)), 2)
            p = rng.choice(vocab["predicates"] + (PREDICATE_OOV if kind == "ranking" else []))
            rels.insert(rng.randrange(len(rels) + 1) if kind != "ranking" else 0, (s, p, o))
    if kind == "oov_labels":
        for o in objs:
            if rng.random() < 0.4:
                o["label"] = rng.choice(VG150_LIKE_OOV)
        rels = [(s, rng.choice(PREDICATE_OOV) if rng.random() < 0.4 else p, o) for s, p, o in rels]
    if kind == "oov_first":
        # (b) relations outside the vocabulary ahead of the right ones do not use up K
        junk = [(rng.randrange(len(objs)), rng.choice(PREDICATE_OOV), rng.randrange(len(objs)))
                for _ in range(rng.randint(15, 30))]
        rels = junk + rels
    if kind == "no_usable_relation":
        rels = [(s, rng.choice(["teleporting", "zorbing", "quux"]), o) for s, _, o in rels]
    if kind == "no_relations":
        rels = []
    if kind == "no_known_objects":
        for o in objs:
            o["label"] = rng.choice(["unicorn", "qwerty", "zzz"])
    if kind == "spelling":
        # (c) endpoints resolved after cleaning: Man.1 finds man.1
        for k in range(len(objs)):
            if rng.random() < 0.5:
                spell[k] = rng.choice([str.upper, str.title, lambda s: s.replace(" ", "_")])
        for o in objs:
            if rng.random() < 0.3:
                o["label"] = rng.choice([o["label"].upper(), o["label"].replace(" ", "-"),
                                         " " + o["label"]])
    if kind == "tiny_boxes":
        # (d) boxes of a few pixels, where the +1-pixel IoU differs most
        for o in objs:
            o["box"] = jitter(rng, o["box"], 2)
    if kind == "outside":
        for o in objs:
            if rng.random() < 0.4:
                o["box"] = [o["box"][0] - rng.randint(1, 80), o["box"][1], o["box"][2] + rng.randint(1, 80),
                            o["box"][3]]
    if kind == "inverted":
        o = rng.choice(objs)
        o["box"] = [o["box"][2], o["box"][1], o["box"][0], o["box"][3]]
    if kind == "dangling":
        rels.insert(rng.randrange(len(rels) + 1), (0, rng.choice(vocab["predicates"]), None))
    if kind == "reversed":
        rels = [(o, p, s) for s, p, o in rels]
    if kind == "two_predicates" and rels:
        s, p, o = rng.choice(rels)
        rels.insert(rng.randrange(len(rels) + 1), (s, rng.choice(vocab["predicates"]), o))
    ids = [f"{o['label']}.{k + 1}" for k, o in enumerate(objs)]
    if kind == "duplicate_ids" and len(objs) > 1:
        # one object written with its neighbour's id
        j = rng.randrange(len(objs))
        ids[j] = ids[(j + 1) % len(objs)]
    if kind == "floats":
        for o in objs:
            o["box"] = [v + rng.choice([0.25, 0.5, 0.7]) for v in o["box"]]
    name = lambda k: "ghost.99" if k is None else spell.get(k, lambda s: s)(ids[k])
    body = {
        "objects": [{"id": i, "bbox": o["box"]} for i, o in zip(ids, objs)],
        "relationships": [{"subject": name(s), "predicate": p, "object": name(o)}
                          for s, p, o in rels],
    }
    if kind == "predicate_not_string" and body["relationships"]:
        body["relationships"][0]["predicate"] = 7
    if kind == "no_relationships_key":
        del body["relationships"]
    if kind == "bad_box":
        body["objects"][0]["bbox"] = body["objects"][0]["bbox"][:3]
    if kind == "extra_keys":
        body["note"] = {"confidence": 0.9}
        for o in body["objects"]:
            o["score"] = 0.5
    text = json.dumps(body, separators=(",", ":") if rng.random() < 0.5 else (", ", ": "))
    if kind == "truncated":
        return f"<think>ok</think><answer>{text[: rng.randint(1, len(text) - 1)]}"
    if kind == "json_word":
        text = text.replace("}", ', "jsonp": 1}', 1)
    if kind == "fence":
        return f"```json\n{text}\n```"
    if kind == "no_tags":
        return text
    if kind == "prose":
        return f"Here is the scene graph. <answer>{text}</answer> Hope this helps."
    if kind == "unclosed":
        return f"<answer>{text}"
    return f"<think>Objects first.</think><answer>{text}</answer>" if rng.random() < 0.5 \
        else f"<answer>{text}</answer>"


KINDS = (["copy"] * 4 + ["jitter"] * 5 + ["relabel"] * 3 + ["mixed"] * 6 + ["extra"] * 3
         + ["ranking", "oov_first", "oov_labels", "oov_labels", "no_usable_relation",
            "no_relations", "no_known_objects", "spelling", "spelling", "tiny_boxes", "tiny_boxes",
            "duplicate_ids", "outside", "inverted", "dangling", "reversed", "two_predicates",
            "floats", "predicate_not_string", "no_relationships_key", "bad_box", "extra_keys",
            "truncated", "json_word", "fence", "no_tags", "prose", "unclosed"])


def records(rng, vocab, count, prefix):
    out = []
    for i in range(count):
        w, h = rng.randint(120, 1024), rng.randint(120, 1024)
        gt_objs, gt_rels = ground_truth(rng, vocab["gt_objects"], vocab["gt_predicates"], w, h)
        kind = KINDS[i % len(KINDS)] if i < len(KINDS) else rng.choice(KINDS)
        text = answer(rng, vocab, gt_objs, gt_rels, w, h, kind)
        out.append({
            "image_id": f"{prefix}{i:04d}", "response": text,
            "gt_objects": dumps(gt_objs), "gt_relationships": dumps(gt_rels),
            "box_scale": [1000.0, 1000.0], "width": w, "height": h, "kind": kind,
        })
    return out


# ---------------------------------------------------------------------------------------------
# R1-SGG's evaluation and rewards on the records.


def evaluate(root, dataset, recs, tmp, dataset_rows):
    """`sgg_gather_preds.py` then `vg150_eval.py`, as R1-SGG runs them, on `recs`."""
    from src.utils import sgg_eval

    folder = Path(tmp) / f"{dataset}_records"
    folder.mkdir()
    for r in recs:
        record = {k: r[k] for k in ("image_id", "response", "gt_objects", "gt_relationships",
                                    "box_scale")}
        (folder / f"{r['image_id']}.json").write_text(json.dumps(record))
    dataset_rows[0] = [{"image_id": r["image_id"], "image": Image(r["width"], r["height"]),
                        "objects": r["gt_objects"], "relationships": r["gt_relationships"]}
                       for r in recs]
    gathered = Path(tmp) / f"{dataset}_sgg_pred_results.json"
    _, gather_log = run_main(Path(root) / "src/sgg_gather_preds.py",
                             ["psg" if dataset == "psg" else "vg", folder, gathered])
    fails = re.search(r"fails: \[(\d+), (\d+)\]", gather_log)

    # Per image: whether SggEvaluator counted it, and its R@K; the result dict before reset().
    per_image = []
    original = sgg_eval.evaluate_relation_of_one_image

    def traced(groundtruth, prediction, global_container, evaluator):
        recall = global_container["result_dict"]["sgdet_recall"]
        before = len(recall[20])
        names = original(groundtruth, prediction, global_container, evaluator)
        per_image.append([recall[k][-1] for k in (20, 50, 100)] if len(recall[20]) > before
                         else None)
        return names

    results = []
    accumulate = sgg_eval.SggEvaluator.accumulate

    def keep_results(self):
        out = accumulate(self)
        results.append(copy.deepcopy(self.sgg_result_dict))
        return out

    sgg_eval.evaluate_relation_of_one_image = traced
    sgg_eval.SggEvaluator.accumulate = keep_results
    try:
        name = "JosephZ/psg_test_sg" if dataset == "psg" else "JosephZ/vg150_val_sgg_prompt"
        scope, eval_log = run_main(Path(root) / "src/vg150_eval.py", [name, gathered])
    finally:
        sgg_eval.evaluate_relation_of_one_image = original
        sgg_eval.SggEvaluator.accumulate = accumulate
    order = list(json.loads(gathered.read_text()).keys())
    assert len(order) == len(per_image), (len(order), len(per_image))
    recall_of = dict(zip(order, per_image))
    import numpy as np

    r = results[0]
    mean_recall = {str(k): r["sgdet_mean_recall"][k] for k in (20, 50, 100)}
    summary = {
        "images": int(fails.group(2)),
        "failures": int(fails.group(1)),
        "recall": {str(k): float(np.mean(r["sgdet_recall"][k])) for k in (20, 50, 100)},
        "recall_images": len(r["sgdet_recall"][20]),
        "mean_recall": mean_recall,
        "per_predicate": {str(k): r["sgdet_mean_recall_list"][k] for k in (20, 50, 100)},
        "triplet_recall": float(np.mean(scope["ngR"])),
        "triplet_mean_recall": float(np.mean([np.mean(v) for v in scope["mR"].values()])),
    }
    printed = [line for line in eval_log.splitlines() if line.startswith("SGG eval")
               or line.startswith("whole")]
    return summary, recall_of, printed


# Where this crate's rewards deliberately differ from R1-SGG's (src/reward/mod.rs gives each rule
# with the R1-SGG line it departs from), by code.
EXCLUSION_REASONS = {
    "format": "R1-SGG's format reward calls set() on the object dicts, which raises for any "
              "non-empty graph: ours checks the format rules",
    "outside": "a box beyond 0..1000: clipped to the image here, used as written there",
    "inverted": "an inverted box: no area here, a negative one there",
    "duplicate": "two objects with one cleaned id: relations name the first here (as R1-SGG's "
                 "evaluation), the last in R1-SGG's rewards (a dict keeps the last)",
    "json": "the text 'json' inside the answer: R1-SGG's extract_answer_content deletes it",
    "dangling": "a relation naming an undefined object: it counts nothing here, R1-SGG's "
                "KeyError zeroes the hard and relaxed edge rewards",
    "whitespace": "whitespace before an id's '.': trimmed here, kept in R1-SGG's label",
    "raw_gt": "a ground-truth label written uncleaned (PSG's door-stuff): R1-SGG's node rewards "
              "and soft edge compare it raw with the cleaned prediction; we clean both",
}
EVERY_REWARD = ["node_acc", "node_box", "edge_soft", "edge_hard", "edge_relax"]


def reward_exclusions(r, r1):
    """The rewards where our rules differ from R1-SGG's for this answer: reward -> reason code."""
    out = {"format": "format"}
    clean = r1["refine_node_edge"]
    if any(clean(o["id"]) != o["id"] for o in json.loads(r["gt_objects"])):
        out.update({n: "raw_gt" for n in ("node_acc", "node_box", "edge_soft")})
    if "json" in r["response"].replace("```json", ""):
        out.update({n: "json" for n in EVERY_REWARD})
    try:
        body = json.loads(r1["extract_answer_content"](r["response"]))
        objects = body["objects"]
        ids = [clean(o["id"]) for o in objects]
        boxes = [o["bbox"] for o in objects]
        assert all(len(b) == 4 for b in boxes)
        float(sum(sum(b) for b in boxes))
    except Exception:
        return out  # unreadable objects: every reward 0 on both sides
    for code, hit in (
        ("outside", any(not 0 <= v <= BOX_UNITS for b in boxes for v in b)),
        ("inverted", any(b[0] > b[2] or b[1] > b[3] for b in boxes)),
        ("duplicate", len(set(ids)) != len(ids)),
        ("whitespace", any(i.split(".")[0] != i.split(".")[0].strip() for i in ids)),
    ):
        if hit:
            out.update({n: code for n in EVERY_REWARD if n not in out})
    try:
        relations = body["relationships"]
        dangling = any(clean(rel[end]) not in ids for rel in relations for end in ("subject", "object"))
    except Exception:
        dangling = False
    if dangling:
        out.update({n: "dangling" for n in ("edge_hard", "edge_relax") if n not in out})
    return out


def rewards(r1, recs):
    functions = {
        "format": "format_reward", "node_acc": "node_acc_reward", "node_box": "node_box_reward",
        "edge_soft": "edge_reward", "edge_hard": "edge_hard_reward",
        "edge_relax": "edge_hard_relax_reward",
    }
    import numpy as np

    out = {}
    for r in recs:
        w, h = r["width"], r["height"]
        gt = {
            # Boxes normalized as this crate stores them: the f32 nearest v / side.
            "objects": [{"id": o["id"],
                         "bbox": [float(np.float32(v / s)) for v, s in zip(o["bbox"], (w, h, w, h))]}
                        for o in json.loads(r["gt_objects"])],
            "relationships": json.loads(r["gt_relationships"]),
        }
        values = {}
        for key, f in functions.items():
            args = dict(completions=[[{"content": r["response"]}]], solution=[copy.deepcopy(gt)],
                        image_id=[0], task_type_list=["sgg"], box_scale=[r["box_scale"]])
            if key == "format":
                args.pop("solution"), args.pop("box_scale")
            values[key] = float(r1[f](**args)[0])
        out[r["image_id"]] = {"r1_sgg": values, "excluded": reward_exclusions(r, r1)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r1-sgg", required=True, help=f"checkout of gpt4vision/R1-SGG at {R1_SGG_COMMIT}")
    parser.add_argument("--wordnet", required=True, help="WordNet 3.0's dict folder (Debian: /usr/share/wordnet)")
    args = parser.parse_args()
    root = Path(args.r1_sgg).resolve()
    check_files(root, R1_SGG_FILES, f"R1-SGG commit {R1_SGG_COMMIT}")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NLTK_DATA"] = str(nltk_data_dir(args.wordnet, tmp))
        dataset_rows = [[]]
        install_stubs(dataset_rows)
        sys.path[:0] = [str(root), str(root / "src")]
        os.chdir(root)  # R1-SGG opens src/psg_categories.json and src/utils/*.pytorch relatively
        import warnings

        warnings.filterwarnings("ignore")
        from nltk.corpus import wordnet as wn
        from utils.wordnet import find_synonym_map
        import nltk
        import numpy
        import torch

        vg_syn = ast.parse((root / "src/vg_synonyms.py").read_text())
        lists = {n.targets[0].id: ast.literal_eval(n.value) for n in vg_syn.body
                 if isinstance(n, ast.Assign)}
        psg = json.loads((root / "src/psg_categories.json").read_text())
        header = {
            "format": 1, "r1_sgg_commit": R1_SGG_COMMIT,
            "r1_sgg_files": R1_SGG_FILES, "nltk": nltk.__version__, "wordnet_version": wn.get_version(),
            "wordnet_source": "Debian wordnet-base, wordnet-sense-index 1:3.0-37",
            "wordnet_files": WORDNET_FILES,
        }
        wn.ensure_loaded()
        sets, tables = write_asset(wn, lists, psg, header)
        rng = random.Random(20251207)
        samples = wordnet_samples(wn, find_synonym_map, sets, tables, lists, rng)
        FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
        (FIXTURE_DIR / "wordnet_samples.json").write_text(
            json.dumps({**header, "columns": ["word"] + list(sets), "samples": samples},
                       ensure_ascii=False, separators=(",", ":")).replace("],[", "],\n[") + "\n")
        print(f"wordnet_samples.json: {len(samples)} words")

        versions = {**header, "torch": torch.__version__, "numpy": numpy.__version__,
                    "scipy": metadata.version("scipy"), "pycocotools": metadata.version("pycocotools"),
                    "similarity": "exact match (spaCy replaced)"}
        r1 = load_rewards(root)
        vocabularies = {
            "vg150": {"objects": lists["VG150_OBJ_CATEGORIES"][1:],
                      "predicates": lists["VG150_PREDICATES"][1:]},
            "psg": {"objects": psg["thing_classes"] + psg["stuff_classes"],
                    "predicates": psg["predicate_classes"]},
        }
        for name, count in (("vg150", 200), ("psg", 70)):
            vocab = dict(vocabularies[name])
            vocab["gt_objects"], vocab["gt_predicates"] = vocab["objects"], vocab["predicates"]
            recs = records(rng, vocab, count, f"{name}-")
            summary, recall_of, printed = evaluate(root, name, recs, tmp, dataset_rows)
            reward_values = rewards(r1, recs)
            folder = FIXTURE_DIR / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "records.jsonl").write_text(
                "".join(dumps({k: v for k, v in r.items() if k != "kind"}) + "\n" for r in recs))
            per_image = {r["image_id"]: {"kind": r["kind"], "recall": recall_of[r["image_id"]],
                                         **reward_values[r["image_id"]]} for r in recs}
            expected = {**versions, "dataset": name, "exclusion_reasons": EXCLUSION_REASONS,
                        "summary": summary, "printed": printed, "images": per_image}
            (folder / "expected.json").write_text(json.dumps(expected, indent=0) + "\n")
            print(f"{name}: {len(recs)} records, R@K {summary['recall']}, "
                  f"mR@K {summary['mean_recall']}, failures {summary['failures']}")


if __name__ == "__main__":
    main()
