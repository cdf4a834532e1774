#!/usr/bin/env bash
# Criterion before and after, in one run: every CPU op's own benchmarks
# (not the naive versions, floors or CUDA groups) from the crate at REV and
# from this tree, one after the other on the same machine, into one
# criterion directory, so that each "after" is compared with its "before":
#
#   bash bench/cpu/before_after.sh REV [--time SECONDS] [--filter REGEX]
#        [--out FILE] [--csv FILE | --no-csv]
#
# 1. REV's tree is exported (`git archive`) to $TMPDIR/gk-before-REV and
#    its benches built there (target dir: $BEFORE_TARGET_DIR, default
#    $TMPDIR/gk-before-target; seeding it with a copy of ./target saves
#    most of the build); this tree's benches are built as usual;
# 2. REV's binaries run with `--save-baseline before`, then this tree's
#    with `--baseline-lenient before` (a benchmark REV did not have is
#    measured, not compared), each with --warm-up-time 1 and
#    --measurement-time SECONDS (default 3), CRITERION_HOME shared;
# 3. the table (benchmark, before, after, after / before of criterion's
#    medians) goes to --out (default bench/cpu/logs/DATE-COMMIT-before-after/
#    results.md, the raw criterion output beside it), and two rows per
#    benchmark measured on both sides (impl `ours at REV`, `ours`; op: the
#    criterion ID) are appended to bench/data/kernels.csv.
#
# Benchmark IDs are the same across the bench files' split into one per
# family (benches/loss.rs held policy_loss, kl_k3 and advantages_group_norm),
# so REV may predate it. Run on an idle machine: the two sides are minutes
# apart, not interleaved.
set -euo pipefail
cd "$(dirname "$0")/../.."

[ $# -ge 1 ] || { sed -n '2,24p' "$0"; exit 2; }
rev=$1
shift
secs=3 out="" csv=bench/data/kernels.csv
filter='^(cpu_logprob/(forward|backward)|cpu_sampling/ours|policy_loss/(forward|backward)|kl_k3/(forward|backward)|advantages_group_norm/ours|cpu_fused_linear/forward(_backward)?/ours)/'
while [ $# -gt 0 ]; do
  case "$1" in
    --time) secs=$2; shift 2 ;;
    --filter) filter=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --csv) csv=$2; shift 2 ;;
    --no-csv) csv=""; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

tmp=${TMPDIR:-/tmp}
before=$(git rev-parse --short "$rev")
commit=$(git rev-parse --short HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit+=+
out=${out:-bench/cpu/logs/$(date -u +%F)-$commit-before-after/results.md}
mkdir -p "$(dirname "$out")"
out=$(realpath "$out")  # the old tree's build runs in another directory
log=${out%.md}.log
: > "$log"
home=$(mktemp -d "$tmp/gk-criterion-XXXX")

# The criterion bench executables cargo reports building in tree $1, one
# path per line (the others, such as fused_linear_loss.rs, have their own
# command lines).
bench_bins() {
  sed -n 's/.*Executable \(benches\/.*\.rs\) (\(.*\))$/\1 \2/p' | while read -r src bin; do
    if grep -q criterion_main "$1/$src"; then echo "$bin"; fi
  done
}

echo "== build: $before (before)"
tree=$tmp/gk-before-$before
rm -rf "$tree"
mkdir -p "$tree"
git archive "$rev" | tar -x -C "$tree"
old_bins=$(cd "$tree" && CARGO_TARGET_DIR=${BEFORE_TARGET_DIR:-$tmp/gk-before-target} \
  cargo bench -p grpo-kernels --no-run 2>&1 | tee -a "$log" | bench_bins "$tree")
echo "== build: $commit (after)"
new_bins=$(cargo bench -p grpo-kernels --no-run 2>&1 | tee -a "$log" | bench_bins .)

run() {
  local mode=$1
  shift
  for bin in "$@"; do
    echo "-- $(basename "$bin") $mode" | tee -a "$log"
    CRITERION_HOME=$home "$bin" --bench "$filter" "$mode" before \
      --warm-up-time 1 --measurement-time "$secs" 2>&1 | tee -a "$log" | grep -E '^[a-z_]+/|time:|change:' || true
  done
}
echo "== before ($before), then after ($commit): --measurement-time $secs"
# shellcheck disable=SC2086 # one path per word
run --save-baseline $old_bins
# shellcheck disable=SC2086
run --baseline-lenient $new_bins

echo "== results"
python3 - "$home" "$before" "$commit" "$out" "$csv" "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1) ($(nproc) cores)" "$(nproc)" <<'EOF'
import csv, datetime, json, pathlib, sys

home, before, after, out, csv_path, device, threads = sys.argv[1:]
def median_ns(d):
    return json.loads((d / "estimates.json").read_text())["median"]["point_estimate"]
def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"
rows = []
for new in sorted(pathlib.Path(home).rglob("new/estimates.json")):
    bench = new.parent.parent
    bid = json.loads((new.parent / "benchmark.json").read_text())["full_id"]
    old = bench / "before"
    rows.append((bid, median_ns(old) if (old / "estimates.json").exists() else None, median_ns(new.parent)))
lines = [f"Criterion medians, {before} (before) then {after} (after), one run on {device}.", "",
         "| benchmark | before | after | after / before |", "|---|---|---|---|"]
for bid, b, a in rows:
    lines.append(f"| `{bid}` | {fmt(b) if b else '—'} | {fmt(a)} | {f'{a / b:.2f}' if b else '—'} |")
pathlib.Path(out).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
if csv_path:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    with open(csv_path, "a", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        for bid, b, a in rows:
            if b is None:
                continue
            for impl, ns in ((f"ours at {before}", b), ("ours", a)):
                w.writerow([date, after, device, "", threads, bid, "", "", impl, "median",
                            f"{ns / 1e3:.7g}", "", "", "", out])
EOF
rm -rf "$home"
echo "table: $out; criterion output: $log"
