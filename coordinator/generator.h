// Text generation on top of the engine: the request and output types, the per-sequence logic
// (SequenceDecoder: sampling, incremental detokenizing, stop on EOS, stop strings or max_tokens)
// and Generate(), a synchronous batch run on a Scheduler (coordinator/scheduler.h).
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
#include "absl/time/time.h"
#include "common/tokenizer.h"
#include "coordinator/engine.h"
#include "coordinator/sampler.h"

namespace moe {

enum class FinishReason { kNone, kLength, kStop, kEos };
std::string_view FinishReasonName(FinishReason reason);  // "length", "stop", "eos"

// The most alternatives a request may ask for per position (OpenAI's and vLLM's limit).
inline constexpr int32_t kMaxTopLogprobs = 20;

struct GenerationParams {
  SamplingParams sampling;
  // >= 1, or 0 to only score the prompt (prompt_logprobs >= 0); prompt + max_tokens must fit
  // max_position_embeddings.
  int64_t max_tokens = 128;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any
  bool ignore_eos = false;        // keep going past EOS (benchmarks, fixtures)
  bool trace_routing = false;     // report each token's expert routing (TokenRoutes)
  // Route this request's tokens to this many experts (0: the server's, which may itself be
  // --experts-per-token); 1 <= K <= the server's. Faster, no longer the model's outputs.
  int64_t experts_per_token = 0;
  // Log-probabilities (see TokenLogprobs) of each generated token, with this many most likely
  // alternatives: -1 none, else 0..kMaxTopLogprobs.
  int32_t logprobs = -1;
  // The same for every prompt token but the first. The prompt is then prefilled with logits at
  // every position (one forward pass, no per-token recompute).
  int32_t prompt_logprobs = -1;
};

// One position's log-probabilities: log_softmax of the model's logits (f32, before repetition
// penalty, temperature, top-k and top-p: the model's own distribution, as vLLM reports by
// default), for the token at that position and the `top` most likely tokens (descending, ties
// by lower id).
struct TopLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};
struct TokenLogprobs {
  int32_t token = 0;
  float logprob = 0.0f;
  std::vector<TopLogprob> top;
};

// Fills *out for `token` from one row of logits (NaN counts as -inf) with the `top_n` most
// likely alternatives. Exact log_softmax in f32 with the sum in double.
void ComputeLogprobs(std::span<const float> logits, int32_t token, int32_t top_n,
                     TokenLogprobs* out);

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, BOS included if wanted
  GenerationParams params;
  // Past it the request ends with DEADLINE_EXCEEDED at the next step boundary (queued or
  // running) and its KV blocks are freed: the gRPC deadline, or the HTTP `timeout` field.
  absl::Time deadline = absl::InfiniteFuture();
};

struct GenerationOutput {
  std::vector<int32_t> tokens;  // generated ids (EOS included when it ended the sequence)
  std::string text;             // detokenized, stop string excluded
  FinishReason finish = FinishReason::kNone;
  std::vector<TokenLogprobs> logprobs;         // per generated token, with params.logprobs >= 0
  std::vector<TokenLogprobs> prompt_logprobs;  // prompt tokens 1.. with params.prompt_logprobs >= 0
  // Token rows (prompt and generated) that were routed around a lost expert in some layer
  // (--on-expert-loss reroute): the output is then not the exact model's.
  int64_t degraded_tokens = 0;
};

// The experts that produced generated tokens: for token t, layer l and choice j < top_k, expert
// experts[(t * layers + l) * top_k + j] with weight weights[same index], in descending weight
// order (weights of one layer sum to 1). The row is the one whose logits gave token t.
struct TokenRoutes {
  int64_t layers = 0;
  int64_t top_k = 0;
  std::vector<int32_t> experts;  // [tokens, layers, top_k]; -1: an unused slot (experts_per_token)
  std::vector<float> weights;    // [tokens, layers, top_k]

  // fn(layer, expert, weight) for token t's used slots, layer by layer.
  template <typename Fn>
  void ForEach(size_t t, const Fn& fn) const {
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t k = 0; k < top_k; ++k) {
        const size_t i = static_cast<size_t>((static_cast<int64_t>(t) * layers + l) * top_k + k);
        if (experts[i] >= 0) fn(l, experts[i], weights[i]);
      }
    }
  }
};

// OK or INVALID_ARGUMENT naming the parameter (empty prompt, max_tokens < 1 (0 without
// prompt_logprobs) or past the context, bad sampling settings, empty stop string, logprobs or
// prompt_logprobs outside -1..kMaxTopLogprobs).
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
  std::string text_;    // all text so far (cut at the stop string once one matched)
  size_t emitted_ = 0;  // bytes of text_ already returned
};

// One sequence's generation logic, shared by every driver of the engine: picks each next token
// from the logits of the sequence's last row with a Sampler seeded from the request, detokenizes
// incrementally (IncrementalDetokenizer, then StopMatcher) and ends the sequence on EOS (unless
// ignore_eos), a stop string or max_tokens. It never touches the engine: the driver feeds
// NextInput() to Engine::Step and the resulting logits row to Advance().
// Not thread-safe; one per sequence.
class SequenceDecoder {
 public:
  // REQUIRES: ValidateGenerationRequest(*request, config).ok() and vocab_size ==
  // config.vocab_size. `request` and `tokenizer` must outlive this object.
  SequenceDecoder(const GenerationRequest* request, const Tokenizer* tokenizer, int32_t vocab_size);
  SequenceDecoder(const SequenceDecoder&) = delete;
  SequenceDecoder& operator=(const SequenceDecoder&) = delete;

  // The tokens the engine must append next: the whole prompt before the first Advance(), then
  // the last generated token (after Preempt(): all tokens so far). Valid until the next
  // Advance().
  std::span<const int32_t> NextInput() const;
  // True until the prompt's logits arrived (Prefilled()), and again after Preempt() until the
  // recomputed prefix's have.
  bool prefilling() const { return !prefilled_ || recompute_; }
  // After Preempt(), until Prefilled().
  bool resuming() const { return recompute_; }
  // With prompt_logprobs >= 0 the first prefill needs logits at every prompt position.
  bool wants_prompt_logits() const { return !prefilled_ && request_->params.prompt_logprobs >= 0; }
  // The sequence lost its KV cache (the scheduler freed its blocks for others): NextInput()
  // becomes everything so far (prompt and generated tokens), to be prefilled again; the logits
  // of its last row then continue the sequence as the next decode step would have (sampler,
  // detokenizer and stop state are kept). REQUIRES: !prefilling() && !finished().
  void Preempt() { recompute_ = true; }
  // After the prefill step: `prompt_rows` holds the logits of every prompt position when
  // wants_prompt_logits() (prompt size rows of vocab_size), else only the last. Scores the
  // prompt if asked; with max_tokens = 0 the sequence then finishes (kLength, no tokens) and
  // Advance() must not be called. Returns the logits row for Advance().
  float* Prefilled(float* prompt_rows);
  // Samples the next token from `logits` (vocab_size floats, overwritten), appends it and
  // returns the text that became final (may be empty). Once finished() the returned text
  // includes everything held back. REQUIRES: !finished().
  std::string Advance(float* logits);

  bool finished() const { return output_.finish != FinishReason::kNone; }
  // `rows` of this sequence's last step were routed around lost experts.
  void AddDegraded(int64_t rows) { output_.degraded_tokens += rows; }
  // Generated tokens so far; text and finish reason once finished().
  const GenerationOutput& output() const { return output_; }

 private:
  // Sets the finish reason (if any) after `token` and returns its text delta.
  std::string Detokenize(int32_t token);
  bool IsPastLimit() const;

  const GenerationRequest* request_;
  const Tokenizer* tokenizer_;
  const int32_t vocab_size_;
  bool prefilled_ = false;
  bool recompute_ = false;  // preempted: the whole history is the next input
  Sampler sampler_;
  IncrementalDetokenizer detokenizer_;
  StopMatcher stop_;
  std::vector<int32_t> history_;  // prompt + generated
  std::vector<float> scratch_;    // the logits row before sampling, for logprobs
  GenerationOutput output_;
};

// Called for each generated token with the text that became final (may be empty).
using TokenCallback =
    std::function<void(size_t request_index, int32_t token, std::string_view delta)>;

// Runs `requests` to completion on a Scheduler without its thread: every prompt is prefilled in
// the first step, then all unfinished sequences decode together. Each request's tokens are
// exactly what it would get alone (sampling is per sequence and seeded). Errors: the first
// invalid request's INVALID_ARGUMENT before anything runs, else the first request's failure
// (RESOURCE_EXHAUSTED when the KV cache is full, the transport's error); then every sequence's
// KV blocks are freed. trace_routing is ignored (the callback carries no routes). The engine
// must not be driven by anything else meanwhile.
absl::StatusOr<std::vector<GenerationOutput>> Generate(Engine* engine, const Tokenizer* tokenizer,
                                                       std::span<const GenerationRequest> requests,
                                                       const TokenCallback& on_token);

}  // namespace moe

#endif  // MOE_COORDINATOR_GENERATOR_H_
