#include "common/expert_ffn.h"

#include <cmath>
#include <random>

#include "common/compute_backend.h"
#include "common/expert_grouping.h"
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

// Row 2 has no expert here (its output must be zero).
const std::vector<int32_t> kOffsets = {0, 2, 3, 3, 5};
const std::vector<ExpertAssignment> kAssign = {
    {1, 0.7f}, {3, 0.3f}, {2, 1.0f}, {3, 0.25f}, {1, 0.75f}};

// Checks `out` for the batch of kOffsets / kAssign over x against the naive reference.
void ExpectNaiveSums(const ModelWeights& weights, const std::vector<float>& x,
                     const std::vector<float>& out) {
  const std::vector<int32_t>& offsets = kOffsets;
  const std::vector<ExpertAssignment>& assign = kAssign;
  const int64_t h = weights.config().hidden_size;
  for (int64_t r = 0; r < 4; ++r) {
    std::vector<ExpertAssignment> row(assign.begin() + offsets[r], assign.begin() + offsets[r + 1]);
    std::vector<double> ref = Reference(weights, 1, &x[r * h], row);
    for (int64_t i = 0; i < h; ++i) EXPECT_NEAR(out[r * h + i], ref[i], 1e-5) << r << "," << i;
  }
  for (int64_t i = 0; i < h; ++i) EXPECT_EQ(out[2 * h + i], 0.0f);
}

std::vector<float> TestRows(int64_t n) {
  std::vector<float> x(n);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  return x;
}

TEST_F(ExpertFfnTest, WeightedSumOfHostedExpertsMatchesNaive) {
  ExpertFfn ffn(weights_.get());
  const std::vector<float> x = TestRows(4 * 16);
  std::vector<float> out(x.size(), 99.0f);
  ffn.Forward({1, 4, x.data(), kOffsets, kAssign}, out.data());
  ExpectNaiveSums(*weights_, x, out);
}

TEST_F(ExpertFfnTest, CpuBackendRunnersMatchNaive) {
  auto backend = CreateComputeBackend(DeviceSpec{}, weights_.get());
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->Describe(), "cpu");
  const std::vector<float> x = TestRows(4 * 16);
  for (int runner_index = 0; runner_index < 2; ++runner_index) {  // independent runners
    auto runner = (*backend)->NewRunner();
    ASSERT_TRUE(runner.ok()) << runner.status();
    std::vector<float> out(x.size(), 99.0f);
    ASSERT_TRUE((*runner)->Forward({1, 4, x.data(), kOffsets, kAssign}, out.data()).ok());
    ExpectNaiveSums(*weights_, x, out);
  }
}

// Without a CUDA backend in the build, or without a GPU, --device cuda is a clear error; with a
// GPU (a CUDA build on a GPU machine) the experts load and say where they are.
TEST_F(ExpertFfnTest, CudaDeviceIsAClearErrorWhereItCannotRun) {
  DeviceSpec cuda;
  cuda.kind = DeviceSpec::Kind::kCuda;
  auto backend = CreateComputeBackend(cuda, weights_.get());
#ifdef MOE_HAVE_CUDA
  if (backend.ok()) {
    EXPECT_THAT((*backend)->Describe(), ::testing::StartsWith("cuda:0 ("));
  } else {
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(backend.status().message(), HasSubstr("cuda:0: no CUDA device"));
  }
#else
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(backend.status().message(), HasSubstr("-DMOE_ENABLE_CUDA=ON"));
#endif
}

TEST(ParseDeviceTest, AcceptsCpuCudaAndCudaN) {
  for (const auto& [text, spelled] : std::vector<std::pair<std::string, std::string>>{
           {"cpu", "cpu"}, {"cuda", "cuda:0"}, {"cuda:0", "cuda:0"}, {"cuda:7", "cuda:7"}}) {
    auto d = ParseDevice(text);
    ASSERT_TRUE(d.ok()) << text << ": " << d.status();
    EXPECT_EQ(d->ToString(), spelled);
  }
  for (const std::string bad : {"", "gpu", "CPU", "cuda:", "cuda:-1", "cuda:+1", "cuda:1x",
                                "cuda:0:1", "cuda 0", "cuda:99999999999"}) {
    auto d = ParseDevice(bad);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(d.status().message(), HasSubstr("use cpu, cuda or cuda:N")) << bad;
  }
}

TEST(GroupByExpertTest, SlotsByExpertThenRowAndRowsByExpert) {
  const std::vector<float> x(4);
  ExpertGrouping g;
  GroupByExpert({0, 4, x.data(), kOffsets, kAssign}, ExpertRange{1, 4}, &g);
  // Expert 1: rows 0 and 3; expert 2: row 1; expert 3: rows 0 and 3.
  EXPECT_EQ(g.expert_begin, (std::vector<int32_t>{0, 2, 3, 5}));
  EXPECT_EQ(g.slot_row, (std::vector<int32_t>{0, 3, 1, 0, 3}));
  EXPECT_EQ(g.slot_weight, (std::vector<float>{0.7f, 0.75f, 1.0f, 0.3f, 0.25f}));
  // Row 0: slots of experts 1, 3; row 1: expert 2; row 3 (assigned 3 then 1): experts 1, 3.
  EXPECT_EQ(g.row_slots, (std::vector<int32_t>{0, 3, 2, 1, 4}));
}

// Random batches against the definition: every assignment appears once as a slot of its expert,
// slots of an expert ascend by row, and each row's slots are exactly its assignments, by expert.
TEST(GroupByExpertTest, RandomBatchesMatchTheDefinition) {
  std::mt19937 rng(7);
  ExpertGrouping g;  // reused across batches, as the FFNs reuse it
  for (int trial = 0; trial < 200; ++trial) {
    const ExpertRange hosted{static_cast<int64_t>(rng() % 4), 0};
    const int64_t experts = 1 + rng() % 9;
    const ExpertRange range{hosted.begin, hosted.begin + experts};
    const int64_t rows = rng() % 40;
    std::vector<int32_t> offsets = {0};
    std::vector<ExpertAssignment> assign;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<int32_t> pool;
      for (int64_t e = range.begin; e < range.end; ++e) pool.push_back(static_cast<int32_t>(e));
      std::shuffle(pool.begin(), pool.end(), rng);
      const int64_t k = rng() % (std::min<int64_t>(experts, 3) + 1);
      for (int64_t i = 0; i < k; ++i) {
        assign.push_back({pool[i], static_cast<float>(rng() % 1000) / 1000.0f});
      }
      offsets.push_back(static_cast<int32_t>(assign.size()));
    }
    const std::vector<float> x(1);
    GroupByExpert({0, rows, x.data(), offsets, assign}, range, &g);
    ASSERT_EQ(g.slots(), static_cast<int64_t>(assign.size()));
    ASSERT_EQ(g.expert_begin.size(), static_cast<size_t>(experts + 1));
    for (int64_t j = 0; j < experts; ++j) {
      std::vector<std::pair<int32_t, float>> want;  // (row, weight) of expert range.begin + j
      for (int64_t r = 0; r < rows; ++r) {
        for (int32_t i = offsets[r]; i < offsets[r + 1]; ++i) {
          if (assign[i].expert == range.begin + j) want.push_back({r, assign[i].weight});
        }
      }
      ASSERT_EQ(g.rows_of(j), static_cast<int64_t>(want.size()));
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_EQ(g.slot_row[g.expert_begin[j] + i], want[i].first);
        EXPECT_EQ(g.slot_weight[g.expert_begin[j] + i], want[i].second);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<int32_t> experts_of_row;
      for (int32_t k = offsets[r]; k < offsets[r + 1]; ++k) {
        const int32_t s = g.row_slots[k];
        ASSERT_EQ(g.slot_row[s], r);
        const auto j = std::upper_bound(g.expert_begin.begin(), g.expert_begin.end(), s) -
                       g.expert_begin.begin() - 1;
        experts_of_row.push_back(static_cast<int32_t>(range.begin + j));
      }
      EXPECT_TRUE(std::is_sorted(experts_of_row.begin(), experts_of_row.end()));
      std::vector<int32_t> assigned;
      for (int32_t k = offsets[r]; k < offsets[r + 1]; ++k) assigned.push_back(assign[k].expert);
      std::sort(assigned.begin(), assigned.end());
      EXPECT_EQ(experts_of_row, assigned) << "row " << r;
    }
  }
}

}  // namespace
}  // namespace moe
