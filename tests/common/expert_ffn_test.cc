#include "common/expert_ffn.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testutil/checkpoint_writer.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

// Naive f64 reference: sum_e w_e * w2(silu(w1 x) * w3 x), F32 weights.
std::vector<double> Reference(const ModelWeights& w, int64_t layer, const float* x,
                              const std::vector<ExpertAssignment>& assign) {
  const int64_t h = w.config().hidden_size, f = w.config().intermediate_size;
  std::vector<double> out(h, 0.0);
  for (const ExpertAssignment& a : assign) {
    const ExpertWeights& e = w.expert(layer, a.expert);
    auto at = [](const WeightMatrix& m, int64_t r, int64_t c) {
      return static_cast<double>(static_cast<const float*>(m.data)[r * m.cols + c]);
    };
    std::vector<double> act(f);
    for (int64_t i = 0; i < f; ++i) {
      double g = 0, u = 0;
      for (int64_t k = 0; k < h; ++k) g += at(e.w1, i, k) * x[k], u += at(e.w3, i, k) * x[k];
      act[i] = g / (1 + std::exp(-g)) * u;
    }
    for (int64_t o = 0; o < h; ++o) {
      double y = 0;
      for (int64_t i = 0; i < f; ++i) y += at(e.w2, o, i) * act[i];
      out[o] += a.weight * y;
    }
  }
  return out;
}

class ExpertFfnTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir("ffn");
    testing::TinyShape shape;
    shape.hidden = 16;
    shape.ffn = 24;
    shape.heads = 2;
    testing::WriteTinyModel(dir_, shape);
    auto config = LoadModelConfig(dir_);
    ASSERT_TRUE(config.ok());
    WeightsOptions options;
    options.experts = {1, 4};
    auto w = ModelWeights::Load(dir_, *config, options);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = std::move(*w);
  }
  std::string dir_;
  std::unique_ptr<ModelWeights> weights_;
};

TEST_F(ExpertFfnTest, WeightedSumOfHostedExpertsMatchesNaive) {
  ExpertFfn ffn(weights_.get());
  const int64_t h = 16;
  std::vector<float> x(4 * h);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  // Row 2 has no expert here (its output must be zero).
  std::vector<int32_t> offsets = {0, 2, 3, 3, 5};
  std::vector<ExpertAssignment> assign = {{1, 0.7f}, {3, 0.3f}, {2, 1.0f}, {3, 0.25f}, {1, 0.75f}};
  std::vector<float> out(x.size(), 99.0f);
  ffn.Forward({1, 4, x.data(), offsets, assign}, out.data());
  for (int64_t r = 0; r < 4; ++r) {
    std::vector<ExpertAssignment> row(assign.begin() + offsets[r], assign.begin() + offsets[r + 1]);
    std::vector<double> ref = Reference(*weights_, 1, &x[r * h], row);
    for (int64_t i = 0; i < h; ++i) EXPECT_NEAR(out[r * h + i], ref[i], 1e-5) << r << "," << i;
  }
  for (int64_t i = 0; i < h; ++i) EXPECT_EQ(out[2 * h + i], 0.0f);
}

}  // namespace
}  // namespace moe
