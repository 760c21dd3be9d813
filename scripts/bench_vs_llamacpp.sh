#!/usr/bin/env bash
# moe-cluster against llama.cpp on the same GGUF files, side by side in one run with alternating
# runs (moe, llama.cpp, moe, llama.cpp, ...), both on THREADS threads (default 2): prefill of
# 128 tokens, decode at batch 1, and 8 concurrent sequences decoding together. Prints each
# figure (best of ROUNDS, default 3) and the ratio moe / llama.cpp. A benchmark, not a test:
# nothing in CI runs it.
#   scripts/bench_vs_llamacpp.sh LLAMA_CPP_BIN FILE.gguf [FILE.gguf ...]
# LLAMA_CPP_BIN holds llama-bench and llama-batched-bench, e.g. llama.cpp as vendored in PyPI's
# llama-cpp-python source distribution, built in a temp dir (docs/development.md, Benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_BIN=${1:?usage: $0 LLAMA_CPP_BIN FILE.gguf [FILE.gguf ...]}
shift
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
# One process at a time: OpenMP's default wait policy (spin briefly, then sleep), as llama.cpp's
# thread pool spins too. The fast kernels (--kernels fast, the default) are the comparable ones.
export OMP_NUM_THREADS=$THREADS
unset OMP_WAIT_POLICY MOE_KERNELS
best() { sort -g | tail -1; }

for model in "$@"; do
  ours_pp=() ours_tg=() ours_b8=() theirs_pp=() theirs_tg=() theirs_b8=()
  for ((r = 0; r < ROUNDS; ++r)); do
    out=$(build/bin/moe-bench --model "$model" --kernels fast --prompt-tokens 128 \
      --decode-steps 32 --batches 1,8 2>/dev/null)
    ours_pp+=("$(awk '/^prefill/ {print $4}' <<<"$out")")
    ours_tg+=("$(awk '/^decode +batch +1 / {print $4}' <<<"$out")")
    ours_b8+=("$(awk '/^decode +batch +8 / {print $4}' <<<"$out")")
    csv=$("$LLAMA_BIN/llama-bench" -m "$model" -t "$THREADS" -p 128 -n 32 -r 1 -o csv 2>/dev/null)
    theirs_pp+=("$(awk -F, '/"128","0"/ {gsub(/"/, "", $0); print $(NF-1)}' <<<"$csv" | head -1)")
    theirs_tg+=("$(awk -F, '/"0","32"/ {gsub(/"/, "", $0); print $(NF-1)}' <<<"$csv" | head -1)")
    batched=$("$LLAMA_BIN/llama-batched-bench" -m "$model" -t "$THREADS" -c 4096 -npp 16 \
      -ntg 32 -npl 8 2>/dev/null)
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    theirs_b8+=("$(awk -F'|' '$4 ~ /^ *8 *$/ {gsub(/ /, "", $9); print $9}' <<<"$batched" | head -1)")
  done
  pp=$(printf '%s\n' "${ours_pp[@]}" | best) tg=$(printf '%s\n' "${ours_tg[@]}" | best)
  b8=$(printf '%s\n' "${ours_b8[@]}" | best)
  lpp=$(printf '%s\n' "${theirs_pp[@]}" | best) ltg=$(printf '%s\n' "${theirs_tg[@]}" | best)
  lb8=$(printf '%s\n' "${theirs_b8[@]}" | best)
  echo "== $(basename "$model") ($THREADS threads, best of $ROUNDS alternating rounds)"
  printf '%-22s %12s %12s %8s\n' "" "moe-cluster" "llama.cpp" "ratio"
  for row in "prefill 128:$pp:$lpp" "decode batch 1:$tg:$ltg" "decode 8 sequences:$b8:$lb8"; do
    IFS=: read -r name a b <<<"$row"
    printf '%-22s %10.1f/s %10.1f/s %7.2fx\n' "$name" "$a" "$b" "$(awk -v a="$a" -v b="$b" \
      'BEGIN {print (b > 0 ? a / b : 0)}')"
  done
done
