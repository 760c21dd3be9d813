#include "tools/client/load_bench.h"

#include <random>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "tools/client/inference_client.h"

namespace moe {

namespace pb = moecluster::v1;

absl::StatusOr<LoadBenchResult> RunLoadBench(const LoadBenchOptions& o) {
  InferenceClient client(o.server);
  auto info = client.GetModelInfo();
  if (!info.ok()) return info.status();
  std::mt19937 rng(static_cast<uint32_t>(o.seed));
  std::uniform_int_distribution<int32_t> token(3, info->vocab_size() - 1);
  auto make_request = [&]() {
    pb::GenerateRequest r;
    for (int64_t i = 0; i < o.prompt_tokens; ++i) r.mutable_prompt_ids()->add_ids(token(rng));
    r.set_max_tokens(static_cast<int32_t>(o.max_tokens));
    r.set_ignore_eos(true);
    return r;
  };
  auto warmup = client.Generate(make_request());
  if (!warmup.ok()) return warmup.status();

  LoadBenchResult result;
  absl::Mutex mu;
  absl::Status failure;
  double ttft_ms_sum = 0;
  const absl::Time start = absl::Now();
  for (int64_t round = 0; round < o.rounds; ++round) {
    std::vector<pb::GenerateRequest> requests;
    for (int64_t s = 0; s < o.streams; ++s) requests.push_back(make_request());
    std::vector<std::thread> threads;
    for (int64_t s = 0; s < o.streams; ++s) {
      threads.emplace_back([&, s] {
        const absl::Time sent = absl::Now();
        absl::Time first = absl::InfinitePast();
        auto r = client.Generate(requests[s], [&](const pb::TokenDelta&) {
          if (first == absl::InfinitePast()) first = absl::Now();
        });
        absl::MutexLock lock(&mu);
        if (!r.ok()) {
          failure = r.status();
          return;
        }
        result.generated_tokens += static_cast<int64_t>(r->tokens.size());
        ttft_ms_sum += absl::ToDoubleMilliseconds(first - sent);
      });
    }
    for (std::thread& t : threads) t.join();
  }
  if (!failure.ok()) return failure;
  result.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  result.decode_tokens_per_s = result.generated_tokens / result.seconds;
  result.mean_ttft_ms = ttft_ms_sum / static_cast<double>(o.streams * o.rounds);
  return result;
}

}  // namespace moe
