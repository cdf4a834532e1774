#!/usr/bin/env python3
"""Renders the results tables of BENCHMARKS.md and apps/r1-sgg/README.md from
bench/data/kernels.csv and bench/data/r1_sgg.csv (schemas: bench/data/README.md).

A rendered table sits between two markers; everything outside them is
hand-written and left alone:

    <!-- table: KIND column=value column="a value|another" -->
    (generated)
    <!-- end table -->

KIND picks the CSV and the layout (the functions below). Each column=value
keeps the rows whose column equals one of the |-separated values.

    python3 bench/render.py           rewrite the tables in place
    python3 bench/render.py --check   exit 1, naming the tables, if a file
                                      differs from what the CSVs render (CI)

Standard library only; paths are relative to this file, so it runs from
any directory.
"""

import argparse
import csv
import difflib
import re
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
DOCS = ["BENCHMARKS.md", "apps/r1-sgg/README.md"]
MARKER = re.compile(r"^<!-- table: (.*?) -->\n(.*?)^<!-- end table -->$", re.M | re.S)

# op id -> (label, what the size counts, whether the size shows the dtype), in table order
OPS = {
    "logprob_fwd": ("token log-probs, forward", "", True),
    "logprob_bwd": ("token log-probs, backward", "", True),
    "logprob_fwd_bwd": ("token log-probs, fwd + bwd (in place)", "", True),
    "logprob_fwd_bwd_buf": ("token log-probs, fwd + bwd (dlogits into a buffer)", "", True),
    "grpo_step": ("GRPO step from logits (log-probs, loss + k3 KL, backward to dlogits)", "", True),
    "policy_loss_fwd": ("policy loss + k3, forward", "", False),
    "policy_loss_bwd": ("policy loss + k3, backward", "", False),
    "policy_loss_fwd_bwd": ("policy loss + KL, fwd + bwd, with stats", "tokens", False),
    "kl_k3_fwd": ("KL k3, forward", "", False),
    "kl_k3_bwd": ("KL k3, backward", "", False),
    "kl_k3_fwd_bwd": ("KL k3, fwd + bwd", "", False),
    "advantages": ("group advantages", "rewards", False),
    "sample_temperature": ("sampling, temperature", "", True),
    "sample_topk50_topp09": ("sampling, top-k 50 + top-p 0.9", "", True),
    "sample_topp09": ("sampling, top-p 0.9", "", True),
    "fused_linear_fwd": ("fused linear log-probs, forward", "", True),
    "fused_linear_fwd_bwd": ("fused linear log-probs, fwd + bwd", "", True),
    "fused_linear_loss_fwd_bwd": ("fused LM head + GRPO loss, fwd + bwd (one pass, 3 GEMMs)", "", True),
    "candle_grpo_step": ("candle GRPO step (log-probs, loss + k3, backward)", "", True),
    "qwen2vl_sft_step": ("Qwen2-VL SFT step", "", True),
}
GEMM_FLOORS = {"GEMM": ("torch GEMM alone", "of the GEMM"), "3 GEMMs": ("torch's 3 GEMMs alone", "of the GEMMs")}
CPU_TARGET = 5.0  # ours >= 5x the naive version, or
GEMM_TARGET = 1.5  # a fused linear op within 1.5x of the GEMMs it must do
WAS_CHANGE = 0.25  # the CPU table shows a ratio's previous value when it moved by more than this


def load(name):
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


def select(rows, filters):
    return [r for r in rows if all(r[k] in v.split("|") for k, v in filters.items())]


def num(s):
    return float(s) if s != "" else None


def table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- formats

def t3(us):
    """A time to three significant digits in the unit that keeps it in [1, 1000)."""
    for unit, scale in (("s", 1e6), ("ms", 1e3), ("µs", 1.0), ("ns", 1e-3)):
        if us >= scale or unit == "ns":
            v = us / scale
            return f"{v:.0f} {unit}" if v >= 99.95 else f"{v:.1f} {unit}" if v >= 9.995 else f"{v:.2f} {unit}"


def ms3(us):
    return f"{us / 1e3:.3f} ms"


def times(x):
    return f"{x:.2f}x" if x < 1.095 else f"{x:.1f}x"


def pct(x, digits=1):
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def size(r):
    label, unit, dtype = OPS[r["op"]]
    s = r["shape"].replace("x", " x ")
    return s + (f" {unit}" if unit else "") + (f" {r['dtype']}" if dtype and r["dtype"] else "")


def by_op(rows):
    order = list(OPS)
    return sorted(rows, key=lambda r: order.index(r["op"]))  # stable: CSV order within an op


def same_run(a, b):
    return all(a[k] == b[k] for k in ("date", "commit", "device", "op", "dtype", "shape"))


# ---------------------------------------------------------------- kernel tables

def kernels_compare(rows, _all):
    """GPU: ours against each baseline measured in the same session; an op
    with no baseline but a GEMM floor is shown against its GEMMs."""
    body = []
    for ours in by_op([r for r in rows if r["impl"] == "ours"]):
        t, floor, kind = num(ours["time_us"]), num(ours["floor_us"]), ours["floor"]
        if floor is None:
            vs_floor = "—"
        elif kind == "bytes":
            vs_floor = f"{t / floor:.2f}"
        elif kind == "pass":
            vs_floor = f"{t / floor:.1f} passes"
        elif kind in GEMM_FLOORS:
            vs_floor = f"{t / floor:.2f} {GEMM_FLOORS[kind][1]}"
        else:
            vs_floor = f"{t / floor:.2f} of a copy"
        label = OPS[ours["op"]][0]
        bases = [r for r in rows if r["impl"] != "ours" and same_run(r, ours)]
        for b in bases:
            name = b["impl"] + (f" (peak {int(b['peak_bytes']) / 2**30:.1f} GiB)" if b["peak_bytes"] else "")
            tb = num(b["time_us"])
            body.append([label, size(ours), ms3(t), name, ms3(tb), times(tb / t), vs_floor])
        if not bases and kind in GEMM_FLOORS:
            body.append([label, size(ours), ms3(t), GEMM_FLOORS[kind][0], ms3(floor), "—", vs_floor])
    return table(["op", "size", "ours", "baseline", "theirs", "speedup", "ours / floor"], body)


def cpu_ratio(ours, rows):
    """(ratio, higher is better) of ours against its naive version or its GEMMs."""
    if ours["floor"] in GEMM_FLOORS:
        return num(ours["time_us"]) / num(ours["floor_us"]), False
    naive = [r for r in rows if r["impl"] == "naive" and same_run(r, ours)]
    if not naive:
        return None, True
    return num(naive[-1]["time_us"]) / num(ours["time_us"]), True


def kernels_cpu(rows, all_rows):
    """CPU: the latest run of each op against its naive single-threaded
    version (fused linear: against its GEMMs), with the issue's target, and
    the previous run's ratio on the same machine where it moved."""
    latest = {}
    for r in rows:
        if r["impl"] == "ours" and r["time_us"]:
            latest[(r["op"], r["dtype"], r["shape"])] = r
    body = []
    for ours in by_op(list(latest.values())):
        t = num(ours["time_us"])
        ratio, higher = cpu_ratio(ours, all_rows)
        if ours["floor"] in GEMM_FLOORS:
            naive = f"{GEMM_FLOORS[ours['floor']][0].split(' ', 1)[1]} {t3(num(ours['floor_us']))}"
            speed = f"{ratio:.2f}x {GEMM_FLOORS[ours['floor']][1]}"
            target = f"≤ {GEMM_TARGET}x " + ("✓" if ratio <= GEMM_TARGET else "✗")
        elif ratio is not None:
            naive_row = [r for r in all_rows if r["impl"] == "naive" and same_run(r, ours)][-1]
            naive, speed = t3(num(naive_row["time_us"])), f"{ratio:.1f}x"
            target = f"≥ {CPU_TARGET:.0f}x " + ("✓" if ratio >= CPU_TARGET else "✗")
        else:
            naive = speed = target = "—"
        if ratio is not None:
            idx = all_rows.index(ours)
            prev = [r for r in all_rows[:idx] if r["impl"] == "ours" and r["device"] == ours["device"]
                    and (r["op"], r["dtype"], r["shape"]) == (ours["op"], ours["dtype"], ours["shape"])]
            if prev:
                was, _ = cpu_ratio(prev[-1], all_rows)
                if was is not None and abs(ratio / was - 1) > WAS_CHANGE:
                    target += f" (was {was:.2f}x at {prev[-1]['commit']})" if not higher else f" (was {was:.1f}x at {prev[-1]['commit']})"
        body.append([OPS[ours["op"]][0], size(ours), t3(t), naive, speed, target])
    return table(["op", "size", "ours", "naive", "speedup", "target"], body)


def kernels_versus(rows, _all):
    """Two implementations of one step: time and peak extra memory, and their ratios."""
    ours = [r for r in rows if r["impl"] == "ours"][-1]
    other = [r for r in rows if r["impl"] != "ours"][-1]
    mib = lambda r: f"{int(r['peak_bytes']) / 2**20:.0f} MiB"
    body = [[r["impl"], t3(num(r["time_us"])), mib(r)] for r in (ours, other)]
    body.append(["ratio", f"{num(other['time_us']) / num(ours['time_us']):.1f}x faster",
                 f"{int(other['peak_bytes']) / int(ours['peak_bytes']):.1f}x less"])
    return table(["step", "time", "peak extra memory"], body)


def kernels_threads(rows, _all):
    """One step at each thread count: every implementation, and the first
    against the last."""
    rows = [r for r in rows if r["time_us"]]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    body = []
    for threads in dict.fromkeys(r["threads"] for r in rows):
        t = {r["impl"]: num(r["time_us"]) for r in rows if r["threads"] == threads}
        body.append([threads] + [t3(t[i]) for i in impls] + [f"{t[impls[0]] / t[impls[-1]]:.2f}"])
    return table(["threads"] + impls + [f"{impls[0]} / {impls[-1]}"], body)


def kernels_torch_cpu(rows, _all):
    """CPU: ours against PyTorch eager running TRL's and transformers' code
    for each op (bench/cpu_versus_torch.sh: fresh processes, interleaved),
    per thread count: min and median per call, PyTorch / ours of the
    medians, and each side's peak RSS (the whole process)."""
    key = lambda r: (r["op"], r["dtype"], r["shape"], r["threads"])
    ours = {}
    for r in rows:
        if r["impl"].startswith("ours"):
            ours.setdefault(key(r), {})[r["stat"]] = r
    body = []
    for k in sorted(ours, key=lambda k: (list(OPS).index(k[0]), k[1], int(k[3]))):
        mine = ours[k]
        theirs = {r["stat"]: r for r in rows if key(r) == k and r["impl"].startswith("PyTorch")}
        if "median" not in mine or "median" not in theirs:
            continue
        o, t = mine["median"], theirs["median"]
        pair = lambda d: f"{t3(num(d['min']['time_us']))} / {t3(num(d['median']['time_us']))}" if "min" in d \
            else t3(num(d["median"]["time_us"]))
        mb = lambda r: f"{int(r['peak_bytes']) / 1e6:.0f} MB" if r["peak_bytes"] else "—"
        form = o["impl"][len("ours ("):-1] if o["impl"].startswith("ours (") else "—"
        body.append([OPS[k[0]][0], size(o), k[3], f"`{form}`", pair(mine), t["impl"], pair(theirs),
                     times(num(t["time_us"]) / num(o["time_us"])), f"{mb(o)} / {mb(t)}"])
    return table(["op", "size", "threads", "our form", "ours min / median", "baseline", "its min / median",
                  "its median / ours", "peak RSS ours / its"], body)


def kernels_before_after(rows, _all):
    """CPU: criterion's median of each CPU op's benchmark from an earlier
    commit (impl `ours at REV`) and from the run's commit (`ours`), measured
    one after the other (bench/cpu/before_after.sh); op is criterion's ID."""
    after = {r["op"]: r for r in rows if r["impl"] == "ours"}
    body = []
    for b in rows:
        a = after.get(b["op"])
        if b["impl"].startswith("ours at ") and a:
            tb, ta = num(b["time_us"]), num(a["time_us"])
            body.append([f"`{b['op']}`", t3(tb), t3(ta), f"{ta / tb:.2f}"])
    before = next((r["impl"][len("ours at "):] for r in rows if r["impl"].startswith("ours at ")), "?")
    after_commit = rows[0]["commit"] if rows else "?"
    return table(["criterion benchmark", f"before ({before})", f"after ({after_commit})", "after / before"], body)


# ---------------------------------------------------------------- R1-SGG tables

STAGE = {"sft": "SFT", "grpo": "SFT + GRPO"}
SPLITS = ("val", "test", "shifted")


def r1sgg_evals(rows, _all):
    """One run's evaluations, stage by stage and split by split."""
    cols = ["failure_rate", "invalid_rate", "R@20", "R@50", "R@100", "mR@50", "objects_found", "pairs_found"]
    body = [[STAGE[r["stage"]], r["split"]] + [pct(num(r[c])) for c in cols] for r in rows]
    return table(["stage", "split", "failure rate", "invalid", "R@20", "R@50", "R@100", "mR@50",
                  "objects found", "pairs found"], body)


def r1sgg_seeds(rows, _all):
    """GRPO against SFT over seeds: R@50's mean (sd) at each stage, the
    change of the means, and each seed's change (a seed's two checkpoints
    are evaluated on the same images)."""
    body = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for split in SPLITS:
            pick = {(r["seed"], r["stage"]): num(r["R@50"]) for r in rows if r["variant"] == variant and r["split"] == split}
            seeds = sorted({s for s, st in pick if (s, "sft") in pick and (s, "grpo") in pick}, key=int)
            x, y = [pick[s, "sft"] for s in seeds], [pick[s, "grpo"] for s in seeds]
            sd = lambda v: pct(statistics.stdev(v), 2) if len(v) > 1 else "—"
            per_seed = ", ".join(f"{100 * (b / a - 1):+.0f}%" for a, b in zip(x, y))
            body.append([f"`{variant}`", split, ", ".join(seeds),
                         f"{pct(statistics.mean(x), 2)} ({sd(x)})", f"{pct(statistics.mean(y), 2)} ({sd(y)})",
                         f"{100 * (statistics.mean(y) / statistics.mean(x) - 1):+.0f}%", per_seed])
    return table(["setting", "split", "seeds", "SFT R@50, mean (sd)", "GRPO R@50, mean (sd)",
                  "change of the means", "per seed"], body)


KINDS = {
    "kernels-compare": ("kernels.csv", kernels_compare),
    "kernels-cpu": ("kernels.csv", kernels_cpu),
    "kernels-versus": ("kernels.csv", kernels_versus),
    "kernels-threads": ("kernels.csv", kernels_threads),
    "kernels-torch-cpu": ("kernels.csv", kernels_torch_cpu),
    "kernels-before-after": ("kernels.csv", kernels_before_after),
    "r1sgg-evals": ("r1_sgg.csv", r1sgg_evals),
    "r1sgg-seeds": ("r1_sgg.csv", r1sgg_seeds),
}


def render(text, where):
    cache = {}

    def fill(m):
        kind, *args = shlex.split(m.group(1))
        if kind not in KINDS:
            sys.exit(f"{where}: unknown table kind {kind!r} (known: {', '.join(KINDS)})")
        source, fn = KINDS[kind]
        all_rows = cache.setdefault(source, load(source))
        filters = dict(a.split("=", 1) for a in args)
        unknown = set(filters) - set(all_rows[0])
        if unknown:
            sys.exit(f"{where}: {m.group(1)!r} filters on no column of {source}: {', '.join(sorted(unknown))}")
        rows = select(all_rows, filters)
        if not rows:
            sys.exit(f"{where}: {m.group(1)!r} selects no row of {source}")
        return f"<!-- table: {m.group(1)} -->\n{fn(rows, all_rows)}<!-- end table -->"

    return MARKER.sub(fill, text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    args = ap.parse_args()
    stale = []
    for doc in DOCS:
        path = ROOT / doc
        old = path.read_text()
        new = render(old, doc)
        if new == old:
            continue
        if args.check:
            stale.append(doc)
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), doc, f"{doc} (rendered)"))
        else:
            path.write_text(new)
            print(f"rendered {doc}")
    if stale:
        sys.exit(f"out of date with bench/data/*.csv: {', '.join(stale)} (run python3 bench/render.py)")


if __name__ == "__main__":
    main()
