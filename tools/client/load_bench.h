// Drives a running coordinator with concurrent streams and reports throughput: what moe-bench
// --server measures.
#ifndef MOE_TOOLS_CLIENT_LOAD_BENCH_H_
#define MOE_TOOLS_CLIENT_LOAD_BENCH_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace moe {

struct LoadBenchOptions {
  std::string server;          // HOST:PORT
  int64_t streams = 8;         // concurrent Generate calls
  int64_t prompt_tokens = 16;  // random ids per prompt
  int64_t max_tokens = 64;     // generated per stream (EOS ignored)
  int64_t rounds = 1;          // streams run this many times back to back
  uint64_t seed = 1;
};

struct LoadBenchResult {
  int64_t generated_tokens = 0;
  double seconds = 0;              // wall time of the timed rounds
  double decode_tokens_per_s = 0;  // generated tokens / seconds
  double mean_ttft_ms = 0;
};

// One untimed warm-up stream, then `rounds` of `streams` concurrent streams.
absl::StatusOr<LoadBenchResult> RunLoadBench(const LoadBenchOptions& options);

}  // namespace moe

#endif  // MOE_TOOLS_CLIENT_LOAD_BENCH_H_
