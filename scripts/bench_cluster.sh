#!/usr/bin/env bash
# Decode throughput of a model served by a coordinator with in-process experts vs the same
# model split over 2 expert workers on loopback, with the same concurrent load, side by side in
# one run (A, B, A, B; each figure is the better of its two runs).
#   scripts/bench_cluster.sh [MODEL_DIR] [extra moe-bench flags, e.g. --streams 8 --max-tokens 64]
# MODEL_DIR defaults to a TinyLlama-sized random Mixtral (hidden 2048, ffn 5632, 32/4 heads,
# 8 experts top-2, 4 layers, BF16) written to /tmp/moe-bench-tinyllama on first use.
# COORDINATOR_FLAGS adds flags to the gRPC coordinator, e.g. COORDINATOR_FLAGS="--wire-dtype bf16"
# (loopback workers get f32 rows by default).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/bin
MODEL=${1:-/tmp/moe-bench-tinyllama}
shift || true
if [[ ! -f "$MODEL/config.json" ]]; then
  "$BIN/moe-make-random-checkpoint" --out "$MODEL" --tokenizer tests/testdata/tokenizer/tokenizer.model
fi
EXPERTS=$(sed -n 's/.*"num_local_experts": *\([0-9]*\).*/\1/p' "$MODEL/config.json")
EXPERTS=${EXPERTS:-1}
HALF=$((EXPERTS / 2))
RUN=$(mktemp -d /tmp/moe-bench.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
export OMP_WAIT_POLICY=PASSIVE

start() {  # name, command...: runs it in the background (call directly, not in $(...))
  local name=$1; shift
  "$@" >"$RUN/$name.out" 2>"$RUN/$name.log" &
  PIDS+=($!)
}
ready() {  # name -> waits for its READY line and prints the address
  for _ in $(seq 1200); do
    grep -q '^READY ' "$RUN/$1.out" 2>/dev/null && break
    sleep 0.1
  done
  grep -q '^READY ' "$RUN/$1.out" || { echo "$1 did not start:" >&2; cat "$RUN/$1.log" >&2; exit 1; }
  sed -n 's/^READY //p' "$RUN/$1.out" | head -1
}
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
bench() {  # address [moe-bench flags] -> prints tok/s
  local address=$1; shift
  "$BIN/moe-bench" --server "$address" --streams 8 --max-tokens 64 "$@" | tee -a "$RUN/report" >&2
  sed -n 's/.*: *\([0-9.]*\) tok\/s decode.*/\1/p' "$RUN/report" | tail -1
}

best() { printf '%s\n' "$@" | sort -g | tail -1; }
A=(); B=()
for round in 1 2; do
  start coord-local "$BIN/moe-coordinator" --model "$MODEL" --listen 127.0.0.1:0
  A+=("$(bench "$(ready coord-local)" "$@")")
  stop_all
  start w0 "$BIN/moe-expert-worker" --model "$MODEL" --experts "0-$((HALF - 1))" --listen 127.0.0.1:0
  start w1 "$BIN/moe-expert-worker" --model "$MODEL" --experts "$HALF-$((EXPERTS - 1))" --listen 127.0.0.1:0
  W0=$(ready w0); W1=$(ready w1)
  # shellcheck disable=SC2086
  start coord-grpc "$BIN/moe-coordinator" --model "$MODEL" --workers "$W0,$W1" --listen 127.0.0.1:0 \
    ${COORDINATOR_FLAGS:-}
  B+=("$(bench "$(ready coord-grpc)" "$@")")
  stop_all
done
a=$(best "${A[@]}"); b=$(best "${B[@]}")
echo "in-process experts: $a tok/s; 2 gRPC workers: $b tok/s; ratio gRPC/in-process: $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", b / a }')"
