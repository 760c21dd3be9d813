#include "coordinator/sampler.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <limits>

#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace moe {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Logit buckets of ApplyTopP: [0, -1), [-1, -2), ..., [-63, -inf).
constexpr int32_t kTopPBuckets = 64;
// ApplyTopP sorts once the range holding the end of the nucleus is this small.
constexpr int32_t kTopPSortSize = 256;

// Orders token ids most likely first, ties by id, so that results do not depend on the sort.
struct MoreLikely {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

// Lowest id among the largest logits; NaN never wins. 0 when every logit is -inf or NaN.
int32_t Argmax(const float* logits, int32_t n) {
  int32_t best = 0;
  float best_logit = -kInf;
  for (int32_t i = 0; i < n; ++i) {
    if (logits[i] > best_logit) {
      best = i;
      best_logit = logits[i];
    }
  }
  return best;
}

// A uniform double in [0, 1) from the top 53 bits of one engine output. Done by hand rather
// than with std::uniform_real_distribution so that draws match across standard libraries.
double UniformDouble(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& params) {
  if (!std::isfinite(params.temperature) || params.temperature < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", params.temperature));
  }
  if (params.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0 (0 disables it), got ", params.top_k));
  }
  // Written so that NaN fails too.
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", params.top_p));
  }
  if (!std::isfinite(params.repetition_penalty) || params.repetition_penalty <= 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be a finite number > 0 (1 disables it), got ",
                     params.repetition_penalty));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params, int32_t vocab_size)
    : params_(params),
      vocab_size_(vocab_size),
      rng_(params.seed),
      penalized_(vocab_size > 0 ? vocab_size : 0, 0),
      kth_scratch_(params.top_k > 0 && params.top_k < vocab_size ? vocab_size : 0),
      candidates_(vocab_size > 0 ? vocab_size : 0),
      weights_(vocab_size > 0 ? vocab_size : 0) {
  CHECK_GT(vocab_size, 0);
  const absl::Status status = ValidateSamplingParams(params);
  CHECK(status.ok()) << status;
}

int32_t Sampler::Sample(float* logits, std::span<const int32_t> history) {
  ApplyRepetitionPenalty(logits, history);
  if (params_.temperature == 0.0f) return Argmax(logits, vocab_size_);

  if (!ApplyTemperature(logits)) return 0;
  ApplyTopK(logits);
  return Draw(CollectCandidates(logits));
}

// transformers RepetitionPenaltyLogitsProcessor: gather the logits of the ids in the sequence,
// `where(score < 0, score * penalty, score / penalty)`, scatter back. The gather/scatter
// penalizes an id once however often it occurs; penalized_ marks the ids done in this call.
void Sampler::ApplyRepetitionPenalty(float* logits, std::span<const int32_t> history) {
  if (params_.repetition_penalty == 1.0f) return;
  const float penalty = params_.repetition_penalty;
  for (const int32_t id : history) {
    if (id < 0 || id >= vocab_size_ || penalized_[id]) continue;
    penalized_[id] = 1;
    float& logit = logits[id];
    logit = logit < 0.0f ? logit * penalty : logit / penalty;
  }
  for (const int32_t id : history) {
    if (id >= 0 && id < vocab_size_) penalized_[id] = 0;
  }
}

// transformers TemperatureLogitsWarper: scores / temperature. Computed as
// (scores - max) / temperature, which leaves softmax, top-k and top-p unchanged but cannot
// overflow to +inf for a tiny temperature (turning distinct logits into ties).
bool Sampler::ApplyTemperature(float* logits) {
  float max_logit = -kInf;
  for (int32_t i = 0; i < vocab_size_; ++i) {
    if (std::isnan(logits[i])) logits[i] = -kInf;
    max_logit = std::max(max_logit, logits[i]);
  }
  if (max_logit == -kInf) return false;
  if (max_logit == kInf) {
    // softmax's limit as some logits grow without bound: the +inf tokens share all the mass.
    for (int32_t i = 0; i < vocab_size_; ++i) logits[i] = logits[i] == kInf ? 0.0f : -kInf;
    return true;
  }
  const float temperature = params_.temperature;
  for (int32_t i = 0; i < vocab_size_; ++i) logits[i] = (logits[i] - max_logit) / temperature;
  return true;
}

// transformers TopKLogitsWarper: `scores < topk(scores, k).values[..., -1]` are set to -inf, so
// every token tied with the k-th largest logit is kept.
void Sampler::ApplyTopK(float* logits) {
  const int32_t k = params_.top_k;
  if (k == 0 || k >= vocab_size_) return;
  std::copy(logits, logits + vocab_size_, kth_scratch_.begin());
  std::nth_element(kth_scratch_.begin(), kth_scratch_.begin() + (k - 1), kth_scratch_.end(),
                   std::greater<float>());
  const float kth_logit = kth_scratch_[k - 1];
  for (int32_t i = 0; i < vocab_size_; ++i) {
    if (logits[i] < kth_logit) logits[i] = -kInf;
  }
}

int32_t Sampler::CollectCandidates(const float* logits) {
  // Logits are <= 0 after ApplyTemperature, so exp cannot overflow.
  int32_t count = 0;
  double total = 0.0;
  for (int32_t i = 0; i < vocab_size_; ++i) {
    if (logits[i] == -kInf) continue;
    candidates_[count] = i;
    weights_[count] = std::exp(logits[i]);
    total += weights_[count];
    ++count;
  }
  if (params_.top_p >= 1.0f) return count;
  return ApplyTopP(logits, count, total);
}

// transformers TopPLogitsWarper sorts ascending and removes tokens whose cumulative probability
// is <= 1 - top_p, keeping at least the most likely one. A token's ascending cumulative
// probability is 1 minus the mass strictly more likely than it, so in descending order a token
// is kept while the mass before it is < top_p.
//
// Sorting the whole vocabulary costs milliseconds per token, so the nucleus is found by
// selection instead: NarrowToLikelyBuckets drops whole buckets of unlikely tokens, then halving
// nth_element steps move the nucleus boundary into a small range, and only that is sorted.
int32_t Sampler::ApplyTopP(const float* logits, int32_t count, double total) {
  const double mass_limit = static_cast<double>(params_.top_p) * total;
  const MoreLikely more_likely{logits};
  const auto first = candidates_.begin();
  // Invariant: [0, lo) holds the lo most likely candidates (unordered), all in the nucleus,
  // with mass mass_before; the nucleus ends at an index in [lo, hi].
  int32_t lo = 0;
  int32_t hi = NarrowToLikelyBuckets(logits, count, mass_limit);
  double mass_before = 0.0;
  while (hi - lo > kTopPSortSize) {
    const int32_t mid = lo + (hi - lo) / 2;
    std::nth_element(first + lo, first + mid, first + hi, more_likely);
    double upper_mass = 0.0;
    for (int32_t j = lo; j < mid; ++j) upper_mass += std::exp(logits[candidates_[j]]);
    if (mass_before + upper_mass < mass_limit) {
      mass_before += upper_mass;
      lo = mid;
    } else {
      hi = mid;
    }
  }
  std::sort(first + lo, first + hi, more_likely);
  int32_t kept = lo;
  while (kept < hi && (kept == 0 || mass_before < mass_limit)) {
    mass_before += std::exp(logits[candidates_[kept]]);
    ++kept;
  }
  for (int32_t j = 0; j < kept; ++j) weights_[j] = std::exp(logits[candidates_[j]]);
  return kept;
}

// Buckets the candidates by logit, 1 nat per bucket (logits are <= 0). The most likely buckets
// whose mass reaches mass_limit contain the nucleus: moves their tokens to the front of
// candidates_ and returns how many there are.
int32_t Sampler::NarrowToLikelyBuckets(const float* logits, int32_t count, double mass_limit) {
  const auto bucket_of = [logits](int32_t id) {
    return static_cast<int32_t>(std::min(-logits[id], static_cast<float>(kTopPBuckets - 1)));
  };
  std::array<double, kTopPBuckets> bucket_mass{};
  for (int32_t j = 0; j < count; ++j) bucket_mass[bucket_of(candidates_[j])] += weights_[j];
  int32_t last_bucket = 0;
  for (double mass = bucket_mass[0]; mass < mass_limit && last_bucket < kTopPBuckets - 1;) {
    mass += bucket_mass[++last_bucket];
  }
  const auto first = candidates_.begin();
  const auto last = std::partition(first, first + count,
                                   [&](int32_t id) { return bucket_of(id) <= last_bucket; });
  return static_cast<int32_t>(last - first);
}

// Inverse-CDF draw from the softmax over the candidates (weights_ need not be normalized).
int32_t Sampler::Draw(int32_t candidate_count) {
  double total = 0.0;
  for (int32_t j = 0; j < candidate_count; ++j) total += weights_[j];
  const double target = UniformDouble(rng_) * total;
  double cumulative = 0.0;
  int32_t last_positive = candidates_[0];
  for (int32_t j = 0; j < candidate_count; ++j) {
    if (weights_[j] <= 0.0) continue;
    cumulative += weights_[j];
    last_positive = candidates_[j];
    if (target < cumulative) return last_positive;
  }
  // Rounding left target at or past the final sum.
  return last_positive;
}

}  // namespace moe
