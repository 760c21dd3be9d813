// Golden tests: the engine against transformers. Each fixture under tests/testdata/models/ was
// written by tools/fixtures/gen_models.py together with the logits and greedy tokens that
// transformers computed in float32 from the same stored weights.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "coordinator/generator.h"
#include "coordinator/local_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_helpers.h"
#include "tests/testutil/golden_fixture.h"

namespace moe {
namespace {

constexpr char kModels[] = "tests/testdata/models/";

using testing::GoldenExpected;
using testing::LoadExpected;

struct Case {
  std::string fixture;
  int64_t workers;
};

class GoldenTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    dir_ = std::string(kModels) + GetParam().fixture;
    LocalModelOptions options;
    options.model_dir = dir_;
    options.in_process_workers = GetParam().workers;
    auto m = LocalModel::Create(options);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    auto expected = LoadExpected(dir_);
    ASSERT_TRUE(expected.ok()) << expected.status();
    expected_ = std::move(*expected);
  }
  std::string dir_;
  std::unique_ptr<LocalModel> model_;
  GoldenExpected expected_;
};

TEST_P(GoldenTest, PrefillLogitsMatchTransformersAtEveryPosition) {
  testing::ExpectPrefillMatchesGolden(*model_, expected_);
}

TEST_P(GoldenTest, DecodeLogitsMatchTransformersStepByStep) {
  testing::ExpectDecodeMatchesGolden(*model_, expected_);
}

TEST_P(GoldenTest, GreedyTokensEqualTransformers) {
  GenerationRequest r;
  r.prompt = expected_.prompt;
  r.params.max_tokens = static_cast<int64_t>(expected_.greedy.size());
  r.params.ignore_eos = true;
  auto out = Generate(model_->engine(), model_->tokenizer(), {&r, 1}, nullptr);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].tokens, expected_.greedy);
  EXPECT_EQ((*out)[0].finish, FinishReason::kLength);
  EXPECT_EQ(model_->engine()->kv_cache().used_blocks(), 0);
}

TEST_P(GoldenTest, BatchedSequencesEqualSolo) {
  // The prompt and two shorter prefixes of it decode together; each must get what it gets alone.
  std::vector<GenerationRequest> requests(3);
  for (size_t i = 0; i < requests.size(); ++i) {
    const size_t len = expected_.prompt.size() - 5 * i;
    requests[i].prompt.assign(expected_.prompt.begin(), expected_.prompt.begin() + len);
    requests[i].params.max_tokens = 8 + 2 * i;
    requests[i].params.ignore_eos = true;
  }
  auto batched = Generate(model_->engine(), model_->tokenizer(), requests, nullptr);
  ASSERT_TRUE(batched.ok()) << batched.status();
  for (size_t i = 0; i < requests.size(); ++i) {
    auto solo = Generate(model_->engine(), model_->tokenizer(), {&requests[i], 1}, nullptr);
    ASSERT_TRUE(solo.ok());
    EXPECT_EQ((*batched)[i].tokens, (*solo)[0].tokens) << "request " << i;
  }
  EXPECT_EQ(std::vector<int32_t>((*batched)[0].tokens),
            std::vector<int32_t>(expected_.greedy.begin(), expected_.greedy.begin() + 8));
}

// log_softmax of a reference logits row, in double.
std::vector<double> ReferenceLogSoftmax(const float* row, int64_t n) {
  const double max = *std::max_element(row, row + n);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(row[i] - max);
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = row[i] - max - std::log(sum);
  return out;
}

// Our logprobs vs transformers' logits (bound: twice the logits tolerance), the top-N ids vs
// the reference's order where the reference is not within the tolerance of a tie.
void ExpectLogprobsNear(const TokenLogprobs& got, const float* ref_row, int64_t vocab,
                        int32_t token, size_t top_n, const std::string& what) {
  const std::vector<double> ref = ReferenceLogSoftmax(ref_row, vocab);
  float max_ref = 0;
  for (int64_t i = 0; i < vocab; ++i) max_ref = std::max(max_ref, std::fabs(ref_row[i]));
  const double tol = 2e-3 * max_ref;
  EXPECT_EQ(got.token, token) << what;
  EXPECT_NEAR(got.logprob, ref[token], tol) << what;
  ASSERT_EQ(got.top.size(), top_n) << what;
  std::vector<int32_t> order(vocab);
  for (int32_t i = 0; i < vocab; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return ref[a] > ref[b]; });
  for (size_t k = 0; k < top_n; ++k) {
    EXPECT_NEAR(got.top[k].logprob, ref[order[k]], tol) << what << " top " << k;
    if (k + 1 < top_n && ref[order[k]] - ref[order[k + 1]] > 2 * tol &&
        (k == 0 || ref[order[k - 1]] - ref[order[k]] > 2 * tol)) {
      EXPECT_EQ(got.top[k].token, order[k]) << what << " top " << k;
    }
  }
}

TEST_P(GoldenTest, PromptAndTokenLogprobsMatchTransformers) {
  const int64_t vocab = model_->config().vocab_size;
  GenerationRequest r;
  r.prompt = expected_.prompt;
  r.params.max_tokens = static_cast<int64_t>(expected_.greedy.size());
  r.params.ignore_eos = true;
  r.params.logprobs = 3;
  r.params.prompt_logprobs = 5;
  auto out = Generate(model_->engine(), model_->tokenizer(), {&r, 1}, nullptr);
  ASSERT_TRUE(out.ok()) << out.status();
  const GenerationOutput& o = (*out)[0];
  EXPECT_EQ(o.tokens, expected_.greedy);  // all_logits at prefill changes nothing
  ASSERT_EQ(o.prompt_logprobs.size(), expected_.prompt.size() - 1);
  for (size_t i = 0; i + 1 < expected_.prompt.size(); ++i) {
    ExpectLogprobsNear(o.prompt_logprobs[i], &expected_.logits[i * vocab], vocab,
                       expected_.prompt[i + 1], 5, "prompt position " + std::to_string(i + 1));
  }
  ASSERT_EQ(o.logprobs.size(), expected_.greedy.size());
  for (size_t i = 0; i < expected_.greedy.size(); ++i) {
    ExpectLogprobsNear(o.logprobs[i], &expected_.decode_logits[i * vocab], vocab,
                       expected_.greedy[i], 3, "generated token " + std::to_string(i));
  }
  // Scoring only: the same prompt logprobs, no token.
  r.params.max_tokens = 0;
  auto scored = Generate(model_->engine(), model_->tokenizer(), {&r, 1}, nullptr);
  ASSERT_TRUE(scored.ok()) << scored.status();
  EXPECT_TRUE((*scored)[0].tokens.empty());
  EXPECT_EQ((*scored)[0].finish, FinishReason::kLength);
  ASSERT_EQ((*scored)[0].prompt_logprobs.size(), o.prompt_logprobs.size());
  for (size_t i = 0; i < o.prompt_logprobs.size(); ++i) {
    EXPECT_EQ((*scored)[0].prompt_logprobs[i].logprob, o.prompt_logprobs[i].logprob) << i;
  }
  EXPECT_EQ(model_->engine()->kv_cache().used_blocks(), 0);
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (const char* f : {"mixtral_32e_gqa_fp16", "mixtral_16e_mha_hd100", "mixtral_3e_sliding_bf16",
                        "mixtral_4e_tied_fused_sharded", "mixtral_8e_top3_no_rope_theta",
                        "llama_dense", "mixtral_4e_h256_kquant"}) {
    cases.push_back({f, 1});
  }
  // Uneven expert splits over in-process workers must not change the result.
  cases.push_back({"mixtral_3e_sliding_bf16", 2});
  cases.push_back({"mixtral_32e_gqa_fp16", 3});
  cases.push_back({"mixtral_8e_top3_no_rope_theta", 3});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.fixture + "_w" + std::to_string(info.param.workers);
                         });

// --experts-per-token K against transformers with num_experts_per_tok = K on the same weights
// (tools/fixtures/gen_topk_override.py): prompt and decode logits, greedy tokens, in-process with
// 1 and 2 workers.
TEST(ExpertsPerTokenTest, OverrideMatchesTransformersWithThatTopK) {
  for (const auto& [fixture, k] :
       std::vector<std::pair<std::string, int64_t>>{{"mixtral_8e_top3_no_rope_theta", 1},
                                                    {"mixtral_8e_top3_no_rope_theta", 2},
                                                    {"mixtral_32e_gqa_fp16", 1}}) {
    const std::string dir = std::string(kModels) + fixture;
    const std::string stem = dir + "/top" + std::to_string(k) + ".expected";
    SCOPED_TRACE(stem);
    for (int64_t workers : {1, 2}) {
      LocalModelOptions options;
      options.model_dir = dir;
      options.in_process_workers = workers;
      options.engine.experts_per_token = k;
      auto m = LocalModel::Create(options);
      ASSERT_TRUE(m.ok()) << m.status();
      EXPECT_EQ((*m)->engine()->config().num_experts_per_tok, k);
      EXPECT_GT((*m)->config().num_experts_per_tok, k);  // the checkpoint's stays
      auto expected =
          testing::LoadExpected(stem + ".json", stem + ".safetensors", (*m)->config().vocab_size);
      ASSERT_TRUE(expected.ok()) << expected.status();
      testing::ExpectPrefillMatchesGolden(**m, *expected);
      testing::ExpectDecodeMatchesGolden(**m, *expected);
      GenerationRequest r;
      r.prompt = expected->prompt;
      r.params.max_tokens = static_cast<int64_t>(expected->greedy.size());
      r.params.ignore_eos = true;
      auto out = Generate((*m)->engine(), (*m)->tokenizer(), {&r, 1}, nullptr);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ((*out)[0].tokens, expected->greedy);
    }
  }
}

// Per request: in one step, a sequence routed to 1 expert and one to the model's 3 get
// transformers' logits for top-1 and for top-3 respectively; and Generate with
// params.experts_per_token = 2 gives the top-2 greedy tokens, beside a default request.
TEST(ExpertsPerTokenTest, PerRequestOverrideMixesWithTheModelsTopKInOneBatch) {
  const std::string dir = std::string(kModels) + "mixtral_8e_top3_no_rope_theta";
  for (int64_t workers : {1, 2}) {
    LocalModelOptions options;
    options.model_dir = dir;
    options.in_process_workers = workers;
    auto m = LocalModel::Create(options);
    ASSERT_TRUE(m.ok()) << m.status();
    const int64_t vocab = (*m)->config().vocab_size;
    auto top1 = testing::LoadExpected(dir + "/top1.expected.json",
                                      dir + "/top1.expected.safetensors", vocab);
    auto top2 = testing::LoadExpected(dir + "/top2.expected.json",
                                      dir + "/top2.expected.safetensors", vocab);
    auto model = LoadExpected(dir);
    ASSERT_TRUE(top1.ok() && top2.ok() && model.ok());
    SequenceState a, b;
    const StepInput inputs[] = {{&a, top1->prompt, true, 1}, {&b, model->prompt, true, 0}};
    std::vector<float> logits;
    ASSERT_TRUE((*m)->engine()->Step(inputs, &logits).ok());
    const int64_t n = static_cast<int64_t>(top1->prompt.size());
    for (int64_t p = 0; p < n; ++p) {
      testing::ExpectLogitsNear(&logits[p * vocab], &top1->logits[p * vocab], vocab,
                                "top-1 position " + std::to_string(p));
      testing::ExpectLogitsNear(&logits[(n + p) * vocab], &model->logits[p * vocab], vocab,
                                "top-3 position " + std::to_string(p));
    }
    GenerationRequest requests[2];
    for (GenerationRequest& r : requests) {
      r.prompt = model->prompt;
      r.params.max_tokens = static_cast<int64_t>(model->greedy.size());
      r.params.ignore_eos = true;
    }
    requests[0].params.experts_per_token = 2;
    auto out = Generate((*m)->engine(), (*m)->tokenizer(), requests, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ((*out)[0].tokens, top2->greedy);
    EXPECT_EQ((*out)[1].tokens, model->greedy);
    requests[0].params.experts_per_token = 4;
    auto bad = Generate((*m)->engine(), (*m)->tokenizer(), {&requests[0], 1}, nullptr);
    ASSERT_FALSE(bad.ok());
    EXPECT_THAT(std::string(bad.status().message()),
                ::testing::HasSubstr("experts_per_token must be in [1, 3]"));
  }
}

TEST(ExpertsPerTokenTest, OutOfRangeIsRefusedNamingTheBound) {
  for (int64_t k : {-1, 4}) {
    LocalModelOptions options;
    options.model_dir = std::string(kModels) + "mixtral_8e_top3_no_rope_theta";
    options.engine.experts_per_token = k;
    auto m = LocalModel::Create(options);
    ASSERT_FALSE(m.ok()) << k;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(m.status().message()),
                ::testing::HasSubstr("must be between 1 and the model's 3 experts per token"));
  }
}

TEST(GoldenConfigTest, MissingRopeThetaTakesMixtralDefault) {
  auto c = LoadModelConfig(std::string(kModels) + "mixtral_8e_top3_no_rope_theta");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_theta, 1e6);
}

TEST(GoldenConfigTest, SlidingWindowShorterThanPrompt) {
  auto c = LoadModelConfig(std::string(kModels) + "mixtral_3e_sliding_bf16");
  ASSERT_TRUE(c.ok()) << c.status();
  auto e = LoadExpected(std::string(kModels) + "mixtral_3e_sliding_bf16");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_GT(c->sliding_window, 0);
  EXPECT_LT(c->sliding_window, static_cast<int64_t>(e->prompt.size()));
}

}  // namespace
}  // namespace moe
