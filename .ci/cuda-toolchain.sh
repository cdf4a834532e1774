#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc, ptxas) from PyPI into a cache, on a
# machine with no GPU, and prints the environment to use:
#
#     source <(bash .ci/cuda-toolchain.sh)          # build --features cuda
#     source <(bash .ci/cuda-toolchain.sh --link)   # also link --features candle-cuda
#
# nvidia-nvvm is pinned: an unpinned one emits PTX (.version 9.5) that a
# CUDA 13.0 driver (580) cannot load.
#
# --link: candle-core's CUDA backend links libcuda, libnvrtc, libcurand,
# libcublas and libcublasLt. The last four come from PyPI (the real CUDA 13
# libraries); libcuda is the driver, which only a GPU machine has, so a stub
# with its SONAME and the cu* symbols cudarc declares stands in at link time.
# At run time the real libraries are loaded.
set -euo pipefail
cache=${GK_CUDA_CACHE:-$HOME/.cache/grpo-kernels/cuda-13.0}
pip_install() { "$cache/venv/bin/pip" install -q --disable-pip-version-check "$@" >&2; }
[ -x "$cache/venv/bin/python" ] || python3 -m venv "$cache/venv" >&2
tc=$(ls -d "$cache"/venv/lib/python3*/site-packages/nvidia/cu13 2>/dev/null || true)
if [ -z "$tc" ] || [ ! -x "$tc/bin/nvcc" ]; then
  pip_install "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
  tc=$(ls -d "$cache"/venv/lib/python3*/site-packages/nvidia/cu13)
fi
echo "export NVCC=$tc/bin/nvcc"
echo "export PTXAS=$tc/bin/ptxas"
echo "export PATH=$tc/bin:\$PATH"

if [ "${1:-}" = "--link" ]; then
  lib=$cache/link
  if [ ! -e "$lib/libcuda.so" ]; then
    pip_install "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*" "nvidia-cuda-nvrtc==13.0.*"
    mkdir -p "$lib"
    for name in cublas cublasLt curand nvrtc cudart; do
      real=$(ls "$tc"/lib/lib$name.so.* 2>/dev/null | head -1)
      [ -n "$real" ] || { echo "lib$name missing from the PyPI packages" >&2; exit 1; }
      ln -sf "$real" "$lib/lib$name.so"
    done
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
    grep -oh 'pub unsafe fn cu[A-Za-z0-9_]*' "$src"/src/driver/sys/mod.rs | sed 's/pub unsafe fn //' | sort -u |
      sed 's/.*/void &(void) {}/' > "$lib/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$lib/libcuda_stub.c"
  fi
  echo "export LIBRARY_PATH=$lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
  echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
fi
