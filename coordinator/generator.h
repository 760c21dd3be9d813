// Text generation on top of the engine: prefill every prompt as one batch, then decode all
// unfinished sequences together, one token each per step; sampling, incremental detokenizing,
// stop on EOS, stop strings or max_tokens.
#ifndef MOE_COORDINATOR_GENERATOR_H_
#define MOE_COORDINATOR_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer.h"
#include "coordinator/engine.h"
#include "coordinator/sampler.h"

namespace moe {

enum class FinishReason { kNone, kLength, kStop, kEos };
std::string_view FinishReasonName(FinishReason reason);  // "length", "stop", "eos"

struct GenerationParams {
  SamplingParams sampling;
  int64_t max_tokens = 128;        // >= 1; prompt + max_tokens must fit max_position_embeddings
  std::vector<std::string> stop;   // generation ends before the first occurrence of any
  bool ignore_eos = false;         // keep going past EOS (benchmarks, fixtures)
};

struct GenerationRequest {
  std::vector<int32_t> prompt;     // token ids, BOS included if wanted
  GenerationParams params;
};

struct GenerationOutput {
  std::vector<int32_t> tokens;     // generated ids (EOS included when it ended the sequence)
  std::string text;                // detokenized, stop string excluded
  FinishReason finish = FinishReason::kNone;
};

// OK or INVALID_ARGUMENT naming the parameter (empty prompt, max_tokens < 1 or past the
// context, bad sampling settings, empty stop string).
absl::Status ValidateGenerationRequest(const GenerationRequest& request, const ModelConfig& config);

// Holds back streamed text that could be the start of a stop string, and cuts the text at the
// first complete stop string. Not thread-safe; one per sequence.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Appends `delta`; returns the text now safe to emit. Sets *stopped when a stop string
  // completed (the returned text then ends right before it).
  std::string Add(std::string_view delta, bool* stopped);
  // Everything still held back (call when the sequence ends for another reason).
  std::string Flush();
  const std::string& text() const { return text_; }

 private:
  std::vector<std::string> stops_;
  std::string text_;     // all text so far (cut at the stop string once one matched)
  size_t emitted_ = 0;   // bytes of text_ already returned
};

// Called for each generated token with the text that became final (may be empty).
using TokenCallback = std::function<void(size_t request_index, int32_t token, std::string_view delta)>;

// Runs `requests` to completion as one batch. Each request's tokens are exactly what it would
// get alone (sampling is per sequence and seeded). On error every sequence's KV blocks are freed.
absl::StatusOr<std::vector<GenerationOutput>> Generate(Engine* engine, const Tokenizer* tokenizer,
                                                       std::span<const GenerationRequest> requests,
                                                       const TokenCallback& on_token);

}  // namespace moe

#endif  // MOE_COORDINATOR_GENERATOR_H_
