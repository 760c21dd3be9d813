#!/usr/bin/env bash
# The style checks CI runs beside the tests (.ci/run):
#   1. clang-format: every tracked C++ file is formatted as .clang-format says (fix with
#      scripts/lint.sh --fix, which rewrites the files in place);
#   2. a clang build of the whole tree (tests included) into build-clang/ with -Werror and
#      -Wthread-safety, so the ABSL_GUARDED_BY / ABSL_EXCLUSIVE_LOCKS_REQUIRED annotations hold.
# Installs clang and clang-format from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh --tests

mapfile -t files < <(git ls-files '*.cc' '*.h' '*.cu')
if [[ "${1:-}" == "--fix" ]]; then
  clang-format -i "${files[@]}"
  echo "lint: formatted ${#files[@]} files"
  exit 0
fi
if ! clang-format --dry-run --Werror "${files[@]}"; then
  echo "lint: the files above are not formatted; run scripts/lint.sh --fix" >&2
  exit 1
fi
echo "lint: ${#files[@]} C++ files formatted as .clang-format says"

CC=clang CXX=clang++ cmake -S . -B build-clang -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_TESTS=ON \
  -DMOE_BUILD_BENCHMARKS=OFF -DMOE_ENABLE_CUDA=OFF >/dev/null
cmake --build build-clang -j"${MOE_JOBS:-2}"
echo "lint: clang -Wthread-safety -Werror build passed"
