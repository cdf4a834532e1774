#!/usr/bin/env bash
# Runs on a GPU machine, from the repository root, over binaries built
# elsewhere by bench/gpu/build.sh (the GPU machine has no cargo):
#
#     bash bench/gpu/run.sh [parity] [sanitizer] [bench] [compare] [r1sgg]
#
# parity:    every CUDA parity suite (tests/cuda/<family>.rs, the candle
#            CUDA tests in tests/cuda/candle.rs), one family at a time, with
#            --include-ignored (they are #[ignore = "needs a CUDA device"])
# sanitizer: the parity suites under compute-sanitizer memcheck and
#            racecheck, on the smaller cases (GK_SANITIZER=1)
# bench:     the criterion benches' CUDA groups (names containing "cuda")
# compare:   benches/compare_torch.py: PyTorch and Liger-Kernel, same GPU
# r1sgg:     the R1-SGG demo, GPU preset, --device cuda (short schedule:
#            step time, tokens per second and peak GPU memory, not a
#            training result)
# qwen2vl:   one SFT step of Qwen2-VL-2B's real config (random weights,
#            bf16, 8 samples x 1024 tokens with a 448x448 image each):
#            ours (criterion, plain and checkpointed) against transformers
#            with sdpa (its wheel in .whl/), GPU memory sampled for both
# qwen2vl-grpo: one GRPO step of Qwen2-VL-2B's real config (random weights,
#            bf16): 8 prompts of 1024 tokens (a 448x448 image each) x 8
#            completions x 256 new tokens. Ours (the rollout from the shared
#            prompt cache; the update through the fused log-probs, BNPO,
#            checkpointed, AdamW with f32 moments and master weights) against
#            transformers' generate (same sampling) and TRL's GRPO loss path
#            on the very same completions and advantages (the trl wheel in
#            .whl/); GPU memory sampled for both. Needs .gpu/app_bench_qwen2_vl_grpo.
# GK_ONLY=<regex> keeps the test families (modules of tests/cuda/) and the
# bench binaries whose names match (e.g. GK_ONLY='advantages|fused_linear').
# Results (logs, criterion medians, comparisons, metrics) go to ./gpu-out,
# and, under the device tool (which returns only a few files from $OUT),
# into $OUT/results.tar.gz, repacked after every command so a run stopped
# at its time limit still returns what it did. Each command is stopped
# after GK_STEP_LIMIT seconds (default 600), so one hang cannot eat the
# session.
# A session worth keeping: its text logs (no JSONL, no pictures) go to
# bench/gpu/logs/<date>-<device>-<commit>/, and the figures the documents
# publish become rows of bench/data/kernels.csv (then python3 bench/render.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=.gpu
out=gpu-out
mkdir -p "$out"
# Written under a temporary name and renamed, so two instances side by side
# (say parity and sanitizer) never leave a torn archive.
pack() { [ -z "${OUT:-}" ] || { tar -czf "$OUT/.results.$$" -C "$out" . && mv -f "$OUT/.results.$$" "$OUT/results.tar.gz"; }; }
only() { grep -E "${GK_ONLY:-.}" || true; }  # families or binaries to run, filtered by GK_ONLY
# The test families: the modules of tests/cuda/ (each runs as `test_cuda <family>::`).
families=$(ls tests/cuda/*.rs | xargs -n1 basename | sed 's/\.rs$//' | grep -v '^main$')
steps=${*:-parity sanitizer bench compare}
status=0

# CUDA libraries (cuBLAS) live under the image's CUDA and PyTorch folders.
libs=$(find / -name 'libcublas.so.13*' -not -path '*/proc/*' 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  echo "commit: $(cat $bin/COMMIT 2>/dev/null)"
  echo "date: $(date -u +%FT%TZ)"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
} | tee "$out/device.txt"
pack

run() {  # name, command...: logs to $out/name.log, remembers failures
  local name=$1; shift
  echo "--- $name: $*"
  timeout -s INT -k 10 "${GK_STEP_LIMIT:-600}" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -E '^test result|FAILED|ERROR SUMMARY' "$out/$name.log" | head -20
  grep -A1 'panicked' "$out/$name.log" | head -12
  [ $rc -eq 0 ] || { echo "!!! $name failed (rc $rc)"; status=1; }
  pack
}

for step in $steps; do
  case $step in
    parity)
      for f in $(only <<< "$families"); do
        run "parity_$f" $bin/test_cuda --include-ignored --test-threads=1 "$f::"
      done ;;
    sanitizer)
      for f in $(only <<< "$families"); do
        [ "$f" = candle ] && continue  # candle's own kernels are not ours to check
        for tool in memcheck racecheck; do
          GK_SANITIZER=1 run "sanitizer_${tool}_$f" \
            compute-sanitizer --tool $tool --error-exitcode 9 $bin/test_cuda --include-ignored --test-threads=1 "$f::"
        done
      done ;;
    bench)
      for b in $(ls $bin/bench_* | only); do
        GK_BENCH_GROUPS=cuda run "$(basename "$b")" "$b" --bench cuda --warm-up-time 1 --measurement-time 3 --noplot
      done
      # Criterion's medians, one line per bench (group/function/parameter).
      python3 - target/criterion > "$out/criterion_medians.tsv" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
for f in sorted(root.glob("**/new/estimates.json")):
    ns = json.loads(f.read_text())["median"]["point_estimate"]
    print(f"{f.parent.parent.relative_to(root)}\t{ns:.1f} ns")
PY
      pack ;;
    compare)
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      fi
      run compare python3 benches/compare_torch.py --criterion target/criterion --out "$out/compare.json"
      tail -25 "$out/compare.log" ;;
    qwen2vl)
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      fi
      cfg=apps/r1-sgg/fixtures/qwen2_vl/configs/qwen2-vl-2b-instruct.json
      batch=/tmp/qwen2vl-batch.safetensors
      python3 apps/r1-sgg/scripts/qwen2_vl_bench_batch.py --config $cfg --out $batch --samples 8 --tokens 1024 --image-side 448
      mkdir -p "$out/qwen2vl"
      # GPU memory in use, one sample a second, through each side's run.
      nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -l 1 > "$out/qwen2vl/memory_ours.csv" &
      smi=$!
      QWEN2VL_BENCH_CONFIG=$cfg QWEN2VL_BENCH_BATCH=$batch QWEN2VL_BENCH_DEVICE=cuda QWEN2VL_BENCH_DTYPE=bf16 \
        run qwen2vl_ours $bin/app_bench_qwen2_vl_sft --bench --warm-up-time 2 --measurement-time 20 --noplot
      kill $smi
      nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -l 1 > "$out/qwen2vl/memory_torch.csv" &
      smi=$!
      run qwen2vl_torch python3 apps/r1-sgg/scripts/qwen2_vl_sft_torch.py --config $cfg --batch $batch \
        --device cuda --dtype bfloat16 --attn sdpa --warmup 2 --steps 10
      kill $smi
      tail -5 "$out"/qwen2vl_*.log ;;
    qwen2vl-grpo)
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      fi
      cfg=apps/r1-sgg/fixtures/qwen2_vl/configs/qwen2-vl-2b-instruct.json
      prompts=/tmp/qwen2vl-prompts.safetensors rollouts=/tmp/qwen2vl-rollouts.safetensors
      python3 apps/r1-sgg/scripts/qwen2_vl_bench_batch.py --config $cfg --out $prompts --samples 8 --tokens 1024 --image-side 448
      mkdir -p "$out/qwen2vl_grpo"
      nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -l 1 > "$out/qwen2vl_grpo/memory_ours.csv" &
      smi=$!
      QWEN2VL_BENCH_CONFIG=$cfg QWEN2VL_BENCH_BATCH=$prompts QWEN2VL_BENCH_DEVICE=cuda QWEN2VL_BENCH_DTYPE=bf16 \
        QWEN2VL_BENCH_GROUP=8 QWEN2VL_BENCH_MAX_NEW=256 QWEN2VL_BENCH_RUNS=2 QWEN2VL_BENCH_ROLLOUTS=$rollouts \
        run qwen2vl_grpo_ours $bin/app_bench_qwen2_vl_grpo
      kill $smi
      nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -l 1 > "$out/qwen2vl_grpo/memory_torch.csv" &
      smi=$!
      run qwen2vl_grpo_torch python3 apps/r1-sgg/scripts/qwen2_vl_grpo_torch.py --config $cfg --batch $prompts \
        --rollouts $rollouts --group 8 --max-new 256 --runs 2 --device cuda --dtype bfloat16 --precision autocast
      kill $smi
      for side in ours torch; do
        echo "peak GPU memory, $side: $(cut -d, -f2 "$out/qwen2vl_grpo/memory_$side.csv" | sort -n | tail -1)"
      done | tee "$out/qwen2vl_grpo/memory_peak.txt"
      grep -h -E "qwen2_vl_grpo/|transformers generate|TRL GRPO update" "$out"/qwen2vl_grpo_*.log | tee "$out/qwen2vl_grpo/summary.txt"
      pack ;;
    r1sgg)
      # SFT, GRPO from it, and evaluation of the result, each a short run
      # (a stage stopped at the limit saves its checkpoint, as at Ctrl-C).
      ex=$bin/app_r1-sgg demo=/tmp/r1sgg-gpu
      rm -rf $demo
      gpu="--preset gpu --device cuda --out $demo --train-size 2000 --save-every 0"
      mkdir -p "$out/r1sgg"
      # GPU memory in use, one sample a second, through all three stages.
      nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -l 1 > "$out/r1sgg/memory.csv" &
      smi=$!
      run r1sgg_sft $ex sft $gpu --sft-steps ${GK_SFT_STEPS:-200} --batch 32 --sft-lr 1e-3
      run r1sgg_grpo $ex grpo $gpu --init $demo/sft.safetensors --grpo-steps ${GK_GRPO_STEPS:-20} \
        --prompts 8 --group 8 --eval-every 0
      run r1sgg_eval $ex eval $gpu --init $demo/grpo.safetensors --eval-size 64
      kill $smi
      echo "peak GPU memory: $(cut -d, -f2 "$out/r1sgg/memory.csv" | sort -n | tail -1)" | tee "$out/r1sgg/memory_peak.txt"
      cp $demo/*.jsonl "$out/r1sgg/" 2>/dev/null
      tail -12 "$out/r1sgg_eval.log"
      # Median step time and tokens per second of each stage.
      python3 - $demo > "$out/r1sgg/throughput.txt" <<'PY'
import json, pathlib, statistics, sys
for stage in ("sft", "grpo"):
    f = pathlib.Path(sys.argv[1]) / f"{stage}.jsonl"
    rows = [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []
    rows = [r for r in rows if "seconds" in r][5:]  # the first steps warm up
    if rows:
        sec = statistics.median(r["seconds"] for r in rows)
        tok = sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)
        print(f"{stage}: {len(rows)} steps, median {sec * 1e3:.1f} ms/step, {tok:.0f} trained tokens/s")
    if rows and "generated" in rows[0]:
        gen = sum(r["generated"] for r in rows) / sum(r["rollout_seconds"] for r in rows)
        print(f"{stage} rollouts: {gen:.0f} generated tokens/s")
PY
      cat "$out/r1sgg/throughput.txt"
      pack ;;
  esac
done
exit $status
