#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds everything with tests, runs CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh --tests
scripts/build.sh -DMOE_BUILD_TESTS=ON
cd build
ctest --output-on-failure -j"${MOE_JOBS:-2}" "$@"
