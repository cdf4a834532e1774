#!/usr/bin/env python3
"""The seeds table: SFT vs GRPO R@50 on 2048 images a split, per seed and
over seeds, from the `<setting>-s<seed>-{sft,grpo}.eval.jsonl` files here."""
import json, os, statistics as st

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"plain": "no stem", "stem": "3x3 stem, 16 channels"}
SPLITS = ("val", "test", "shifted")

def load(setting, seed, stage):
    path = f"{HERE}/{setting}-s{seed}-{stage}.eval.jsonl"
    if not os.path.exists(path):
        return None
    return {r["eval"]: r for r in map(json.loads, open(path))}

pct = lambda x: f"{100 * x:.2f}%"
rows, pooled = [], {}
for setting, label in SETTINGS.items():
    for seed in (0, 1, 2):
        sft, grpo = load(setting, seed, "sft"), load(setting, seed, "grpo")
        if sft is None or grpo is None:
            continue
        for split in SPLITS:
            x, y = sft[split], grpo[split]
            pooled.setdefault((label, split), []).append((x["R@50"], y["R@50"]))
            rows.append(
                f"| {label} | {seed} | {split} | {pct(x['R@50'])} | {pct(y['R@50'])} | "
                f"{100 * (y['R@50'] / x['R@50'] - 1):+.0f}% | {pct(x['invalid_rate'])} | {pct(y['invalid_rate'])} | "
                f"{pct(x['object_recall'])} | {pct(y['object_recall'])} | {pct(x['pair_recall'])} | {pct(y['pair_recall'])} |"
            )
print("| setting | seed | split | SFT R@50 | GRPO R@50 | change | SFT invalid | GRPO invalid "
      "| SFT objects found | GRPO objects found | SFT pairs found | GRPO pairs found |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
print()
print("| setting | split | seeds | SFT R@50, mean (sd) | GRPO R@50, mean (sd) | change of the means | per seed |")
print("|---|---|---|---|---|---|---|")
for (label, split), v in pooled.items():
    xs, ys = [a for a, _ in v], [b for _, b in v]
    sd = lambda z: pct(st.stdev(z)) if len(z) > 1 else "-"
    per_seed = ", ".join(f"{100 * (b / a - 1):+.0f}%" for a, b in v)
    print(f"| {label} | {split} | {len(v)} | {pct(st.mean(xs))} ({sd(xs)}) | {pct(st.mean(ys))} ({sd(ys)}) | "
          f"{100 * (st.mean(ys) / st.mean(xs) - 1):+.0f}% | {per_seed} |")
