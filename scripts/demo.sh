#!/usr/bin/env bash
# The embedded default: installs what is missing, builds, then runs a local cluster on
# loopback — 2 expert workers, each holding half of the experts of the tiny Mixtral that ships in
# tests/testdata/models/, and a coordinator — streams a completion through the gRPC client and a
# chat reply through the OpenAI HTTP API, prints the expert-load table, and shuts everything
# down (also on Ctrl-C).
# Extra arguments go to `moe-cli generate` (e.g. --prompt "Four score" --max-tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh -DMOE_BUILD_TESTS=OFF

MODEL=tests/testdata/models/demo_mixtral
BIN=build/bin
RUN=$(mktemp -d /tmp/moe-demo.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a server in the background; its stdout goes to $RUN/$1.out, stderr to $RUN/$1.log.
start() {
  local name=$1; shift
  "$@" >"$RUN/$name.out" 2>"$RUN/$name.log" &
  PIDS+=($!)
}
# Waits for a server's "READY HOST:PORT" line and prints the address.
ready() {
  local name=$1
  for _ in $(seq 600); do
    if grep -q '^READY ' "$RUN/$name.out" 2>/dev/null; then
      sed -n 's/^READY //p' "$RUN/$name.out" | head -1
      return 0
    fi
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null && ! grep -q '^READY ' "$RUN/$name.out"; then break; fi
    sleep 0.1
  done
  echo "demo: $name did not start; its log:" >&2
  cat "$RUN/$name.log" >&2
  exit 1
}

export OMP_WAIT_POLICY=PASSIVE  # three processes share the cores: no spinning OpenMP threads
start worker0 "$BIN/moe-expert-worker" --model "$MODEL" --experts 0-3 --listen 127.0.0.1:0 --threads 1
W0=$(ready worker0)
start worker1 "$BIN/moe-expert-worker" --model "$MODEL" --experts 4-7 --listen 127.0.0.1:0 --threads 1
W1=$(ready worker1)
start coordinator "$BIN/moe-coordinator" --model "$MODEL" --workers "$W0,$W1" --listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:0 --chat-template tests/testdata/chat_templates/chatml.jinja
COORD=$(ready coordinator)
HTTP=$(sed -n 's/^HTTP //p' "$RUN/coordinator.out" | head -1)
echo "cluster up: coordinator $COORD (OpenAI HTTP API on $HTTP), expert workers $W0 (experts 0-3) and $W1 (experts 4-7)" >&2
echo >&2

"$BIN/moe-cli" generate --server "$COORD" \
  --prompt "${MOE_DEMO_PROMPT:-We hold these truths to be self-evident, that}" \
  --max-tokens 48 --temperature 0.8 --top-p 0.95 --seed 1 "$@"
echo
echo "demo: the same cluster through the OpenAI chat API (POST http://$HTTP/v1/chat/completions):" >&2
"$BIN/moe-cli" chat --server "$HTTP" --message "Tell me about the king." --max-tokens 24 \
  --temperature 0.8 --seed 1
echo
"$BIN/moe-cli" status --server "$COORD"
