#!/usr/bin/env bash
# Configures and builds moe-cluster into build/ (binaries in build/bin/). Extra arguments go to
# CMake's configure step, e.g. scripts/build.sh -DMOE_BUILD_TESTS=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${MOE_JOBS:-2}"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j"$JOBS"
