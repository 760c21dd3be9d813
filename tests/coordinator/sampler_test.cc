#include "coordinator/sampler.h"

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Sample() overwrites its logits, so every call gets a fresh copy.
int32_t SampleCopy(Sampler& sampler, const std::vector<float>& logits,
                   std::span<const int32_t> history = {}) {
  std::vector<float> scratch = logits;
  return sampler.Sample(scratch.data(), history);
}

// Counts of each token over `draws` samples.
std::vector<int> Histogram(const SamplingParams& params, const std::vector<float>& logits,
                           int draws) {
  Sampler sampler(params, static_cast<int32_t>(logits.size()));
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < draws; ++i) {
    const int32_t token = SampleCopy(sampler, logits);
    EXPECT_GE(token, 0);
    EXPECT_LT(token, static_cast<int32_t>(logits.size()));
    ++counts[token];
  }
  return counts;
}

// softmax(logits / temperature) in double.
std::vector<double> Softmax(const std::vector<float>& logits, double temperature) {
  double max_logit = -kInf;
  for (float l : logits) max_logit = std::max(max_logit, l / temperature);
  std::vector<double> probs;
  double total = 0.0;
  for (float l : logits) {
    probs.push_back(std::exp(l / temperature - max_logit));
    total += probs.back();
  }
  for (double& p : probs) p /= total;
  return probs;
}

struct InvalidCase {
  std::string name;
  std::function<void(SamplingParams&)> set;
  std::string parameter;
  std::string value;
};

TEST(ValidateSamplingParamsTest, DefaultsAndTypicalSettingsAreValid) {
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
  SamplingParams params;
  params.temperature = 0.7f;
  params.top_k = 50;
  params.top_p = 0.9f;
  params.repetition_penalty = 1.1f;
  params.seed = 123;
  EXPECT_TRUE(ValidateSamplingParams(params).ok());
  params.top_p = 1.0f;
  params.repetition_penalty = 0.5f;
  EXPECT_TRUE(ValidateSamplingParams(params).ok());
}

TEST(ValidateSamplingParamsTest, RejectsEachBadValueNamingTheParameter) {
  const std::vector<InvalidCase> cases = {
      {"negative temperature", [](SamplingParams& p) { p.temperature = -0.5f; }, "temperature",
       "-0.5"},
      {"nan temperature", [](SamplingParams& p) { p.temperature = kNaN; }, "temperature", "nan"},
      {"inf temperature", [](SamplingParams& p) { p.temperature = kInf; }, "temperature", "inf"},
      {"negative top_k", [](SamplingParams& p) { p.top_k = -1; }, "top_k", "-1"},
      {"zero top_p", [](SamplingParams& p) { p.top_p = 0.0f; }, "top_p", "0"},
      {"negative top_p", [](SamplingParams& p) { p.top_p = -0.1f; }, "top_p", "-0.1"},
      {"top_p above 1", [](SamplingParams& p) { p.top_p = 1.5f; }, "top_p", "1.5"},
      {"nan top_p", [](SamplingParams& p) { p.top_p = kNaN; }, "top_p", "nan"},
      {"zero penalty", [](SamplingParams& p) { p.repetition_penalty = 0.0f; }, "repetition_penalty",
       "0"},
      {"negative penalty", [](SamplingParams& p) { p.repetition_penalty = -1.0f; },
       "repetition_penalty", "-1"},
      {"nan penalty", [](SamplingParams& p) { p.repetition_penalty = kNaN; }, "repetition_penalty",
       "nan"},
      {"inf penalty", [](SamplingParams& p) { p.repetition_penalty = kInf; }, "repetition_penalty",
       "inf"},
  };
  for (const InvalidCase& c : cases) {
    SCOPED_TRACE(c.name);
    SamplingParams params;
    c.set(params);
    const absl::Status status = ValidateSamplingParams(params);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.parameter));
    EXPECT_THAT(std::string(status.message()), HasSubstr("got " + c.value));
  }
}

TEST(SamplerTest, GreedyReturnsArgmax) {
  Sampler sampler(SamplingParams{}, 6);
  EXPECT_EQ(SampleCopy(sampler, {0.1f, -2.0f, 3.5f, 3.4f, -kInf, 1.0f}), 2);
  EXPECT_EQ(SampleCopy(sampler, {-5.0f, -4.0f, -6.0f, -7.0f, -8.0f, -4.5f}), 1);
  EXPECT_EQ(SampleCopy(sampler, {kNaN, 0.0f, 1.0f, kNaN, 0.5f, -1.0f}), 2);
}

TEST(SamplerTest, GreedyTiesGoToLowestId) {
  Sampler sampler(SamplingParams{}, 5);
  EXPECT_EQ(SampleCopy(sampler, {1.0f, 7.0f, 2.0f, 7.0f, 7.0f}), 1);
  EXPECT_EQ(SampleCopy(sampler, {0.0f, 0.0f, 0.0f, 0.0f, 0.0f}), 0);
}

TEST(SamplerTest, RepetitionPenaltyDividesPositiveLogits) {
  // Token 0 leads 2.0 to 1.5; penalized it falls to 2.0 / 2 = 1.0.
  const std::vector<float> logits = {2.0f, 1.5f, -0.5f};
  SamplingParams params;
  params.repetition_penalty = 2.0f;
  Sampler sampler(params, 3);
  const std::vector<int32_t> history = {0};
  EXPECT_EQ(SampleCopy(sampler, logits), 0);
  EXPECT_EQ(SampleCopy(sampler, logits, history), 1);
}

TEST(SamplerTest, RepetitionPenaltyMultipliesNegativeLogits) {
  // Token 0 leads -1.0 to -1.2; penalized it falls to -1.0 * 1.5 = -1.5. Dividing instead
  // (-0.67) would keep it ahead.
  const std::vector<float> logits = {-1.0f, -1.2f, -3.0f};
  SamplingParams params;
  params.repetition_penalty = 1.5f;
  Sampler sampler(params, 3);
  const std::vector<int32_t> history = {0, 2};
  EXPECT_EQ(SampleCopy(sampler, logits), 0);
  EXPECT_EQ(SampleCopy(sampler, logits, history), 1);
}

TEST(SamplerTest, RepetitionPenaltyBelowOneBoostsRepeatedTokens) {
  const std::vector<float> logits = {1.0f, 1.5f, -2.0f, -0.5f};
  SamplingParams params;
  params.repetition_penalty = 0.5f;
  Sampler sampler(params, 4);
  const std::vector<int32_t> positive = {0};  // 1.0 / 0.5 = 2.0 > 1.5.
  EXPECT_EQ(SampleCopy(sampler, logits, positive), 0);
}

TEST(SamplerTest, RepetitionPenaltyAppliesOncePerDistinctId) {
  // Once: 2.0 / 1.5 = 1.33 stays above 1.0. Three times would give 0.59.
  const std::vector<float> logits = {2.0f, 1.0f};
  SamplingParams params;
  params.repetition_penalty = 1.5f;
  Sampler sampler(params, 2);
  const std::vector<int32_t> history = {0, 0, 0};
  EXPECT_EQ(SampleCopy(sampler, logits, history), 0);
  // The marks from the previous call were cleared: the penalty still applies exactly once.
  EXPECT_EQ(SampleCopy(sampler, logits, history), 0);
  const std::vector<float> closer = {2.0f, 1.4f};
  EXPECT_EQ(SampleCopy(sampler, closer, history), 1);
}

TEST(SamplerTest, RepetitionPenaltyIgnoresOutOfRangeIds) {
  SamplingParams params;
  params.repetition_penalty = 2.0f;
  Sampler sampler(params, 3);
  const std::vector<int32_t> history = {-1, 3, 1000};
  EXPECT_EQ(SampleCopy(sampler, {3.0f, 2.0f, 1.0f}, history), 0);
}

TEST(SamplerTest, RepetitionPenaltyAppliesBeforeSampling) {
  // With top_k = 1 sampling is deterministic; the penalty must already have moved the top.
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_k = 1;
  params.repetition_penalty = 4.0f;
  Sampler sampler(params, 3);
  const std::vector<int32_t> history = {2};
  EXPECT_EQ(SampleCopy(sampler, {1.0f, 0.5f, 3.0f}, history), 0);
}

TEST(SamplerTest, TopKOneAlwaysReturnsArgmax) {
  const std::vector<float> logits = {0.3f, 1.2f, 1.1f, -0.4f, 0.9f, 1.19f};
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_k = 1;
  params.seed = 7;
  const std::vector<int> counts = Histogram(params, logits, 2000);
  EXPECT_EQ(counts[1], 2000);
}

TEST(SamplerTest, TinyTopPKeepsOnlyTheTopToken) {
  const std::vector<float> logits = {0.3f, 1.2f, 1.1f, -0.4f, 0.9f, 1.19f};
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_p = 1e-6f;
  params.seed = 11;
  const std::vector<int> counts = Histogram(params, logits, 2000);
  EXPECT_EQ(counts[1], 2000);
}

TEST(SamplerTest, SameSeedSameSequenceDifferentSeedDifferent) {
  std::vector<float> logits(64);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.05f * static_cast<float>(i % 9);
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_p = 0.95f;
  auto draws = [&](uint64_t seed) {
    params.seed = seed;
    Sampler sampler(params, static_cast<int32_t>(logits.size()));
    std::vector<int32_t> tokens;
    for (int i = 0; i < 200; ++i) tokens.push_back(SampleCopy(sampler, logits));
    return tokens;
  };
  const std::vector<int32_t> first = draws(42);
  EXPECT_EQ(first, draws(42));
  EXPECT_NE(first, draws(43));
}

TEST(SamplerTest, FrequenciesMatchTemperatureSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
  for (float temperature : {0.7f, 1.0f, 2.0f}) {
    SCOPED_TRACE(temperature);
    SamplingParams params;
    params.temperature = temperature;
    params.seed = 2024;
    constexpr int kDraws = 20000;
    const std::vector<int> counts = Histogram(params, logits, kDraws);
    const std::vector<double> probs = Softmax(logits, temperature);
    for (size_t i = 0; i < logits.size(); ++i) {
      // Standard error is at most 0.0036 here; 0.015 is > 4 of them.
      EXPECT_NEAR(static_cast<double>(counts[i]) / kDraws, probs[i], 0.015) << "token " << i;
    }
  }
}

TEST(SamplerTest, TopKRestrictsSupportAndKeepsTies) {
  // The 2nd largest value, 2.0, is shared by tokens 1 and 3: both stay, as in transformers.
  const std::vector<float> logits = {3.0f, 2.0f, 1.9f, 2.0f, -1.0f, 1.0f};
  SamplingParams params;
  params.temperature = 1.5f;
  params.top_k = 2;
  params.seed = 5;
  const std::vector<int> counts = Histogram(params, logits, 5000);
  EXPECT_EQ(counts[2] + counts[4] + counts[5], 0);
  EXPECT_GT(counts[0], 0);
  EXPECT_GT(counts[1], 0);
  EXPECT_GT(counts[3], 0);
}

TEST(SamplerTest, TopKAtLeastVocabSizeIsANoOp) {
  const std::vector<float> logits = {0.0f, 0.1f, 0.2f};
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_k = 10;
  const std::vector<int> counts = Histogram(params, logits, 3000);
  for (int c : counts) EXPECT_GT(c, 0);
}

TEST(SamplerTest, TopPKeepsTheNucleusWithRenormalizedFrequencies) {
  // Probabilities 0.5, 0.3, 0.15, 0.05. Ascending cumulative: 0.05, 0.2, 0.5, 1.0.
  const std::vector<float> logits = {std::log(0.15f), std::log(0.5f), std::log(0.05f),
                                     std::log(0.3f)};
  constexpr int kDraws = 20000;
  SamplingParams params;
  params.temperature = 1.0f;
  params.seed = 99;

  // 1 - 0.75 = 0.25: removes cumulative 0.05 and 0.2, leaving {0.5, 0.3}.
  params.top_p = 0.75f;
  std::vector<int> counts = Histogram(params, logits, kDraws);
  EXPECT_EQ(counts[0] + counts[2], 0);
  EXPECT_NEAR(static_cast<double>(counts[1]) / kDraws, 0.5 / 0.8, 0.015);
  EXPECT_NEAR(static_cast<double>(counts[3]) / kDraws, 0.3 / 0.8, 0.015);

  // 1 - 0.85 = 0.15: removes only the 0.05 token.
  params.top_p = 0.85f;
  counts = Histogram(params, logits, kDraws);
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(static_cast<double>(counts[0]) / kDraws, 0.15 / 0.95, 0.015);
  EXPECT_NEAR(static_cast<double>(counts[1]) / kDraws, 0.5 / 0.95, 0.015);
  EXPECT_NEAR(static_cast<double>(counts[3]) / kDraws, 0.3 / 0.95, 0.015);
}

TEST(SamplerTest, TopPLargeNucleusHasTheExactBoundary) {
  // Slowly decaying logits put thousands of tokens in the nucleus, past every shortcut the
  // sampler takes before sorting. Token i is more likely than token i + 1, so the nucleus is
  // [0, n) with n the first count whose preceding mass reaches top_p.
  constexpr int32_t kVocab = 8000;
  std::vector<float> logits(kVocab);
  for (int32_t i = 0; i < kVocab; ++i) logits[i] = -0.0007f * static_cast<float>(i);
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_p = 0.8f;
  params.seed = 8;
  const std::vector<double> probs = Softmax(logits, 1.0);
  int32_t nucleus = 0;
  double before = 0.0;
  while (before < params.top_p) before += probs[nucleus++];
  ASSERT_GT(nucleus, 1000);
  ASSERT_LT(nucleus, kVocab - 1000);

  // The last 30 nucleus tokens have about 0.4% of the mass: ~20 hits expected.
  const std::vector<int> counts = Histogram(params, logits, 5000);
  int32_t largest_drawn = 0;
  for (int32_t i = 0; i < kVocab; ++i) {
    if (counts[i] > 0) largest_drawn = i;
  }
  EXPECT_LT(largest_drawn, nucleus);
  EXPECT_GE(largest_drawn, nucleus - 30);
}

TEST(SamplerTest, TopPBreaksTiesByLowestId) {
  // 600 equal logits: the mass before token i is i / 600, so top_p = 0.4992 keeps [0, 300).
  const std::vector<float> logits(600, 0.25f);
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_p = 0.4992f;
  const std::vector<int> counts = Histogram(params, logits, 10000);
  int distinct = 0;
  for (int32_t i = 0; i < 600; ++i) {
    if (i >= 300) {
      EXPECT_EQ(counts[i], 0) << "token " << i;
    }
    if (counts[i] > 0) ++distinct;
  }
  EXPECT_EQ(distinct, 300);
}

TEST(SamplerTest, TopPAppliesAfterTemperature) {
  // At T = 1 the top token has probability 0.5 and top_p = 0.6 also keeps the 0.3 token; at
  // T = 0.25 the top token has 0.5^4 / (0.5^4 + 0.3^4 + ...) > 0.88, so it alone remains.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                     std::log(0.05f)};
  SamplingParams params;
  params.temperature = 0.25f;
  params.top_p = 0.6f;
  const std::vector<int> counts = Histogram(params, logits, 2000);
  EXPECT_EQ(counts[0], 2000);
}

TEST(SamplerTest, TopKThenTopPCombine) {
  const std::vector<float> logits = {std::log(0.4f), std::log(0.3f), std::log(0.2f),
                                     std::log(0.1f)};
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_k = 3;     // {0.4, 0.3, 0.2} -> renormalized {0.444, 0.333, 0.222}.
  params.top_p = 0.7f;  // Removes cumulative <= 0.3: only the 0.222 token.
  const std::vector<int> counts = Histogram(params, logits, 5000);
  EXPECT_EQ(counts[2] + counts[3], 0);
  EXPECT_GT(counts[0], 0);
  EXPECT_GT(counts[1], 0);
}

TEST(SamplerTest, NeverSamplesMinusInfinityAndNeverNaN) {
  const std::vector<float> logits = {-kInf, 0.5f, -kInf, 0.2f, kNaN, -kInf};
  for (float top_p : {1.0f, 0.9f}) {
    SamplingParams params;
    params.temperature = 0.8f;
    params.top_p = top_p;
    params.top_k = 4;
    params.repetition_penalty = 1.3f;
    Sampler sampler(params, static_cast<int32_t>(logits.size()));
    const std::vector<int32_t> history = {0, 1, 4};
    for (int i = 0; i < 3000; ++i) {
      const int32_t token = SampleCopy(sampler, logits, history);
      EXPECT_TRUE(token == 1 || token == 3) << token;
    }
  }
}

TEST(SamplerTest, AllMinusInfinityReturnsZero) {
  const std::vector<float> logits(4, -kInf);
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_p = 0.5f;
  Sampler sampler(params, 4);
  EXPECT_EQ(SampleCopy(sampler, logits), 0);
  Sampler greedy(SamplingParams{}, 4);
  EXPECT_EQ(SampleCopy(greedy, logits), 0);
}

TEST(SamplerTest, PlusInfinityTokensShareTheMass) {
  const std::vector<float> logits = {1.0f, kInf, 3.0f, kInf};
  SamplingParams params;
  params.temperature = 1.0f;
  params.seed = 3;
  const std::vector<int> counts = Histogram(params, logits, 4000);
  EXPECT_EQ(counts[0] + counts[2], 0);
  EXPECT_GT(counts[1], 1500);
  EXPECT_GT(counts[3], 1500);
}

TEST(SamplerTest, TinyTemperatureActsLikeArgmax) {
  // 4.0 / 1e-38 and 3.5 / 1e-38 both overflow float to +inf; the larger must still win.
  const std::vector<float> logits = {4.0f, 3.5f, -1.0f};
  SamplingParams params;
  params.temperature = 1e-38f;
  const std::vector<int> counts = Histogram(params, logits, 500);
  EXPECT_EQ(counts[0], 500);
}

TEST(SamplerTest, LargeLogitsDoNotOverflowSoftmax) {
  // exp(1000) overflows even a double; softmax must be computed relative to the maximum.
  const std::vector<float> logits = {999.0f, 1000.0f, 990.0f};
  SamplingParams params;
  params.temperature = 1.0f;
  params.seed = 17;
  constexpr int kDraws = 20000;
  const std::vector<int> counts = Histogram(params, logits, kDraws);
  const std::vector<double> probs = Softmax(logits, 1.0);
  for (size_t i = 0; i < logits.size(); ++i) {
    EXPECT_NEAR(static_cast<double>(counts[i]) / kDraws, probs[i], 0.015) << "token " << i;
  }
}

TEST(SamplerTest, LargeVocabularyStaysInRange) {
  constexpr int32_t kVocab = 32000;
  std::vector<float> logits(kVocab);
  for (int32_t i = 0; i < kVocab; ++i) logits[i] = std::sin(0.37f * static_cast<float>(i)) * 4;
  SamplingParams params;
  params.temperature = 0.9f;
  params.top_k = 40;
  params.top_p = 0.9f;
  params.repetition_penalty = 1.1f;
  Sampler sampler(params, kVocab);
  std::vector<int32_t> history = {1, 2, 3};
  for (int i = 0; i < 50; ++i) {
    const int32_t token = SampleCopy(sampler, logits, history);
    ASSERT_GE(token, 0);
    ASSERT_LT(token, kVocab);
  }
}

}  // namespace
}  // namespace moe
