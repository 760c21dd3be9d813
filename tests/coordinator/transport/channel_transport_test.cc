// The frame-channel data path end to end, on the CPU: a coordinator's GrpcTransport reaching real
// expert workers (WorkerServer, in this process) over memory channels (the stand-in for NCCL that
// needs no GPU) gives bit-identical sums to the in-process transport, step after step, also when
// a worker shuts down mid-run and its rows go to a replica.
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "common/checkpoint.h"
#include "coordinator/transport/grpc_transport.h"
#include "coordinator/transport/in_process_transport.h"
#include "coordinator/transport/nccl_transport.h"
#include "expert_worker/worker_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

constexpr char kModel[] = "tests/testdata/models/demo_mixtral";

// `tokens` tokens, each to top-2 distinct experts of 8 with weights w, 1 - w.
Routing RandomRouting(int64_t tokens, std::mt19937* rng) {
  Routing r;
  r.Resize(tokens, 2);
  std::uniform_int_distribution<int32_t> expert(0, 7);
  std::uniform_real_distribution<float> weight(0.05f, 0.95f);
  for (int64_t t = 0; t < tokens; ++t) {
    r.experts[2 * t] = expert(*rng);
    do {
      r.experts[2 * t + 1] = expert(*rng);
    } while (r.experts[2 * t + 1] == r.experts[2 * t]);
    r.weights[2 * t] = weight(*rng);
    r.weights[2 * t + 1] = 1 - r.weights[2 * t];
  }
  return r;
}

// [tokens, hidden] standard normal values.
std::vector<float> RandomRows(int64_t tokens, int64_t hidden, std::mt19937* rng) {
  std::vector<float> x(tokens * hidden);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : x) v = normal(*rng);
  return x;
}

std::unique_ptr<WorkerServer> StartWorker(ExpertRange experts) {
  WorkerOptions options;
  options.model_dir = kModel;
  options.experts = experts;
  options.threads = 1;
  auto server = WorkerServer::Create(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

TEST(ChannelTransportTest, EqualsTheInProcessTransportBitForBitThroughFailover) {
  auto checkpoint = Checkpoint::Open(kModel);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const ModelConfig& config = (*checkpoint)->config();
  ASSERT_EQ(config.num_local_experts, 8);
  const int64_t hidden = config.hidden_size;
  // Boundaries 0, 4, 8 in both: the same segments, so the same sums to the bit.
  auto reference = InProcessTransport::Create(**checkpoint, Placement::Contiguous(8, 2));
  ASSERT_TRUE(reference.ok()) << reference.status();
  std::unique_ptr<WorkerServer> low = StartWorker({0, 4}), high = StartWorker({4, 8}),
                                replica = StartWorker({0, 8});
  ASSERT_TRUE(low && high && replica);

  GrpcTransportOptions options;
  options.worker_addresses = {low->address(), high->address(), replica->address()};
  options.model_fingerprint = (*checkpoint)->fingerprint();
  options.connect_timeout = absl::Seconds(10);
  options.wire = WireDType::kF32;
  options.channels = MemoryChannelFactory();
  auto cluster = GrpcTransport::Create(config, options);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  for (const WorkerSnapshot& w : (*cluster)->Workers()) EXPECT_EQ(w.transport, "memory/f32");

  std::mt19937 rng(7);
  auto compare = [&](int step) {
    const int64_t tokens = 1 + step * 5 % 23;
    const Routing routing = RandomRouting(tokens, &rng);
    const std::vector<float> x = RandomRows(tokens, hidden, &rng);
    std::vector<float> want(x.size(), -1.0f), got(x.size(), -2.0f);
    const int64_t layer = step % config.num_hidden_layers;
    ASSERT_TRUE((*reference)->Exchange(layer, routing, x.data(), want.data()).ok());
    const absl::Status s = (*cluster)->Exchange(layer, routing, x.data(), got.data());
    ASSERT_TRUE(s.ok()) << "step " << step << ": " << s;
    EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0)
        << "step " << step;
  };
  for (int step = 0; step < 12; ++step) compare(step);
  // The low worker goes away (its channel is aborted as it shuts down): its rows go to the
  // replica within the step, with the same bits.
  low->Shutdown();
  low->Wait();
  for (int step = 12; step < 24; ++step) compare(step);
  EXPECT_FALSE((*cluster)->Workers()[0].ready);
  EXPECT_TRUE((*cluster)->AllExpertsServed());
}

// A per-layer placement (both workers loaded every expert; layer 0 split one way, layer 1 the
// other, expert 2 of layer 0 on both) over channels equals the in-process transport under the
// same placement, bit for bit.
TEST(ChannelTransportTest, PerLayerPlacementEqualsInProcessUnderTheSamePlacement) {
  auto checkpoint = Checkpoint::Open(kModel);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const ModelConfig& config = (*checkpoint)->config();
  ASSERT_EQ(config.num_hidden_layers, 2);
  Placement placement;
  placement.workers = {{0, 8}, {0, 8}};
  placement.layers = {{{{0, 3}, {6, 8}}, {{2, 6}}}, {{{4, 8}}, {{0, 4}}}};
  ASSERT_TRUE(placement.CheckCoverage(2, 8).ok());
  auto reference = InProcessTransport::Create(**checkpoint, placement);
  ASSERT_TRUE(reference.ok()) << reference.status();
  std::unique_ptr<WorkerServer> a = StartWorker({0, 8}), b = StartWorker({0, 8});
  ASSERT_TRUE(a && b);
  GrpcTransportOptions options;
  options.worker_addresses = {a->address(), b->address()};
  options.model_fingerprint = (*checkpoint)->fingerprint();
  options.wire = WireDType::kF32;
  options.channels = MemoryChannelFactory();
  options.placement = placement;
  auto cluster = GrpcTransport::Create(config, options);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  // Its snapshot lists what it serves per layer (for health and the status API).
  EXPECT_EQ((*cluster)->Workers()[1].layers,
            (std::vector<std::vector<ExpertRange>>{{{2, 6}}, {{0, 4}}}));
  std::mt19937 rng(11);
  for (int step = 0; step < 16; ++step) {
    const int64_t tokens = 1 + step * 3 % 17;
    const Routing routing = RandomRouting(tokens, &rng);
    const std::vector<float> x = RandomRows(tokens, config.hidden_size, &rng);
    std::vector<float> want(x.size(), -1.0f), got(x.size(), -2.0f);
    const int64_t layer = step % 2;
    ASSERT_TRUE((*reference)->Exchange(layer, routing, x.data(), want.data()).ok());
    ASSERT_TRUE((*cluster)->Exchange(layer, routing, x.data(), got.data()).ok());
    EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0)
        << "step " << step;
  }
  // A worker that lacks what the placement gives it is refused, naming it.
  std::unique_ptr<WorkerServer> narrow = StartWorker({0, 4});
  options.worker_addresses = {a->address(), narrow->address()};
  auto refused = GrpcTransport::Create(config, options);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()),
              ::testing::HasSubstr("serve experts [2, 6) in layer 0, which it has not loaded"));
}

// With two experts per token, the sums have the same bits under every placement: a token's two
// weighted outputs are added once, as rounded products, on one worker or on the coordinator
// (kernels::Axpy never fuses). So a new placement (a rebalance) changes no output.
TEST(ChannelTransportTest, TopTwoSumsAreTheSameUnderEveryPlacement) {
  auto checkpoint = Checkpoint::Open(kModel);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const ModelConfig& config = (*checkpoint)->config();
  Placement per_layer;
  per_layer.workers = {{0, 8}, {0, 8}, {0, 8}};
  per_layer.layers = {{{{0, 1}, {5, 7}}, {{1, 5}}, {{7, 8}, {2, 3}}}, {{{3, 8}}, {{0, 3}}, {}}};
  Placement replicas;
  replicas.workers = {{0, 5}, {3, 8}, {2, 6}};
  std::vector<std::unique_ptr<InProcessTransport>> transports;
  for (const Placement& p : {Placement::Contiguous(8, 1), Placement::Contiguous(8, 2),
                             Placement::Contiguous(8, 3), per_layer, replicas}) {
    auto t = InProcessTransport::Create(**checkpoint, p);
    ASSERT_TRUE(t.ok()) << t.status();
    transports.push_back(std::move(*t));
  }
  std::mt19937 rng(5);
  for (int step = 0; step < 20; ++step) {
    const int64_t tokens = 1 + step * 7 % 29;
    const Routing routing = RandomRouting(tokens, &rng);
    const std::vector<float> x = RandomRows(tokens, config.hidden_size, &rng);
    std::vector<float> first(x.size());
    ASSERT_TRUE(transports[0]->Exchange(step % 2, routing, x.data(), first.data()).ok());
    for (size_t i = 1; i < transports.size(); ++i) {
      std::vector<float> got(x.size(), -1.0f);
      ASSERT_TRUE(transports[i]->Exchange(step % 2, routing, x.data(), got.data()).ok());
      EXPECT_EQ(std::memcmp(first.data(), got.data(), got.size() * sizeof(float)), 0)
          << "step " << step << ", placement " << i;
    }
  }
}

}  // namespace
}  // namespace moe
