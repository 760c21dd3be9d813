// Golden tests: the engine against transformers. Each fixture under tests/testdata/models/ was
// written by tools/fixtures/gen_models.py together with the logits and greedy tokens that
// transformers computed in float32 from the same stored weights.
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
