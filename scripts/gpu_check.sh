#!/usr/bin/env bash
# Every GPU check in one run, for a machine with an NVIDIA GPU and the CUDA toolkit (the device
# machine lent to some sessions; nothing in CI runs this). Prints each figure; exits non-zero if
# a check fails.
#   1. the CUDA build (build-cuda/, -Werror) and its tests: cuda_backend_test (label gpu: the CUDA
#      expert FFN within 1e-2 of the CPU one on every committed fixture and on a TinyLlama-sized
#      random checkpoint), expert_ffn_test and expert_service_test (the worker's --device cuda);
#   2. compute-sanitizer (memcheck) over cuda_backend_test, when the toolkit has it;
#   3. decode throughput at 1 and 8 streams: a coordinator with one expert worker on the CPU vs
#      one on the GPU (moe-bench --server), side by side.
#   scripts/gpu_check.sh [MODEL_DIR]   (default: a random TinyLlama-sized Mixtral in /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi -L
if [[ "${MOE_SKIP_DEPS:-0}" != 1 ]]; then scripts/install_deps.sh --tests || true; fi
MOE_JOBS=${MOE_JOBS:-$(nproc)} MOE_BUILD_TARGETS="moe-expert-worker moe-coordinator moe-bench \
moe-make-random-checkpoint expert_ffn_test expert_service_test cuda_backend_test" \
  scripts/build.sh -DMOE_ENABLE_CUDA=ON -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCHMARKS=OFF
BIN=build-cuda/bin
MODEL=${1:-/tmp/moe-gpu-tinyllama}
if [[ ! -f "$MODEL/config.json" ]]; then
  "$BIN/moe-make-random-checkpoint" --out "$MODEL" --tokenizer tests/testdata/tokenizer/tokenizer.model
fi

echo "== 1. CUDA tests"
status=0
build-cuda/tests/expert_ffn_test || status=1
build-cuda/tests/expert_service_test --gtest_filter='WorkerBinaryTest.*' || status=1
MOE_GPU_CHECK_MODEL="$MODEL" build-cuda/tests/cuda_backend_test || status=1

echo "== 2. compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 build-cuda/tests/cuda_backend_test \
    --gtest_filter='CudaBackendTest.RunnersOnSeveralThreadsAgree' || status=1
else
  echo "compute-sanitizer: not in this toolkit, not run"
fi

echo "== 3. one CPU worker vs one GPU worker behind a coordinator (moe-bench --server)"
RUN=$(mktemp -d /tmp/moe-gpu.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
ready() {  # file -> the address of its READY line
  for _ in $(seq 3000); do
    grep -q '^READY ' "$1" 2>/dev/null && break
    sleep 0.1
  done
  sed -n 's/^READY //p' "$1" | head -1
}
for device in cpu cuda; do
  "$BIN/moe-expert-worker" --model "$MODEL" --device "$device" --listen 127.0.0.1:0 \
    >"$RUN/w.out" 2>"$RUN/w-$device.log" &
  PIDS+=($!)
  W=$(ready "$RUN/w.out")
  [[ -n "$W" ]] || { cat "$RUN/w-$device.log"; exit 1; }
  "$BIN/moe-coordinator" --model "$MODEL" --workers "$W" --listen 127.0.0.1:0 \
    >"$RUN/c.out" 2>"$RUN/c.log" &
  PIDS+=($!)
  C=$(ready "$RUN/c.out")
  for streams in 1 8; do
    echo -n "worker on $device, $streams streams: "
    "$BIN/moe-bench" --server "$C" --streams "$streams" --max-tokens 64 2>&1 | tail -1
  done
  cleanup
  PIDS=()
done
exit $status
