#include "common/model_config.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

Json Mixtral() {
  return Json{{"architectures", {"MixtralForCausalLM"}},
              {"vocab_size", 32000},
              {"hidden_size", 3200},
              {"intermediate_size", 8640},
              {"num_hidden_layers", 26},
              {"num_attention_heads", 32},
              {"max_position_embeddings", 2048},
              {"num_local_experts", 16},
              {"num_experts_per_tok", 2},
              {"rms_norm_eps", 1e-6},
              {"sliding_window", nullptr}};
}

absl::StatusOr<ModelConfig> Parse(const Json& j) {
  return ParseModelConfig(j.dump(), "config.json");
}

TEST(ModelConfigTest, RaidenShapeDefaults) {
  auto c = Parse(Mixtral());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->is_moe);
  EXPECT_EQ(c->head_dim, 100);            // 3200 / 32: not a power of two
  EXPECT_EQ(c->num_key_value_heads, 32);  // defaults to heads (MHA)
  EXPECT_EQ(c->rope_theta, 1e6);          // Mixtral default when absent
  EXPECT_EQ(c->sliding_window, 0);        // null = full attention
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
}

TEST(ModelConfigTest, RopeThetaTopLevelAndNested) {
  Json j = Mixtral();
  j["rope_theta"] = 10000.0;
  EXPECT_EQ(Parse(j)->rope_theta, 1e4);
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  EXPECT_EQ(Parse(j)->rope_theta, 5e5);
}

TEST(ModelConfigTest, DenseLlamaIsOneExpert) {
  Json j = Mixtral();
  j["architectures"] = {"LlamaForCausalLM"};
  j.erase("num_local_experts");
  j.erase("num_experts_per_tok");
  j["num_key_value_heads"] = 4;
  j["head_dim"] = 64;
  j["tie_word_embeddings"] = true;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->is_moe);
  EXPECT_EQ(c->num_local_experts, 1);
  EXPECT_EQ(c->num_experts_per_tok, 1);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->rope_theta, 1e4);  // Llama default
  EXPECT_TRUE(c->tie_word_embeddings);
}

struct BadConfig {
  const char* name;
  std::function<void(Json*)> mutate;
  const char* message;
};

class BadConfigTest : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigTest, ClearError) {
  Json j = Mixtral();
  GetParam().mutate(&j);
  absl::Status s = Parse(j).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(GetParam().message));
  EXPECT_THAT(s.message(), HasSubstr("config.json"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadConfigTest,
    ::testing::Values(
        BadConfig{"TopKAboveExperts", [](Json* j) { (*j)["num_experts_per_tok"] = 17; },
                  "num_experts_per_tok (17) is larger than num_local_experts (16)"},
        BadConfig{"MissingHidden", [](Json* j) { j->erase("hidden_size"); }, "hidden_size"},
        BadConfig{"ZeroLayers", [](Json* j) { (*j)["num_hidden_layers"] = 0; }, "positive integer"},
        BadConfig{"HeadsNotMultipleOfKv", [](Json* j) { (*j)["num_key_value_heads"] = 5; },
                  "not a multiple"},
        BadConfig{"UnknownArch", [](Json* j) { (*j)["architectures"] = {"GPT2LMHeadModel"}; },
                  "not supported"},
        BadConfig{"RopeScaling",
                  [](Json* j) {
                    (*j)["rope_scaling"] = {{"type", "linear"}};
                  },
                  "rope_scaling"},
        BadConfig{"Gelu", [](Json* j) { (*j)["hidden_act"] = "gelu"; }, "hidden_act"},
        BadConfig{"AttentionBias", [](Json* j) { (*j)["attention_bias"] = true; },
                  "attention_bias"},
        BadConfig{"NegativeEps", [](Json* j) { (*j)["rms_norm_eps"] = -1; }, "rms_norm_eps"},
        BadConfig{"StringVocab", [](Json* j) { (*j)["vocab_size"] = "big"; }, "vocab_size"}),
    [](const ::testing::TestParamInfo<BadConfig>& info) { return info.param.name; });

TEST(ModelConfigTest, MalformedJsonAndMissingFile) {
  EXPECT_THAT(ParseModelConfig("{", "c.json").status().message(), HasSubstr("not a valid JSON"));
  EXPECT_EQ(LoadModelConfig("/nonexistent").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace moe
