#!/usr/bin/env bash
# Configures and builds moe-cluster into build/ (binaries in build/bin/), for the CPU. Extra
# arguments go to CMake's configure step, e.g. scripts/build.sh -DMOE_BUILD_TESTS=OFF.
# scripts/build.sh -DMOE_ENABLE_CUDA=ON builds with the CUDA backend (nvcc, cuBLAS) into
# build-cuda/ instead, so that the CPU build in build/ stays as it is.
# MOE_BUILD_TARGETS="a b" builds only those targets; MOE_JOBS sets the parallel jobs (2).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${MOE_JOBS:-2}"
dir=build cuda=OFF
for arg in "$@"; do
  if [[ "$arg" == "-DMOE_ENABLE_CUDA=ON" ]]; then dir=build-cuda cuda=ON; fi
done
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DMOE_ENABLE_CUDA="$cuda" "$@" >/dev/null
targets=()
for t in ${MOE_BUILD_TARGETS:-}; do targets+=(--target "$t"); done
cmake --build "$dir" -j"$JOBS" "${targets[@]}"
