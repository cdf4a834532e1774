#!/usr/bin/env bash
# Runs on a GPU machine, from the repository root, over binaries built
# elsewhere by bench/gpu/build.sh (the GPU machine has no cargo):
#
#     bash bench/gpu/run.sh [parity] [sanitizer] [bench] [compare]
#
# parity:    every CUDA parity suite (tests/cuda_*.rs, candle CUDA tests)
# sanitizer: the parity suites under compute-sanitizer memcheck and
#            racecheck, on the smaller cases (GK_SANITIZER=1)
# bench:     the criterion benches' CUDA groups (names containing "cuda")
# compare:   benches/compare_torch.py: PyTorch and Liger-Kernel, same GPU
# Results go to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=.gpu
out=${OUT:-gpu-out}
mkdir -p "$out"
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

run() {  # name, command...: logs to $out/name.log, remembers failures
  local name=$1; shift
  echo "--- $name: $*"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -E '^test result|FAILED|panicked|ERROR SUMMARY' "$out/$name.log" | head -20
  [ $rc -eq 0 ] || { echo "!!! $name failed (rc $rc)"; status=1; }
}

for step in $steps; do
  case $step in
    parity)
      for t in $bin/test_*; do run "parity_$(basename "$t")" "$t" --test-threads=1; done ;;
    sanitizer)
      for t in $bin/test_cuda_*; do
        for tool in memcheck racecheck; do
          GK_SANITIZER=1 run "sanitizer_${tool}_$(basename "$t")" \
            compute-sanitizer --tool $tool --error-exitcode 9 "$t" --test-threads=1
        done
      done ;;
    bench)
      for b in $bin/bench_*; do
        run "$(basename "$b")" "$b" --bench cuda --warm-up-time 1 --measurement-time 3 --noplot
      done
      # Criterion's medians, one line per bench (group/function/parameter).
      python3 - target/criterion > "$out/criterion_medians.tsv" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
for f in sorted(root.glob("**/new/estimates.json")):
    ns = json.loads(f.read_text())["median"]["point_estimate"]
    print(f"{f.parent.parent.relative_to(root)}\t{ns:.1f} ns")
PY
      ;;
    compare)
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
      fi
      run compare python3 benches/compare_torch.py --criterion target/criterion --out "$out/compare.json"
      tail -25 "$out/compare.log" ;;
  esac
done
exit $status
