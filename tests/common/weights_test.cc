#include "common/weights.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/expert_ffn.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testutil/checkpoint_writer.h"

namespace moe {
namespace {

using testing::FakeTensor;
using ::testing::HasSubstr;
using testing::TempDir;
using testing::TinyShape;
using testing::WriteTinyModel;

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadTiny(const std::string& dir,
                                                       const WeightsOptions& options = {}) {
  auto config = LoadModelConfig(dir);
  if (!config.ok()) return config.status();
  return ModelWeights::Load(dir, *config, options);
}

FakeTensor* FindTensor(std::vector<FakeTensor>* t, const std::string& name) {
  for (FakeTensor& f : *t) {
    if (f.name == name) return &f;
  }
  ADD_FAILURE() << "no tensor " << name;
  return &t->front();
}

TEST(WeightsTest, LoadsEverything) {
  const std::string dir = TempDir("all");
  WriteTinyModel(dir, TinyShape{});
  auto w = LoadTiny(dir);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->layer(1).router.size(), 4u * 8u);
  EXPECT_EQ((*w)->expert(1, 3).w2.rows, 8);
  EXPECT_EQ((*w)->expert(1, 3).w2.cols, 12);
  EXPECT_NE((*w)->lm_head().data, (*w)->embed_tokens().data);
}

TEST(WeightsTest, SharedOnlyMapsNoExpertTensor) {
  const std::string dir = TempDir("shared");
  TinyShape shape;
  WriteTinyModel(dir, shape);
  WeightsOptions options;
  options.experts = {};
  auto w = LoadTiny(dir, options);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->expert_bytes(), 0u);
  // Shared tensors: embed, lm_head, norm, and per layer 2 norms, 4 attention, 1 router.
  const uint64_t h = shape.hidden, v = shape.vocab, e = shape.experts;
  const uint64_t per_layer = 2 * h + 2 * h * h + 2 * (h / 2) * h + e * h;
  EXPECT_EQ((*w)->mapped_tensor_bytes(), 4 * (2 * v * h + h + shape.layers * per_layer));
}

TEST(WeightsTest, ExpertSliceMapsOnlyItsExperts) {
  const std::string dir = TempDir("slice");
  TinyShape shape;
  WriteTinyModel(dir, shape);
  WeightsOptions options;
  options.load_shared = false;
  options.experts = {1, 3};
  auto w = LoadTiny(dir, options);
  ASSERT_TRUE(w.ok()) << w.status();
  const uint64_t expert = 3 * shape.hidden * shape.ffn * 4;
  EXPECT_EQ((*w)->expert_bytes(), 2 * shape.layers * expert);
  EXPECT_EQ((*w)->mapped_tensor_bytes(), 2 * shape.layers * expert);
  EXPECT_TRUE((*w)->HostsExpert(2));
  EXPECT_FALSE((*w)->HostsExpert(3));
}

TEST(WeightsTest, MissingTensorNamed) {
  const std::string dir = TempDir("missing");
  WriteTinyModel(dir, TinyShape{}, [](std::vector<FakeTensor>* t) {
    std::erase_if(*t, [](const FakeTensor& f) {
      return f.name == "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    });
  });
  absl::Status s = LoadTiny(dir).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("model.layers.1.block_sparse_moe.experts.2.w3.weight"));
  EXPECT_THAT(s.message(), HasSubstr("missing"));
}

TEST(WeightsTest, WrongShapeNamed) {
  const std::string dir = TempDir("shape");
  WriteTinyModel(dir, TinyShape{}, [](std::vector<FakeTensor>* t) {
    FindTensor(t, "model.layers.0.self_attn.q_proj.weight")->shape = {8, 4};
  });
  absl::Status s = LoadTiny(dir).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tensor model.layers.0.self_attn.q_proj.weight: expected "
                                     "[8, 8] F32, got [8, 4] F32"));
}

TEST(WeightsTest, WrongDtypeNamed) {
  const std::string dir = TempDir("dtype");
  WriteTinyModel(dir, TinyShape{}, [](std::vector<FakeTensor>* t) {
    FindTensor(t, "model.layers.1.post_attention_layernorm.weight")->dtype = DType::kBF16;
  });
  absl::Status s = LoadTiny(dir).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("expected [8] F32, got [8] BF16"));
}

TEST(WeightsTest, ExpertRangeOutsideModel) {
  const std::string dir = TempDir("range");
  WriteTinyModel(dir, TinyShape{});
  WeightsOptions options;
  options.experts = {2, 9};
  EXPECT_THAT(LoadTiny(dir, options).status().message(),
              HasSubstr("outside the model's 4 experts"));
}

TEST(WeightsTest, TiedEmbeddingsNeedNoLmHead) {
  const std::string dir = TempDir("tied");
  TinyShape shape;
  WriteTinyModel(dir, shape, [](std::vector<FakeTensor>* t) {
    std::erase_if(*t, [](const FakeTensor& f) { return f.name == "lm_head.weight"; });
  });
  testing::WriteText(dir + "/config.json",
                     testing::TinyModelConfig(shape).insert(1, "\"tie_word_embeddings\": true,"));
  auto w = LoadTiny(dir);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->lm_head().data, (*w)->embed_tokens().data);
}

// The fused v5 layout holds the same numbers as the classic one: gate_up_proj[e] =
// concat(w1_e, w3_e) along rows, down_proj[e] = w2_e. Both must give identical expert outputs.
TEST(WeightsTest, FusedLayoutEqualsClassic) {
  TinyShape shape;
  const std::string classic = TempDir("classic");
  const std::string fused = TempDir("fused");
  std::vector<FakeTensor> tensors = testing::TinyModelTensors(shape);
  // Give every tensor its bytes now so both layouts share them.
  std::vector<uint8_t> image = testing::SafetensorsImage(tensors);
  WriteTinyModel(classic, shape);
  auto store = TensorStore::Open(classic);
  ASSERT_TRUE(store.ok());
  std::vector<FakeTensor> out;
  for (const std::string& name : (*store)->TensorNames()) {
    if (name.find("block_sparse_moe.experts") != std::string::npos) continue;
    auto t = (*store)->Map(name);
    const auto* p = static_cast<const uint8_t*>(t->data);
    std::string new_name = name;
    if (name.find("block_sparse_moe.gate") != std::string::npos) {
      new_name.replace(new_name.find("block_sparse_moe"), 16, "mlp");
    }
    out.push_back({new_name, t->info->dtype, t->info->shape, {p, p + t->info->byte_size}});
  }
  for (int64_t l = 0; l < shape.layers; ++l) {
    FakeTensor gate_up{absl::StrCat("model.layers.", l, ".mlp.experts.gate_up_proj"),
                       DType::kF32,
                       {shape.experts, 2 * shape.ffn, shape.hidden},
                       {}};
    FakeTensor down{absl::StrCat("model.layers.", l, ".mlp.experts.down_proj"),
                    DType::kF32,
                    {shape.experts, shape.hidden, shape.ffn},
                    {}};
    for (int64_t e = 0; e < shape.experts; ++e) {
      for (const char* w : {"w1", "w3", "w2"}) {
        auto t = (*store)->Map(
            absl::StrCat("model.layers.", l, ".block_sparse_moe.experts.", e, ".", w, ".weight"));
        ASSERT_TRUE(t.ok());
        const auto* p = static_cast<const uint8_t*>(t->data);
        auto& dst = std::string(w) == "w2" ? down.bytes : gate_up.bytes;
        // gate_up rows: all of w1_e then all of w3_e, expert after expert.
        dst.insert(dst.end(), p, p + t->info->byte_size);
      }
    }
    out.push_back(std::move(gate_up));
    out.push_back(std::move(down));
  }
  testing::WriteText(fused + "/config.json", testing::TinyModelConfig(shape));
  testing::WriteFile(fused + "/model.safetensors", testing::SafetensorsImage(out));

  auto a = LoadTiny(classic);
  auto b = LoadTiny(fused);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ExpertFfn fa(a->get()), fb(b->get());
  std::vector<float> x(3 * shape.hidden);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
  std::vector<int32_t> offsets = {0, 2, 3, 5};
  std::vector<ExpertAssignment> assign = {{0, 0.6f}, {3, 0.4f}, {1, 1.0f}, {2, 0.5f}, {3, 0.5f}};
  for (int64_t layer = 0; layer < shape.layers; ++layer) {
    ExpertBatch batch{layer, 3, x.data(), offsets, assign};
    std::vector<float> ya(x.size()), yb(x.size());
    fa.Forward(batch, ya.data());
    fb.Forward(batch, yb.data());
    EXPECT_EQ(ya, yb);
    EXPECT_NE(ya[0], 0.0f);
  }
}

}  // namespace
}  // namespace moe
