// GGUF models: the config from the metadata, the weights from the tensors, and the errors for
// files moe-cluster cannot serve. Numerics against transformers: gguf_golden_test.
#include "common/gguf_model.h"

#include <functional>
#include <string>
#include <vector>

#include "common/checkpoint.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testutil/checkpoint_writer.h"
#include "tests/testutil/gguf_writer.h"

namespace moe {
namespace {

using testing::GgufBuilder;
using ::testing::HasSubstr;

constexpr uint32_t kF32 = 0;
constexpr int64_t kHidden = 32, kFfn = 64, kVocab = 8;

std::vector<uint8_t> F32Bytes(int64_t n) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = 0.01f * static_cast<float>(i % 13);
  std::vector<uint8_t> b(n * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// A one-layer dense llama GGUF, hidden 32, 2 heads. `metadata` runs first: the keys it sets
// replace the defaults.
std::string WriteTinyLlama(const std::string& name,
                           const std::function<void(GgufBuilder*)>& metadata = nullptr,
                           const std::string& skip_tensor = "", uint32_t ffn_gate_type = kF32) {
  GgufBuilder b;
  if (metadata) metadata(&b);
  if (!b.Has("general.architecture")) b.String("general.architecture", "llama");
  for (const auto& [key, value] :
       std::vector<std::pair<std::string, uint32_t>>{{"llama.embedding_length", kHidden},
                                                     {"llama.block_count", 1},
                                                     {"llama.attention.head_count", 2},
                                                     {"llama.attention.head_count_kv", 1},
                                                     {"llama.feed_forward_length", kFfn},
                                                     {"llama.context_length", 64}}) {
    if (!b.Has(key)) b.U32(key, value);
  }
  b.F32("llama.rope.freq_base", 5e5f).F32("llama.attention.layer_norm_rms_epsilon", 1e-6f);
  const auto add = [&](const std::string& t, std::vector<uint64_t> dims, uint32_t type = kF32) {
    if (t == skip_tensor) return;
    int64_t n = 1;
    for (uint64_t d : dims) n *= static_cast<int64_t>(d);
    std::vector<uint8_t> bytes =
        type == kF32 ? F32Bytes(n) : testing::PatternTensorBytes(type, n, 1);
    b.Tensor(t, dims, type, bytes);
  };
  add("token_embd.weight", {kHidden, kVocab});
  add("output_norm.weight", {kHidden});
  add("blk.0.attn_norm.weight", {kHidden});
  add("blk.0.ffn_norm.weight", {kHidden});
  add("blk.0.attn_q.weight", {kHidden, kHidden});
  add("blk.0.attn_k.weight", {kHidden, kHidden / 2});
  add("blk.0.attn_v.weight", {kHidden, kHidden / 2});
  add("blk.0.attn_output.weight", {kHidden, kHidden});
  add("blk.0.ffn_gate.weight", {kHidden, kFfn}, ffn_gate_type);
  add("blk.0.ffn_up.weight", {kHidden, kFfn});
  add("blk.0.ffn_down.weight", {kFfn, kHidden});
  const std::string dir = testing::TempDir(name);
  testing::WriteFile(dir + "/model.gguf", b.Build());
  return dir;
}

TEST(GgufModelTest, ConfigFromMetadata) {
  auto c = Checkpoint::Open(WriteTinyLlama("config"));  // a directory holding one .gguf
  ASSERT_TRUE(c.ok()) << c.status();
  const ModelConfig& m = (*c)->config();
  EXPECT_TRUE((*c)->is_gguf());
  EXPECT_EQ(m.architecture, "LlamaForCausalLM");
  EXPECT_FALSE(m.is_moe);
  EXPECT_EQ(m.hidden_size, kHidden);
  EXPECT_EQ(m.num_attention_heads, 2);
  EXPECT_EQ(m.num_key_value_heads, 1);
  EXPECT_EQ(m.head_dim, 16);
  EXPECT_EQ(m.intermediate_size, kFfn);
  EXPECT_EQ(m.vocab_size, kVocab);
  EXPECT_EQ(m.max_position_embeddings, 64);
  EXPECT_FLOAT_EQ(static_cast<float>(m.rope_theta), 5e5f);
  EXPECT_FLOAT_EQ(static_cast<float>(m.rms_norm_eps), 1e-6f);
  EXPECT_TRUE(m.tie_word_embeddings);  // no output.weight
  EXPECT_TRUE(m.rope_interleaved);
  auto w = (*c)->LoadWeights(WeightsOptions{});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->layer(0).q_proj.rows, kHidden);
  EXPECT_EQ((*w)->expert(0, 0).w2.cols, kFfn);
  EXPECT_EQ((*w)->lm_head().data, (*w)->embed_tokens().data);
}

TEST(GgufModelTest, ChatTemplateFromMetadata) {
  const std::string chatml =
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
      "<|im_end|>\n{% endfor %}";
  auto with = Checkpoint::Open(WriteTinyLlama(
      "chat_template", [&](GgufBuilder* b) { b->String("tokenizer.chat_template", chatml); }));
  ASSERT_TRUE(with.ok()) << with.status();
  auto source = (*with)->ChatTemplateSource();
  ASSERT_TRUE(source.ok()) << source.status();
  EXPECT_EQ(*source, chatml);
  auto without = Checkpoint::Open(WriteTinyLlama("no_chat_template"));
  ASSERT_TRUE(without.ok()) << without.status();
  auto none = (*without)->ChatTemplateSource();
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(), ::testing::HasSubstr("--chat-template"));
}

TEST(GgufModelTest, MixtralFixtureConfigAndExpertSlices) {
  const std::string file =
      "tests/testdata/gguf/mixtral_32e_gqa_fp16/mixtral_32e_gqa_fp16-q8_0.gguf";
  auto c = Checkpoint::Open(file);
  ASSERT_TRUE(c.ok()) << c.status();
  const ModelConfig& m = (*c)->config();
  EXPECT_EQ(m.architecture, "MixtralForCausalLM");
  EXPECT_EQ(m.num_local_experts, 32);
  EXPECT_EQ(m.num_experts_per_tok, 2);
  EXPECT_EQ(m.num_attention_heads / m.num_key_value_heads, 8);
  // A worker's slice maps exactly its share of the stacked expert tensors.
  WeightsOptions all, quarter;
  all.load_shared = quarter.load_shared = false;
  quarter.experts = {8, 16};
  auto w_all = (*c)->LoadWeights(all);
  auto w_quarter = (*c)->LoadWeights(quarter);
  ASSERT_TRUE(w_all.ok() && w_quarter.ok());
  EXPECT_EQ((*w_all)->dtype(), DType::kQ8_0);
  EXPECT_GT((*w_quarter)->mapped_tensor_bytes(), 0u);
  EXPECT_EQ((*w_quarter)->mapped_tensor_bytes() * 4, (*w_all)->mapped_tensor_bytes());
  EXPECT_EQ((*w_quarter)->mapped_tensor_bytes(), (*w_quarter)->expert_bytes());
  // Expert 8's w1 of the slice is the 9th slice of blk.0.ffn_gate_exps.
  auto file_only = GgufFile::Open(file);
  ASSERT_TRUE(file_only.ok());
  const GgufTensorInfo* gate = (*file_only)->FindTensor("blk.0.ffn_gate_exps.weight");
  ASSERT_NE(gate, nullptr);
  const uint64_t slice = gate->byte_size / 32;
  EXPECT_EQ(
      std::memcmp((*w_quarter)->expert(0, 8).w1.data, (*file_only)->Data(*gate, 8 * slice), slice),
      0);
  EXPECT_NE((*c)->fingerprint(), "");
}

struct BadModel {
  const char* name;
  std::function<void(GgufBuilder*)> metadata;
  std::string skip_tensor;
  uint32_t ffn_gate_type;
  const char* message;
};

TEST(GgufModelTest, FilesItCannotServeGiveClearErrors) {
  const std::vector<BadModel> cases = {
      {"arch", [](GgufBuilder* b) { b->String("general.architecture", "gpt2"); }, "", kF32,
       "architecture \"gpt2\" is not supported"},
      {"rope scaling", [](GgufBuilder* b) { b->String("llama.rope.scaling.type", "yarn"); }, "",
       kF32, "RoPE scaling is not supported"},
      {"partial rope", [](GgufBuilder* b) { b->U32("llama.rope.dimension_count", 8); }, "", kF32,
       "only full, even rotary dimensions"},
      {"heads", [](GgufBuilder* b) { b->U32("llama.attention.head_count_kv", 3); }, "", kF32,
       "is not a multiple of head_count_kv"},
      {"vocab", [](GgufBuilder* b) { b->U32("llama.vocab_size", 9); }, "", kF32,
       "llama.vocab_size 9 differs from token_embd's 8 rows"},
      {"layers", [](GgufBuilder* b) { b->U32("llama.block_count", 1u << 30); }, "", kF32,
       "llama.block_count is 1073741824 but tensor blk.1073741823.attn_norm.weight is missing"},
      {"head dim", [](GgufBuilder* b) { b->U32("llama.attention.head_count", 3); }, "", kF32,
       "llama.attention.key_length is missing and its default would be 0"},
      {"missing tensor", nullptr, "blk.0.attn_v.weight", kF32,
       "tensor blk.0.attn_v.weight (expected {32, 16} of any supported type) is missing"},
      {"unsupported type", nullptr, "", 20 /* IQ4_NL */,
       "tensor blk.0.ffn_gate.weight has type IQ4_NL, which moe-cluster cannot compute with"},
  };
  for (const BadModel& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = WriteTinyLlama(std::string("bad_") + std::to_string(&c - cases.data()),
                                           c.metadata, c.skip_tensor, c.ffn_gate_type);
    auto checkpoint = Checkpoint::Open(dir);
    absl::Status s = checkpoint.status();
    if (s.ok()) s = (*checkpoint)->LoadWeights(WeightsOptions{}).status();
    ASSERT_FALSE(s.ok());
    EXPECT_THAT(s.message(), HasSubstr(c.message));
    EXPECT_THAT(s.message(), HasSubstr("model.gguf"));
  }
  // The missing key is named.
  GgufBuilder b;
  b.String("general.architecture", "llama");
  const std::string dir = testing::TempDir("no_keys");
  testing::WriteFile(dir + "/m.gguf", b.Build());
  auto missing = Checkpoint::Open(dir + "/m.gguf");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("llama.embedding_length is missing"));
}

// The ggml ids the engine maps to its dtypes agree with the reader's block table and back.
TEST(GgufModelTest, GgmlTypesAndDTypesAgree) {
  int mapped = 0;
  for (uint32_t id = 0; id < 64; ++id) {
    const std::optional<DType> dtype = DTypeOfGgmlType(id);
    if (!dtype.has_value()) continue;
    SCOPED_TRACE(id);
    const GgmlTypeInfo* info = FindGgmlType(id);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->block_elements, DTypeBlockElements(*dtype));
    EXPECT_EQ(info->block_bytes, DTypeBlockBytes(*dtype));
    EXPECT_EQ(std::string_view(info->name), DTypeName(*dtype));
    EXPECT_EQ(GgmlTypeOf(*dtype), id);
    ++mapped;
  }
  EXPECT_EQ(mapped, 11);
}

TEST(CheckpointTest, ChoosesTheFormatAndRefusesAmbiguity) {
  auto safetensors = Checkpoint::Open("tests/testdata/models/llama_dense");
  ASSERT_TRUE(safetensors.ok()) << safetensors.status();
  EXPECT_FALSE((*safetensors)->is_gguf());
  const std::string two = testing::TempDir("two_ggufs");
  testing::WriteFile(two + "/a.gguf", GgufBuilder().Build());
  testing::WriteFile(two + "/b.gguf", GgufBuilder().Build());
  EXPECT_THAT(Checkpoint::Open(two).status().message(), HasSubstr("holds several GGUF files"));
  // A directory with neither config.json nor a .gguf file.
  const std::string empty = testing::TempDir("empty_model");
  EXPECT_THAT(Checkpoint::Open(empty).status().message(), HasSubstr("config.json"));
  const std::string text = testing::TempDir("text") + "/weights.bin";
  testing::WriteFile(text, {1, 2, 3});
  EXPECT_THAT(Checkpoint::Open(text).status().message(), HasSubstr("not a .gguf file"));
  EXPECT_EQ(Checkpoint::Open("/nonexistent").status().code(), absl::StatusCode::kNotFound);
  auto gguf = Checkpoint::Open(WriteTinyLlama("tok"));
  ASSERT_TRUE(gguf.ok());
  // No tokenizer.ggml.* keys in this file.
  EXPECT_EQ((*gguf)->LoadTokenizer().status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace moe
