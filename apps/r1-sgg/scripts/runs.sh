#!/usr/bin/env bash
# The runs behind the README's seed and sweep results, as commands:
#
#   runs.sh seed --out DIR --seed N [--eval-size 2048] [--sft "FLAGS"] [--grpo "FLAGS"]
#       One seed end to end: SFT, evaluation of its checkpoint, GRPO from
#       it, evaluation of the GRPO checkpoint. Both evaluations use the
#       same images (the seed's splits), so the two compare image by image.
#       Writes DIR/sft/, DIR/sft-eval/, DIR/grpo/, DIR/grpo-eval/.
#   runs.sh grpo --init SFT.safetensors --out DIR [--seed N] [--eval-size 512] [--grpo "FLAGS"]
#       One GRPO setting from an existing SFT checkpoint, then its
#       evaluation: a sweep's run. Writes DIR/grpo/, DIR/grpo-eval/.
#
# Both also take --threads N (RAYON_NUM_THREADS for every step) and
# --bin PATH (an r1-sgg binary; default: cargo builds it here). Each step
# logs to DIR/<step>.log, and SFT and GRPO to DIR/<step>.time when
# /usr/bin/time exists. Steps run one after another; to queue runs, chain
# them with && (or start two in the background and `wait`).
#
# The published runs used --threads 1, two runs side by side on two cores,
# and compared labels by exact match (they predate spaCy's similarity):
# add --label-similarity exact to --grpo to repeat them. The three seeds:
#   runs.sh seed --out runs/seeds/plain-s1 --seed 1 --threads 1
#   runs.sh seed --out runs/seeds/stem-s1 --seed 1 --threads 1 --sft "--pixel-stem 16"
# A fifth-sweep setting, from the stem's SFT checkpoint, on 2048 images:
#   runs.sh grpo --init runs/seeds/stem-s0/sft/sft.safetensors --out runs/k3t8 \
#       --eval-size 2048 --threads 1 --grpo "--temperature 0.8"
# Each evaluation's eval.jsonl becomes rows of bench/data/r1_sgg.csv with
# bench/r1_sgg_rows.py.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
fail() { echo "runs.sh: $*" >&2; exit 2; }

[ $# -gt 0 ] || { usage; exit 2; }
mode=$1; shift
case $mode in
  seed) eval_size=2048 ;;
  grpo) eval_size=512 ;;
  -h|--help) usage; exit 0 ;;
  *) fail "unknown command '$mode' (seed or grpo; see --help)" ;;
esac
out= seed=0 init= sft_flags= grpo_flags= bin=
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || fail "$1 needs a value"
  case $1 in
    --out) out=$2 ;;
    --seed) seed=$2 ;;
    --init) init=$2 ;;
    --eval-size) eval_size=$2 ;;
    --sft) sft_flags=$2 ;;
    --grpo) grpo_flags=$2 ;;
    --threads) export RAYON_NUM_THREADS=$2 ;;
    --bin) bin=$2 ;;
    *) fail "unknown option $1 (see --help)" ;;
  esac
  shift 2
done
[ -n "$out" ] || fail "--out is required"
if [ "$mode" = grpo ]; then
  [ -n "$init" ] || fail "grpo needs --init (an SFT checkpoint)"
  [ -f "$init" ] || fail "no checkpoint at $init"
  [ -z "$sft_flags" ] || fail "--sft applies to 'seed' only"
fi
if [ -z "$bin" ]; then
  root=$(cd "$(dirname "$0")/../../.." && pwd)
  (cd "$root" && cargo build --release -q -p r1-sgg)
  bin=${CARGO_TARGET_DIR:-$root/target}/release/r1-sgg
fi
[ -x "$bin" ] || fail "no r1-sgg binary at $bin"
mkdir -p "$out"

step() {  # name, command...: runs it with its output in $out/<name>.log
  local name=$1; shift
  echo "--- $name: $*"
  "$@" > "$out/$name.log" 2>&1 || { echo "runs.sh: $name failed, see $out/$name.log" >&2; exit 1; }
  grep -E '^(eval|sft|grpo) on ' "$out/$name.log" || true
}
timed() {  # the same, with /usr/bin/time -v's report in $out/<name>.time
  local name=$1; shift
  if [ -x /usr/bin/time ]; then step "$name" /usr/bin/time -v -o "$out/$name.time" "$@"; else step "$name" "$@"; fi
}

# The flags strings are split into words on purpose.
# shellcheck disable=SC2086
if [ "$mode" = seed ]; then
  timed sft "$bin" sft --seed "$seed" --out "$out/sft" $sft_flags
  init=$out/sft/sft.safetensors
  step sft-eval "$bin" eval --seed "$seed" --init "$init" --out "$out/sft-eval" --eval-size "$eval_size"
fi
# shellcheck disable=SC2086
timed grpo "$bin" grpo --seed "$seed" --init "$init" --out "$out/grpo" --eval-every 0 $grpo_flags
step grpo-eval "$bin" eval --seed "$seed" --init "$out/grpo/grpo.safetensors" --out "$out/grpo-eval" --eval-size "$eval_size"
echo "done: $out"
