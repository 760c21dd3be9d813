#!/usr/bin/env bash
# The embedded default: installs what is missing, builds, and streams a completion from the
# tiny Mixtral that ships in tests/testdata/models/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh -DMOE_BUILD_TESTS=OFF
MODEL=tests/testdata/models/demo_mixtral
[[ -d "$MODEL" ]] || MODEL=tests/testdata/models/mixtral_32e_gqa_fp16
exec build/bin/moe-cli generate --model "$MODEL" \
  --prompt "${MOE_DEMO_PROMPT:-We hold these truths to be self-evident, that}" \
  --max-tokens 48 --temperature 0.8 --top-p 0.95 --seed 1 "$@"
