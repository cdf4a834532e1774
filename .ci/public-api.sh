#!/usr/bin/env bash
# Prints grpo-kernels' public API, one sorted line per item (features candle
# and cuda, as docs.rs documents it), from rustdoc's JSON output, which needs
# a nightly toolchain: the one pinned here (rustdoc JSON changes format
# between nightlies), installed with rustup when missing. CI diffs the
# output against the committed snapshot:
#
#     bash .ci/public-api.sh > tests/public-api.txt     # after an intended change
#
# GK_NIGHTLY overrides the toolchain (any nightly whose rustdoc JSON
# format .ci/public-api.py reads).
set -euo pipefail
cd "$(dirname "$0")/.."
nightly=${GK_NIGHTLY:-nightly-2026-05-20}
if ! rustup run "$nightly" rustc --version >/dev/null 2>&1; then
  rustup toolchain install "$nightly" --profile minimal >&2
fi
# DOCS_RS: no nvcc needed (build.rs leaves the PTX empty, as on docs.rs).
DOCS_RS=1 cargo +"$nightly" rustdoc -q -p grpo-kernels --lib --features candle,cuda \
  -- -Z unstable-options --output-format json >&2
python3 .ci/public-api.py "${CARGO_TARGET_DIR:-target}/doc/grpo_kernels.json"
