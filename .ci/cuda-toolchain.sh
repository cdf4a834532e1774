#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc, ptxas) from PyPI into a cache, on a
# machine with no GPU, and prints the environment to use:
#
#     source <(bash .ci/cuda-toolchain.sh)
#
# nvidia-nvvm is pinned: an unpinned one emits PTX (.version 9.5) that a
# CUDA 13.0 driver (580) cannot load.
set -euo pipefail
cache=${GK_CUDA_CACHE:-$HOME/.cache/grpo-kernels/cuda-13.0}
if [ ! -x "$cache/venv/bin/python" ]; then
  python3 -m venv "$cache/venv" >&2
fi
tc=$(ls -d "$cache"/venv/lib/python3*/site-packages/nvidia/cu13 2>/dev/null || true)
if [ -z "$tc" ] || [ ! -x "$tc/bin/nvcc" ]; then
  "$cache/venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" >&2
  tc=$(ls -d "$cache"/venv/lib/python3*/site-packages/nvidia/cu13)
fi
echo "export NVCC=$tc/bin/nvcc"
echo "export PTXAS=$tc/bin/ptxas"
echo "export CUDA_TOOLKIT_INCLUDE=$tc/include"
