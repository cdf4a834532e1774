#!/usr/bin/env python3
"""GRPO's relative change of R@50 over its SFT checkpoint, image by image, with a
95% interval by the delta method (what the example's `RelativeGain` computes)
and, with --bootstrap, a percentile bootstrap over images beside it.

Usage: intervals.py SFT_EVAL_DIR GRPO_EVAL_DIR [--bootstrap]
(the folders `eval --out` wrote, with their predictions_eval_<split>.jsonl;
those files are a few MB each and are not kept here). Per-image recall is
recomputed from the predictions against the ground truth as written in them
(boxes rounded to 0..1000), so the means can differ from eval.jsonl's in the
second decimal."""
import json, re, random, sys

def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0])); iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    i = ix * iy; u = (a[2]-a[0])*(a[3]-a[1]) + (b[2]-b[0])*(b[3]-b[1]) - i
    return i / u if u > 0 else 0.0

cat = lambda i: i.rsplit('.', 1)[0]

def graph(text):
    m = re.search(r'<answer>(.*?)(</answer>|$)', text, re.S)
    body = m.group(1) if m else text
    try:
        g = json.loads(body)
        objs = {}
        for o in g['objects']:
            b = [min(1.0, max(0.0, float(v) / 1000)) for v in o['bbox']]
            objs.setdefault(o['id'], b)
        rels = [(r['subject'], r['predicate'], r['object']) for r in g['relationships']]
        return objs, [r for r in rels if r[0] in objs and r[2] in objs]
    except Exception:
        return None

def recalls(path, k=50):
    out = {}
    for line in open(path):
        r = json.loads(line)
        gt = graph('<answer>' + r['ground_truth'] + '</answer>')
        if not gt[1]:
            continue
        p = graph(r['prediction']) or ({}, [])
        hits = 0
        for s, q, o in gt[1]:
            hits += any(q == pq and cat(ps) == cat(s) and cat(po) == cat(o)
                        and iou(p[0][ps], gt[0][s]) >= .5 and iou(p[0][po], gt[0][o]) >= .5
                        for ps, pq, po in p[1][:k])
        out[r['id']] = hits / len(gt[1])
    return out

def main(sft_dir, grpo_dir, split, bootstrap, n=2000):
    a = recalls(f"{sft_dir}/predictions_eval_{split}.jsonl")
    b = recalls(f"{grpo_dir}/predictions_eval_{split}.jsonl")
    ids = sorted(a)
    xs, ys = [a[i] for i in ids], [b[i] for i in ids]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    r = my / mx
    se = (sum(((y - r * x) / mx) ** 2 for x, y in zip(xs, ys)) / (len(xs) * (len(xs) - 1))) ** 0.5
    print(f"{split}: SFT {100*mx:.2f}% GRPO {100*my:.2f}% change {100*(r-1):+.0f}% "
          f"+- {100*1.96*se:.0f}% (delta method, {len(ids)} images)")
    if not bootstrap:
        return
    rng = random.Random(0)
    gains = []
    for _ in range(n):
        pick = [rng.randrange(len(ids)) for _ in ids]
        sx = sum(xs[j] for j in pick); sy = sum(ys[j] for j in pick)
        gains.append(sy / sx - 1 if sx > 0 else float('inf'))
    gains.sort()
    lo, hi = gains[int(0.025 * n)], gains[int(0.975 * n)]
    print(f"{split}: bootstrap 95% interval {100*lo:+.0f}% .. {100*hi:+.0f}%")

if __name__ == "__main__":
    for sp in ("val", "test", "shifted"):
        main(sys.argv[1], sys.argv[2], sp, "--bootstrap" in sys.argv[3:])
