#!/usr/bin/env bash
# Every GPU check in one run, for a machine with an NVIDIA GPU and the CUDA toolkit (the device
# machine lent to some sessions; nothing in CI runs this). Prints each figure; exits non-zero if
# a check fails.
#   1. the CUDA build (build-cuda/, -Werror) and its tests: cuda_backend_test (label gpu: the CUDA
#      expert FFN within 1e-2 of the CPU one on every committed fixture and on a TinyLlama-sized
#      random checkpoint), expert_ffn_test and expert_service_test (the worker's --device cuda);
#   2. compute-sanitizer (memcheck) over cuda_backend_test, when the toolkit has it;
#   3. decode throughput at 1 and 8 streams: a coordinator with one expert worker on the CPU vs
#      one on the GPU (moe-bench --server), side by side;
#   4. with two GPUs or more (NCCL puts each rank of a communicator on its own GPU): the
#      coordinator on GPU 0 and a GPU worker on GPU 1 over NCCL (--nccl-device): moe-cli status
#      must show the nccl transport, greedy tokens of every prompt must equal the in-process CPU
#      engine's (f32 wire), and moe-bench prints NCCL beside gRPC.
#   scripts/gpu_check.sh [MODEL_DIR]   (default: a random TinyLlama-sized Mixtral in /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi -L
if [[ "${MOE_SKIP_DEPS:-0}" != 1 ]]; then scripts/install_deps.sh --tests || true; fi
MOE_JOBS=${MOE_JOBS:-$(nproc)} MOE_BUILD_TARGETS="moe-expert-worker moe-coordinator moe-bench moe-cli \
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
start_cluster() {  # MODEL DEVICE [coordinator flags...] -> $C: a coordinator over one worker
  local model=$1 device=$2
  shift 2
  "$BIN/moe-expert-worker" --model "$model" --device "$device" --listen 127.0.0.1:0 \
    >"$RUN/w.out" 2>"$RUN/w-$device.log" &
  PIDS+=($!)
  W=$(ready "$RUN/w.out")
  [[ -n "$W" ]] || { cat "$RUN/w-$device.log"; exit 1; }
  "$BIN/moe-coordinator" --model "$model" --workers "$W" --listen 127.0.0.1:0 "$@" \
    >"$RUN/c.out" 2>"$RUN/c.log" &
  PIDS+=($!)
  C=$(ready "$RUN/c.out")
  [[ -n "$C" ]] || { cat "$RUN/c.log"; exit 1; }
}
bench() {  # LABEL: decode tok/s at 1 and 8 streams through $C, then the cluster stops
  for streams in 1 8; do
    echo -n "$1, $streams streams: "
    "$BIN/moe-bench" --server "$C" --streams "$streams" --max-tokens 64 2>&1 | tail -1
  done
  cleanup
  PIDS=()
}
for device in cpu cuda; do
  start_cluster "$MODEL" "$device"
  bench "worker on $device"
done
echo "== 4. NCCL: coordinator on cuda:0, a GPU worker on cuda:1"
GPUS=$(nvidia-smi -L | wc -l)
if (( GPUS < 2 )); then
  echo "NCCL check NOT RUN: $GPUS GPU (NCCL needs a GPU per rank: coordinator and worker)"
  exit $status
fi
FIXTURE=tests/testdata/models/demo_mixtral
start_cluster "$FIXTURE" cuda:1 --nccl-device cuda:0 --wire-dtype f32
"$BIN/moe-cli" status --server "$C" | tee "$RUN/status.txt"
grep -q 'nccl/f32' "$RUN/status.txt" || { echo "FAIL: the worker is not on NCCL"; status=1; }
for prompt in "Once upon a time" "The capital of France is" "1, 2, 3, 4,"; do
  want=$("$BIN/moe-cli" generate --model "$FIXTURE" --prompt "$prompt" --max-tokens 24)
  got=$("$BIN/moe-cli" generate --server "$C" --prompt "$prompt" --max-tokens 24)
  if [[ "$want" == "$got" ]]; then echo "greedy equal: $prompt"; else
    echo "FAIL: greedy tokens differ for '$prompt': in-process '$want' vs NCCL '$got'"; status=1
  fi
done
cleanup
PIDS=()
start_cluster "$MODEL" cuda:1
bench "GPU worker over gRPC"
start_cluster "$MODEL" cuda:1 --nccl-device cuda:0
bench "GPU worker over NCCL"
exit $status
