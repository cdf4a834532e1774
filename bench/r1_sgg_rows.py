#!/usr/bin/env python3
"""Rows of bench/data/r1_sgg.csv from the eval.jsonl an `r1-sgg` run writes.

    python3 bench/r1_sgg_rows.py RUN/sft-eval/eval.jsonl --machine "Intel Xeon 2-core AVX-512" \\
        --seed 1 --variant demo --stage sft >> bench/data/r1_sgg.csv

One row per evaluation record (a split of a stage). `--stage` names the
stage for files written by `r1-sgg eval` (whose records say "eval"); a
demo's eval.jsonl names its own (sft, grpo), and --stage then picks one.
`--commit` defaults to this checkout's HEAD and `--date` to today (UTC);
`--source` to the file's path as given. Prints the rows without a header;
the columns are read from the CSV's header. Standard library only.
"""
import argparse
import csv
import datetime
import json
import subprocess
import sys
from pathlib import Path

CSV = Path(__file__).resolve().parent / "data" / "r1_sgg.csv"
FIELDS = {"failure_rate": "failure_rate", "invalid_rate": "invalid_rate", "R@20": "R@20", "R@50": "R@50",
          "R@100": "R@100", "mR@50": "mR@50", "objects_found": "object_recall", "pairs_found": "pair_recall"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_jsonl", type=Path)
    ap.add_argument("--machine", required=True, help="where it ran, as in the CSV's other rows")
    ap.add_argument("--seed", required=True, type=int)
    ap.add_argument("--variant", required=True, help="'demo' plus the flags that differ (bench/data/README.md)")
    ap.add_argument("--stage", choices=("sft", "grpo"))
    ap.add_argument("--commit")
    ap.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    ap.add_argument("--source")
    a = ap.parse_args()
    commit = a.commit or subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=CSV.parent,
                                        check=True, capture_output=True, text=True).stdout.strip()
    with open(CSV, newline="") as f:
        columns = next(csv.reader(f))
    out = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
    n = 0
    for line in a.eval_jsonl.read_text().splitlines():
        r = json.loads(line)
        stage = r["stage"] if r["stage"] in ("sft", "grpo") else a.stage
        if stage is None:
            sys.exit(f"{a.eval_jsonl}: records of stage {r['stage']!r}: say which with --stage")
        if a.stage and stage != a.stage:
            continue
        row = dict(date=a.date, commit=commit, machine=a.machine, seed=a.seed, variant=a.variant, stage=stage,
                   split=r["eval"], images=r["images"], source=a.source or str(a.eval_jsonl))
        for col, key in FIELDS.items():
            row[col] = f"{r[key]:.6f}" if key in r else ""
        out.writerow(row)
        n += 1
    if n == 0:
        sys.exit(f"{a.eval_jsonl}: no evaluation of the stage asked for")


if __name__ == "__main__":
    main()
