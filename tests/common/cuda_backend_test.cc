// The CUDA expert FFN against the CPU one (exact f32 kernels), on every committed model fixture
// and, when MOE_GPU_CHECK_MODEL names one, a larger checkpoint (scripts/gpu_check.sh passes the
// TinyLlama-sized random one). Label `gpu`: built with -DMOE_ENABLE_CUDA=ON, run only where a
// GPU is present (scripts/test.sh reports it as not run elsewhere).
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <thread>

#include "common/checkpoint.h"
#include "common/compute_backend.h"
#include "common/expert_ffn.h"
#include "common/kernels.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

std::vector<std::string> Models() {
  std::vector<std::string> dirs;
  for (const auto& e : std::filesystem::directory_iterator("tests/testdata/models")) {
    dirs.push_back(e.path());
  }
  std::sort(dirs.begin(), dirs.end());
  if (const char* extra = std::getenv("MOE_GPU_CHECK_MODEL"); extra != nullptr && *extra) {
    dirs.push_back(extra);
  }
  return dirs;
}

struct Batch {
  std::vector<float> x;
  std::vector<int32_t> offsets = {0};
  std::vector<ExpertAssignment> assign;
};

// `rows` rows of N(0, 1) values, each routed to top_k distinct hosted experts with weights
// summing to 1.
Batch RandomBatch(int64_t rows, int64_t hidden, const ExpertRange& hosted, int64_t top_k,
                  std::mt19937* rng) {
  Batch b;
  std::normal_distribution<float> normal;
  b.x.resize(rows * hidden);
  for (float& v : b.x) v = normal(*rng);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int32_t> pool;
    for (int64_t e = hosted.begin; e < hosted.end; ++e) pool.push_back(static_cast<int32_t>(e));
    std::shuffle(pool.begin(), pool.end(), *rng);
    const int64_t k = std::min<int64_t>(top_k, hosted.size());
    for (int64_t i = 0; i < k; ++i) b.assign.push_back({pool[i], 1.0f / static_cast<float>(k)});
    b.offsets.push_back(static_cast<int32_t>(b.assign.size()));
  }
  return b;
}

// |gpu - cpu| <= 1e-2 * max |cpu| per row (BF16 activations and weights on the GPU).
void ExpectClose(const std::vector<float>& cpu, const std::vector<float>& gpu, int64_t hidden,
                 const std::string& what) {
  ASSERT_EQ(cpu.size(), gpu.size());
  for (size_t r = 0; r * hidden < cpu.size(); ++r) {
    float scale = 0, worst = 0;
    for (int64_t i = 0; i < hidden; ++i) {
      scale = std::max(scale, std::fabs(cpu[r * hidden + i]));
      worst = std::max(worst, std::fabs(cpu[r * hidden + i] - gpu[r * hidden + i]));
    }
    EXPECT_LE(worst, 1e-2f * scale) << what << " row " << r;
  }
}

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override { kernels::SetMatMulMode(kernels::MatMulMode::kExact); }

  // Every expert of `path`, and the result of putting them on cuda:0.
  static std::pair<std::unique_ptr<ModelWeights>, absl::StatusOr<std::unique_ptr<ComputeBackend>>>
  LoadOnCuda(const std::string& path) {
    auto checkpoint = Checkpoint::Open(path);
    EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
    if (!checkpoint.ok()) return {nullptr, checkpoint.status()};
    WeightsOptions options;
    options.load_shared = false;
    auto weights = (*checkpoint)->LoadWeights(options);
    EXPECT_TRUE(weights.ok()) << weights.status();
    if (!weights.ok()) return {nullptr, weights.status()};
    DeviceSpec cuda;
    cuda.kind = DeviceSpec::Kind::kCuda;
    auto backend = CreateComputeBackend(cuda, weights->get());
    return {std::move(*weights), std::move(backend)};
  }
};

TEST_F(CudaBackendTest, EqualsTheCpuFfnOnEveryFixture) {
  std::mt19937 rng(11);
  int models = 0;
  for (const std::string& dir : Models()) {
    SCOPED_TRACE(dir);
    auto [weights, backend] = LoadOnCuda(dir);
    ASSERT_NE(weights, nullptr);
    ASSERT_TRUE(backend.ok()) << backend.status();
    const ModelConfig& c = weights->config();
    std::printf("%s on %s\n", dir.c_str(), (*backend)->Describe().c_str());
    auto runner = (*backend)->NewRunner();
    ASSERT_TRUE(runner.ok()) << runner.status();
    ExpertFfn cpu(weights.get());
    for (int64_t rows : {1, 7, 64}) {
      for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
        Batch b = RandomBatch(rows, c.hidden_size, weights->hosted_experts(), c.num_experts_per_tok,
                              &rng);
        const ExpertBatch batch{layer, rows, b.x.data(), b.offsets, b.assign};
        std::vector<float> want(b.x.size()), got(b.x.size(), NAN);
        cpu.Forward(batch, want.data());
        ASSERT_TRUE((*runner)->Forward(batch, got.data()).ok());
        ExpectClose(want, got, c.hidden_size,
                    "rows " + std::to_string(rows) + " layer " + std::to_string(layer));
      }
    }
    ++models;
  }
  EXPECT_GE(models, 8);
}

// Forward streams have their own runners and run at once.
TEST_F(CudaBackendTest, RunnersOnSeveralThreadsAgree) {
  auto [weights, backend] = LoadOnCuda("tests/testdata/models/demo_mixtral");
  ASSERT_NE(weights, nullptr);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const ModelConfig& c = weights->config();
  std::mt19937 rng(5);
  const Batch b = RandomBatch(33, c.hidden_size, weights->hosted_experts(), 2, &rng);
  const ExpertBatch batch{0, 33, b.x.data(), b.offsets, b.assign};
  std::vector<std::vector<float>> outs(4, std::vector<float>(b.x.size()));
  std::vector<std::thread> threads;
  for (auto& out : outs) {
    threads.emplace_back([&] {
      auto runner = (*backend)->NewRunner();
      ASSERT_TRUE(runner.ok()) << runner.status();
      for (int i = 0; i < 20; ++i) ASSERT_TRUE((*runner)->Forward(batch, out.data()).ok());
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& out : outs) EXPECT_EQ(out, outs[0]);  // same kernels, same order
}

// Rows routed to none of the hosted experts are zeros, also when no row has a pair (no GEMM).
TEST_F(CudaBackendTest, RowsWithoutPairsAreZero) {
  auto [weights, backend] = LoadOnCuda("tests/testdata/models/demo_mixtral");
  ASSERT_NE(weights, nullptr);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto runner = (*backend)->NewRunner();
  ASSERT_TRUE(runner.ok()) << runner.status();
  const int64_t hidden = weights->config().hidden_size;
  std::vector<float> x(3 * hidden, 0.5f), got(x.size(), NAN), want(x.size());
  const std::vector<int32_t> none = {0, 0, 0, 0}, some = {0, 0, 1, 1};
  const std::vector<ExpertAssignment> one = {{1, 1.0f}};
  ExpertFfn cpu(weights.get());
  for (const auto& [offsets, pairs] :
       {std::pair{none, std::vector<ExpertAssignment>{}}, std::pair{some, one}}) {
    const ExpertBatch batch{0, 3, x.data(), offsets, pairs};
    ASSERT_TRUE((*runner)->Forward(batch, got.data()).ok());
    cpu.Forward(batch, want.data());
    ExpectClose(want, got, hidden, "pairs " + std::to_string(pairs.size()));
    for (int64_t i = 0; i < hidden; ++i) EXPECT_EQ(got[i], 0.0f);  // row 0 has no pair
  }
}

TEST_F(CudaBackendTest, QuantizedExpertsAreRefusedNamingTheType) {
  auto [weights, backend] =
      LoadOnCuda("tests/testdata/gguf/mixtral_4e_h256_kquant/mixtral_4e_h256_kquant-q4_k_m.gguf");
  ASSERT_NE(weights, nullptr);
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(backend.status().message(), HasSubstr("--device cpu"));
}

}  // namespace
}  // namespace moe
