#!/usr/bin/env bash
# Every CPU op of the crate against PyTorch's CPU path (TRL's and
# transformers' code for each op), side by side, on an idle machine:
#
#   bash bench/cpu_versus_torch.sh [--rounds 5] [--threads "1 2"] [--calls 3]
#        [--cases "sample advantages"] [--out FILE] [--csv FILE | --no-csv]
#        [--dir DIR] [--reuse-dump] [--small]
#
# 1. builds and runs `benches/versus_torch.rs --dump DIR`: every case's
#    inputs and our outputs (DIR: $TMPDIR/versus_torch, about 5 GB at full
#    size; --reuse-dump keeps a dump of the same size that is there, whose
#    outputs came from the binary that wrote it);
# 2. `bench/torch/versus.py DIR --rounds 0`: PyTorch's outputs against ours
#    for every case, and TRL's transcribed lines against TRL's source; any
#    mismatch stops here, before anything is timed;
# 3. for each round, case and thread count N: ours and PyTorch's, each a
#    fresh process pinned by `taskset` to cores 0..N-1, one after the other
#    (who goes first alternates by round), each one untimed call then
#    --calls timed ones, printing one JSON line;
# 4. the markdown table (case, threads, ours and torch min / median, the
#    median of the per-round ratios torch / ours, minor faults per call and
#    peak RSS of each side) into --out (default
#    bench/cpu/logs/DATE-COMMIT-versus/results.md, the raw JSON lines beside
#    it), and rows appended to bench/data/kernels.csv (schema:
#    bench/data/README.md) citing that file.
#
# --small: tiny sizes, the pipeline's smoke test (defaults --rounds 1
# --threads 1 --calls 1: about a minute on an idle machine, most of it the
# 13 PyTorch processes importing torch and TRL; writes to $TMPDIR, appends
# no CSV rows unless --csv is given). The quicker smoke test, dump and
# comparison only (seconds), is the bench's self-test:
#   PYTHON=python3 cargo test --release --bench versus_torch
# or by hand:
#   cargo bench --bench versus_torch -- --small --dump /tmp/x
#   python3 bench/torch/versus.py /tmp/x --rounds 0
# PYTHON: the interpreter with torch 2.15, transformers and TRL 1.16
# (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds="" threads="" calls="" cases="" out="" csv=bench/data/kernels.csv dir="" small="" reuse=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --calls) calls=$2; shift 2 ;;
    --cases) cases=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --csv) csv=$2; csv_given=1; shift 2 ;;
    --no-csv) csv=""; shift ;;
    --dir) dir=$2; shift 2 ;;
    --small) small=--small; shift ;;
    --reuse-dump) reuse=1; shift ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
tmp=${TMPDIR:-/tmp}
# The commit measured: the tree the bench binary is built from, now.
commit=$(git rev-parse --short HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit+=+
if [ -n "$small" ]; then
  # One fresh process per case and side: each PyTorch one imports torch and TRL (seconds).
  rounds=${rounds:-1} threads=${threads:-1} calls=${calls:-1}
  dir=${dir:-$tmp/versus_torch_small}
  out=${out:-$tmp/versus_torch_small.md}
  [ -n "${csv_given:-}" ] || csv=""
else
  rounds=${rounds:-5} threads=${threads:-"1 2"} calls=${calls:-3}
  dir=${dir:-$tmp/versus_torch}
  out=${out:-bench/cpu/logs/$(date -u +%F)-$commit-versus/results.md}
fi
case "$(realpath -m "$out")" in
  "$(realpath -m "$dir")"/*) echo "--out must lie outside the dump directory $dir (a new dump replaces it)" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$out")"
raw=${out%.md}.jsonl
log=${out%.md}.log
: > "$raw"
: > "$log"

echo "== build"
bin=$(cargo bench --bench versus_torch --no-run 2>&1 | tee -a "$log" |
  sed -n 's/.*Executable .*versus_torch\.rs (\(.*\))$/\1/p')
[ -x "$bin" ] || { echo "versus_torch did not build (see $log)"; exit 1; }

echo "== inputs and our outputs: $dir"
want_small=$([ -n "$small" ] && echo true || echo false)
if [ -n "$reuse" ] && [ -f "$dir/meta.json" ] && grep -q "\"small\": $want_small" "$dir/meta.json"; then
  echo "reusing $dir (--reuse-dump)"
else
  rm -rf "$dir"
  "$bin" --dump "$dir" $small | tee -a "$log"
fi

echo "== PyTorch's outputs against ours (before any timing)"
"$py" bench/torch/versus.py "$dir" --rounds 0 2>&1 | tee -a "$log"

cases=${cases:-$("$bin" --list)}
ncpu=$(nproc)
for n in $threads; do
  [ "$n" -le "$ncpu" ] || { echo "--threads $n: this machine has $ncpu cores"; exit 1; }
done
echo "== timing: $rounds round(s) x $(wc -w <<< "$cases") case(s) x threads ($threads), $calls call(s) per process"
ours() { taskset -c "0-$(($2 - 1))" "$bin" --case "$1" --threads "$2" --rounds "$calls" "$dir"; }
theirs() { taskset -c "0-$(($2 - 1))" "$py" bench/torch/versus.py "$dir" --case "$1" --threads "$2" --rounds "$calls"; }
for r in $(seq 1 "$rounds"); do
  for c in $cases; do
    for n in $threads; do
      if [ $((r % 2)) -eq 1 ]; then order="ours theirs"; else order="theirs ours"; fi
      for side in $order; do
        $side "$c" "$n" 2>&1 | tee -a "$log" | grep '^{' | sed "s/^{/{\"round\": $r, /" >> "$raw"
      done
    done
  done
  echo "round $r done"
done

echo "== results"
report=("$py" bench/torch/versus.py --report "$raw" --meta "$dir/meta.json")
[ -z "$csv" ] || report+=(--csv "$csv" --source "$out" --commit "$commit")
"${report[@]}" | tee "$out"
echo "table: $out; JSON lines: $raw; log: $log"
