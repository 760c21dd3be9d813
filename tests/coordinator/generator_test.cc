#include "coordinator/generator.h"

#include <cmath>
#include <filesystem>

#include "coordinator/local_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_helpers.h"
#include "tests/testutil/checkpoint_writer.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

constexpr char kFixture[] = "tests/testdata/models/mixtral_32e_gqa_fp16";

TEST(ComputeLogprobsTest, ExactLogSoftmaxAndTopInOrderWithTiesByLowerId) {
  const std::vector<float> logits = {1.0f, 3.0f, NAN, 3.0f, -INFINITY, 0.5f};
  TokenLogprobs out;
  ComputeLogprobs(logits, 5, 4, &out);
  const double z = std::log(std::exp(1.0) + 2 * std::exp(3.0) + std::exp(0.5));
  EXPECT_EQ(out.token, 5);
  EXPECT_NEAR(out.logprob, 0.5 - z, 1e-6);
  ASSERT_EQ(out.top.size(), 4u);
  const int32_t ids[] = {1, 3, 0, 5};
  for (int k = 0; k < 4; ++k) EXPECT_EQ(out.top[k].token, ids[k]) << k;
  EXPECT_NEAR(out.top[0].logprob, 3.0 - z, 1e-6);
  EXPECT_EQ(out.top[0].logprob, out.top[1].logprob);
  // NaN and -inf logits have probability 0; more alternatives than the vocabulary: all.
  ComputeLogprobs(logits, 2, 20, &out);
  EXPECT_EQ(out.logprob, -INFINITY);
  ASSERT_EQ(out.top.size(), logits.size());
  EXPECT_EQ(out.top[5].logprob, -INFINITY);
  ComputeLogprobs(logits, 1, 0, &out);
  EXPECT_TRUE(out.top.empty());
}

TEST(StopMatcherTest, HoldsBackPossibleStartAndCutsAtStop) {
  StopMatcher m({"END", "xyz"});
  bool stopped = false;
  EXPECT_EQ(m.Add("hello E", &stopped), "hello ");  // "E" may start "END"
  EXPECT_FALSE(stopped);
  EXPECT_EQ(m.Add("N", &stopped), "");
  EXPECT_EQ(m.Add("X more", &stopped), "ENX more");  // not a stop after all
  EXPECT_EQ(m.Add(" and EN", &stopped), " and ");
  EXPECT_EQ(m.Add("D tail", &stopped), "");
  EXPECT_TRUE(stopped);
  EXPECT_EQ(m.text(), "hello ENX more and ");
}

TEST(StopMatcherTest, EarliestStopWinsAndFlushReturnsHeldText) {
  StopMatcher m({"bc", "ab"});
  bool stopped = false;
  EXPECT_EQ(m.Add("xabc", &stopped), "x");
  EXPECT_TRUE(stopped);
  StopMatcher n({"stop"});
  EXPECT_EQ(n.Add("la st", &stopped), "la ");
  EXPECT_EQ(n.Flush(), "st");
  StopMatcher none({});
  EXPECT_EQ(none.Add("anything", &stopped), "anything");
}

TEST(StopMatcherTest, StopSpanningManyDeltas) {
  StopMatcher m({"<|end|>"});
  bool stopped = false;
  std::string out;
  for (const char* d : {"a", "<", "|", "en", "d|", ">", "b"}) {
    out += m.Add(d, &stopped);
    if (stopped) break;
  }
  EXPECT_TRUE(stopped);
  EXPECT_EQ(out, "a");
}

class GeneratorTest : public ::testing::Test {
 protected:
  void SetUp() override { Load(kFixture); }
  void Load(const std::string& dir) {
    LocalModelOptions options;
    options.model_dir = dir;
    auto m = LocalModel::Create(options);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
  }
  absl::StatusOr<std::vector<GenerationOutput>> Run(std::vector<GenerationRequest> requests,
                                                    std::vector<std::string>* streamed = nullptr) {
    if (streamed) streamed->assign(requests.size(), "");
    return Generate(model_->engine(), model_->tokenizer(), requests,
                    [&](size_t i, int32_t, std::string_view delta) {
                      if (streamed) (*streamed)[i] += delta;
                    });
  }
  GenerationRequest Request(const std::string& text, int64_t max_tokens) {
    return testing::FixedLengthRequest(*model_->tokenizer(), text, max_tokens);
  }
  std::unique_ptr<LocalModel> model_;
};

TEST_F(GeneratorTest, StreamedDeltasConcatenateToTheText) {
  std::vector<std::string> streamed;
  auto out = Run({Request("We hold these truths", 24)}, &streamed);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].tokens.size(), 24u);
  EXPECT_EQ(streamed[0], (*out)[0].text);
  // The completion continues the prompt: prompt text + completion == Decode(prompt + tokens).
  std::vector<int32_t> all = Request("We hold these truths", 1).prompt;
  const std::string prompt_text = model_->tokenizer()->Decode(all);
  all.insert(all.end(), (*out)[0].tokens.begin(), (*out)[0].tokens.end());
  EXPECT_EQ(prompt_text + (*out)[0].text, model_->tokenizer()->Decode(all));
}

TEST_F(GeneratorTest, StopStringEndsGenerationBeforeIt) {
  auto full = Run({Request("Four score and seven", 32)});
  ASSERT_TRUE(full.ok());
  const std::string text = (*full)[0].text;
  ASSERT_GE(text.size(), 12u);
  const std::string stop = text.substr(6, 3);
  GenerationRequest r = Request("Four score and seven", 32);
  r.params.stop = {stop};
  std::vector<std::string> streamed;
  auto out = Run({r}, &streamed);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ((*out)[0].finish, FinishReason::kStop);
  EXPECT_EQ((*out)[0].text, text.substr(0, text.find(stop)));
  EXPECT_EQ(streamed[0], (*out)[0].text);
  EXPECT_LT((*out)[0].tokens.size(), 32u);
}

TEST_F(GeneratorTest, SeededSamplingIsDeterministicAndBatchIndependent) {
  GenerationRequest a = Request("When in the course", 16);
  a.params.sampling = {
      .temperature = 0.9f, .top_k = 40, .top_p = 0.95f, .repetition_penalty = 1.1f, .seed = 42};
  GenerationRequest b = Request("Congress shall make no law", 10);
  b.params.sampling = {.temperature = 1.3f, .seed = 7};
  GenerationRequest c = Request("Hi", 12);
  auto solo = Run({a});
  auto again = Run({a});
  auto batched = Run({b, a, c});
  ASSERT_TRUE(solo.ok() && again.ok() && batched.ok());
  EXPECT_EQ((*solo)[0].tokens, (*again)[0].tokens);
  EXPECT_EQ((*batched)[1].tokens, (*solo)[0].tokens);
  GenerationRequest other_seed = a;
  other_seed.params.sampling.seed = 43;
  auto different = Run({other_seed});
  ASSERT_TRUE(different.ok());
  EXPECT_NE((*different)[0].tokens, (*solo)[0].tokens);
  EXPECT_EQ(model_->engine()->kv_cache().used_blocks(), 0);
}

TEST_F(GeneratorTest, StopsOnEos) {
  // Make the 4th greedy token the EOS id of a copy of the model.
  auto greedy = Run({Request("Liberty", 6)});
  ASSERT_TRUE(greedy.ok());
  const int32_t eos = (*greedy)[0].tokens[3];
  const std::string dir = testing::TempDir("eos");
  for (const auto& f : std::filesystem::directory_iterator(kFixture)) {
    std::filesystem::copy(f.path(), dir + "/" + f.path().filename().string());
  }
  testing::WriteText(dir + "/generation_config.json",
                     "{\"bos_token_id\": 1, \"eos_token_id\": [" + std::to_string(eos) + ", 2]}");
  Load(dir);
  GenerationRequest r = Request("Liberty", 6);
  r.params.ignore_eos = false;
  auto out = Run({r});
  ASSERT_TRUE(out.ok());
  EXPECT_EQ((*out)[0].finish, FinishReason::kEos);
  EXPECT_EQ((*out)[0].tokens.size(), 4u);
  EXPECT_EQ((*out)[0].tokens.back(), eos);
}

TEST_F(GeneratorTest, InvalidRequestsNameTheParameter) {
  const ModelConfig& c = model_->config();
  struct Bad {
    std::function<void(GenerationRequest*)> mutate;
    const char* message;
  };
  const std::vector<Bad> cases = {
      {[](GenerationRequest* r) { r->prompt.clear(); }, "prompt is empty"},
      {[](GenerationRequest* r) { r->params.max_tokens = 0; }, "max_tokens must be >= 1"},
      {[&](GenerationRequest* r) { r->params.max_tokens = c.max_position_embeddings; },
       "exceeds the context"},
      {[&](GenerationRequest* r) { r->prompt.assign(c.max_position_embeddings + 1, 5); },
       "longer than the model's context"},
      {[&](GenerationRequest* r) { r->prompt.push_back(static_cast<int32_t>(c.vocab_size)); },
       "outside the vocabulary"},
      {[](GenerationRequest* r) { r->params.sampling.temperature = -1; }, "temperature"},
      {[](GenerationRequest* r) { r->params.sampling.top_p = 0; }, "top_p"},
      {[](GenerationRequest* r) { r->params.stop = {""}; }, "stop strings"},
      {[](GenerationRequest* r) { r->params.logprobs = kMaxTopLogprobs + 1; }, "logprobs must be"},
      {[](GenerationRequest* r) { r->params.prompt_logprobs = -2; }, "prompt_logprobs must be"},
      {[](GenerationRequest* r) {
         r->params.max_tokens = -1;
         r->params.prompt_logprobs = 0;
       },
       "max_tokens must be >= 0"},
  };
  for (const Bad& b : cases) {
    GenerationRequest r = Request("x", 4);
    b.mutate(&r);
    auto out = Run({r});
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << b.message;
    EXPECT_THAT(out.status().message(), HasSubstr(b.message));
  }
  EXPECT_EQ(model_->engine()->kv_cache().used_blocks(), 0);
}

TEST_F(GeneratorTest, KvCacheExhaustionIsAnErrorNotACrash) {
  LocalModelOptions options;
  options.model_dir = kFixture;
  options.engine.kv_cache = {.block_size = 4, .num_blocks = 3};
  auto m = LocalModel::Create(options);
  ASSERT_TRUE(m.ok());
  model_ = std::move(*m);
  auto out = Run({Request("a long enough prompt to need many blocks of four", 8)});
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(model_->engine()->kv_cache().used_blocks(), 0);
}

}  // namespace
}  // namespace moe
