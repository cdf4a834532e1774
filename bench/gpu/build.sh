#!/usr/bin/env bash
# Builds, on a machine without a GPU, what bench/gpu/run.sh runs on one:
# the CUDA test binary (tests/cuda/, the candle-cuda tests included; its GPU
# tests are #[ignore]d and run.sh passes --include-ignored), the bench
# binaries (PTX for sm_90), and the R1-SGG application and its Qwen2-VL bench built for CUDA, copied into
# .gpu/ (ignored by git; carry it).
set -euo pipefail
cd "$(dirname "$0")/../.."
source <(bash .ci/cuda-toolchain.sh --link)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
rm -rf .gpu && mkdir -p .gpu
git rev-parse HEAD > .gpu/COMMIT
git diff --quiet || echo "+ uncommitted changes" >> .gpu/COMMIT
copy() {  # cargo's JSON messages -> executables -> .gpu/<prefix><target name>
  python3 -c '
import json, sys, shutil
prefix = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        shutil.copy(m["executable"], ".gpu/" + prefix + m["target"]["name"])
' "$1"
}
cargo test --release -p grpo-kernels --features candle-cuda --test cuda --no-run --message-format=json | copy test_
cargo bench -p grpo-kernels --features candle-cuda --no-run --message-format=json | copy bench_
cargo build --release -p r1-sgg --features cuda --bin r1-sgg --message-format=json | copy app_
cargo bench -p r1-sgg --features cuda --bench qwen2_vl_sft --no-run --message-format=json | copy app_bench_
cargo bench -p r1-sgg --features cuda --bench qwen2_vl_grpo --no-run --message-format=json | copy app_bench_
# TRL's GRPO loss path for `run.sh qwen2vl-grpo` (installed there with --no-deps; the
# transformers wheel of `run.sh qwen2vl` goes beside it).
mkdir -p .whl && python3 -m pip download -q --no-deps --dest .whl trl==1.16.0
strip .gpu/test_* .gpu/bench_* .gpu/app_*
du -sh .gpu
