// Next-token selection from a row of logits: repetition penalty, then greedy argmax or
// temperature / top-k / top-p sampling, in the order transformers' generate() applies its
// logits processors (RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper,
// TopKLogitsWarper, TopPLogitsWarper, softmax, multinomial).
#ifndef MOE_COORDINATOR_SAMPLER_H_
#define MOE_COORDINATOR_SAMPLER_H_

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace moe {

// Per-request sampling settings; defaults give greedy decoding.
struct SamplingParams {
  // 0 = greedy (argmax); > 0 divides the logits before sampling.
  float temperature = 0.0f;
  // 0 = off; else keep only the k most likely tokens (and any tied with the k-th).
  int32_t top_k = 0;
  // Nucleus sampling: keep the smallest set of most likely tokens whose cumulative probability
  // is >= top_p. In (0, 1]; 1 = off.
  float top_p = 1.0f;
  // > 0; 1 = off. Each distinct id already in the sequence has its logit divided by this when
  // positive and multiplied by it otherwise (transformers' RepetitionPenaltyLogitsProcessor).
  float repetition_penalty = 1.0f;
  // Seeds the sampler's RNG: the same seed and the same logits give the same tokens, on every
  // platform and standard library.
  uint64_t seed = 0;
};

// OK, or INVALID_ARGUMENT naming the first bad parameter and its value when temperature is
// negative or not finite, top_k is negative, top_p is outside (0, 1] or NaN, or
// repetition_penalty is <= 0 or not finite.
absl::Status ValidateSamplingParams(const SamplingParams& params);

// Picks tokens for one sequence.
//
// Thread-safety: not thread-safe; use one Sampler per sequence. Owns its RNG
// (std::mt19937_64 seeded with params.seed) and scratch buffers sized once for vocab_size, so
// Sample() does not allocate.
class Sampler {
 public:
  // REQUIRES: ValidateSamplingParams(params).ok() and vocab_size > 0.
  Sampler(const SamplingParams& params, int32_t vocab_size);

  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // Returns the next token id, in [0, vocab_size).
  //
  // logits: vocab_size values, read and overwritten (the contents afterwards are unspecified).
  // NaN logits are treated as -inf. history: the prompt and generated ids so far; each distinct
  // id in [0, vocab_size) is penalized once, other ids are ignored.
  //
  // Greedy (temperature 0) returns the argmax, the lowest id among ties. Sampling never returns
  // a token whose logit is -inf unless every logit is; tokens at +inf share all the probability.
  // When every logit is -inf or NaN, returns 0.
  int32_t Sample(float* logits, std::span<const int32_t> history);

 private:
  void ApplyRepetitionPenalty(float* logits, std::span<const int32_t> history);
  // Maps NaN to -inf and scales by the temperature, shifted so that the largest logit is 0; if
  // some logits are +inf, only those are kept (at 0). Returns false if every logit is -inf.
  bool ApplyTemperature(float* logits);
  void ApplyTopK(float* logits);
  // Fills candidates_ with the ids whose logit is > -inf and weights_ with exp(logit), then
  // applies top-p. Returns the number of candidates left.
  int32_t CollectCandidates(const float* logits);
  // Moves the nucleus of the first `count` candidates (whose weights sum to `total`) to the
  // front of candidates_, with weights_ to match, and returns its size.
  int32_t ApplyTopP(const float* logits, int32_t count, double total);
  int32_t NarrowToLikelyBuckets(const float* logits, int32_t count, double mass_limit);
  int32_t Draw(int32_t candidate_count);

  // Constant after construction.
  SamplingParams params_;
  int32_t vocab_size_;

  std::mt19937_64 rng_;
  // Scratch, vocab_size_ each.
  std::vector<uint8_t> penalized_;  // 1 for ids already penalized in this call; 0 between calls.
  std::vector<float> kth_scratch_;  // copy of the logits for the top-k nth_element.
  std::vector<int32_t> candidates_;
  std::vector<double> weights_;  // weights_[j]: unnormalized probability of candidates_[j].
};

}  // namespace moe

#endif  // MOE_COORDINATOR_SAMPLER_H_
