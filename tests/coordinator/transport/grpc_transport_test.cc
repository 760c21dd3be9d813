// GrpcTransport against fake expert workers in this process: a small ExpertWorker service whose
// answers the test controls (correct, wrong step, wrong shape, closed stream, hung), so each
// failure path of the transport is exercised without model weights or worker processes.
#include "coordinator/transport/grpc_transport.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/frame_channel.h"
#include "common/rpc/rpc_util.h"
#include "coordinator/transport/nccl_transport.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "moecluster/v1/expert.grpc.pb.h"

namespace moe {
namespace {

namespace pb = moecluster::v1;
using ::testing::HasSubstr;

constexpr int64_t kLayers = 2;
constexpr int64_t kExperts = 8;
constexpr int64_t kHidden = 4;
constexpr char kFingerprint[] = "fake-model";

enum class Mode {
  kCorrect,
  kWrongStep,
  kWrongShape,
  kWrongDtype,
  kClose,
  kHang,
  kNaN,
  kHuge,
  kGarbageFrame,  // over a channel: a frame that is no ForwardResponse
  kHugeFrame,     // over a channel: a frame beyond the message cap
};

// An ExpertWorker whose expert e computes (e + 1) * x, so every answer is exact in f32.
class FakeWorker final : public pb::ExpertWorker::Service {
 public:
  explicit FakeWorker(ExpertRange experts, std::string fingerprint = kFingerprint)
      : experts_(experts), fingerprint_(std::move(fingerprint)) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
  }
  ~FakeWorker() override { Stop(); }
  void Stop() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
    server_->Wait();
    server_.reset();
    absl::MutexLock lock(&mu_);
    for (auto& c : channels_) c->Abort();
    for (auto& t : channel_threads_) t.join();
    channel_threads_.clear();
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  void set_mode(Mode mode) { mode_ = mode; }
  int64_t forwards() const { return forwards_; }
  void set_hidden(int32_t hidden) { hidden_ = hidden; }
  pb::DType last_wire() const { return last_wire_; }
  void set_refuse_channels(bool refuse) { refuse_channels_ = refuse; }

  grpc::Status GetInfo(grpc::ServerContext*, const pb::GetInfoRequest*,
                       pb::WorkerInfo* info) override {
    info->set_model_fingerprint(fingerprint_);
    info->set_num_layers(kLayers);
    info->set_num_experts(kExperts);
    info->set_hidden_size(hidden_);
    info->set_expert_begin(static_cast<int32_t>(experts_.begin));
    info->set_expert_end(static_cast<int32_t>(experts_.end));
    return grpc::Status::OK;
  }

  grpc::Status Forward(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<pb::ForwardResponse, pb::ForwardRequest>* stream) override {
    pb::ForwardRequest req;
    while (stream->Read(&req)) {
      ++forwards_;
      const Mode mode = mode_;
      if (mode == Mode::kClose) return grpc::Status(grpc::StatusCode::INTERNAL, "fake closes");
      if (mode == Mode::kHang) {
        while (!context->IsCancelled()) absl::SleepFor(absl::Milliseconds(5));
        return grpc::Status::CANCELLED;
      }
      if (!stream->Write(Answer(req, mode))) return grpc::Status::CANCELLED;
    }
    return grpc::Status::OK;
  }

  // Memory channels only: the same answers, one frame each.
  grpc::Status OpenChannel(grpc::ServerContext*, const pb::OpenChannelRequest* request,
                           pb::OpenChannelResponse*) override {
    if (refuse_channels_) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no channels");
    auto taken = TakeMemoryChannel(request->memory_name());
    if (!taken.ok()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "no such channel");
    std::shared_ptr<FrameChannel> channel = std::move(*taken);
    absl::MutexLock lock(&mu_);
    channels_.push_back(channel);
    channel_threads_.emplace_back([this, channel] { ServeChannel(channel.get()); });
    return grpc::Status::OK;
  }

 private:
  void ServeChannel(FrameChannel* channel) {
    std::string frame;
    pb::ForwardRequest req;
    while (channel->Receive(1 << 30, &frame).ok()) {
      EXPECT_TRUE(req.ParseFromString(frame));
      ++forwards_;
      const Mode mode = mode_;
      if (mode == Mode::kClose) {
        channel->Abort();
        return;
      }
      if (mode == Mode::kHang) {
        channel->Receive(1 << 30, &frame).IgnoreError();  // until the coordinator aborts
        return;
      }
      if (mode == Mode::kGarbageFrame) {
        frame = "\xff\xff\xff not a message";
      } else if (mode == Mode::kHugeFrame) {
        frame.assign(1 << 20, '\0');  // the cap here: ~230 KB
      } else {
        Answer(req, mode).SerializeToString(&frame);
      }
      if (!channel->Send(frame).ok()) return;
    }
  }

  // (e + 1) * x summed over the request's pairs, spoiled as `mode` says.
  pb::ForwardResponse Answer(const pb::ForwardRequest& req, Mode mode) {
    const int64_t rows = req.hidden().shape(0);
    std::vector<float> x(rows * kHidden);
    DecodeRowsTensor(req.hidden(), x.data());  // F32 or BF16, as the transport sent
    last_wire_ = req.hidden().dtype();
    std::vector<float> out(rows * kHidden, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      for (int32_t i = req.row_offsets(r); i < req.row_offsets(r + 1); ++i) {
        EXPECT_TRUE(experts_.Contains(req.experts(i))) << "sent a foreign expert";
        const float scale = req.weights(i) * static_cast<float>(req.experts(i) + 1);
        for (int64_t k = 0; k < kHidden; ++k) out[r * kHidden + k] += scale * x[r * kHidden + k];
      }
    }
    if (mode == Mode::kNaN && rows > 0) out[kHidden + 1] = std::nanf("");
    if (mode == Mode::kHuge && rows > 0) out[0] = 1e30f;
    pb::ForwardResponse response;
    response.set_step(mode == Mode::kWrongStep ? req.step() + 1 : req.step());
    pb::DType wire = req.hidden().dtype();
    if (mode == Mode::kWrongDtype) {
      wire = wire == pb::DTYPE_F32 ? pb::DTYPE_BF16 : pb::DTYPE_F32;
    }
    EncodeRowsTensor(out.data(), mode == Mode::kWrongShape ? rows - 1 : rows, kHidden, wire,
                     response.mutable_output());
    return response;
  }

  const ExpertRange experts_;
  const std::string fingerprint_;
  std::atomic<Mode> mode_{Mode::kCorrect};
  std::atomic<int64_t> forwards_{0};
  std::atomic<int32_t> hidden_{kHidden};
  std::atomic<pb::DType> last_wire_{pb::DTYPE_UNSPECIFIED};
  std::atomic<bool> refuse_channels_{false};
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  absl::Mutex mu_;
  std::vector<std::shared_ptr<FrameChannel>> channels_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> channel_threads_ ABSL_GUARDED_BY(mu_);
};

ModelConfig Config() {
  ModelConfig c;
  c.num_hidden_layers = kLayers;
  c.num_local_experts = kExperts;
  c.hidden_size = kHidden;
  return c;
}

GrpcTransportOptions Options(const std::vector<FakeWorker*>& workers) {
  GrpcTransportOptions o;
  for (FakeWorker* w : workers) o.worker_addresses.push_back(w->address());
  o.model_fingerprint = kFingerprint;
  o.connect_timeout = absl::Seconds(5);
  o.step_timeout = absl::Seconds(5);
  o.reconnect_interval = absl::Milliseconds(20);
  return o;
}

// 3 tokens, top-2: token 0 -> experts 1, 6; token 1 -> 2, 3; token 2 -> 7, 0.
Routing ThreeTokens() {
  Routing r;
  r.Resize(3, 2);
  r.experts = {1, 6, 2, 3, 7, 0};
  r.weights = {0.75f, 0.25f, 0.5f, 0.5f, 0.5f, 0.5f};
  return r;
}

// out[t] = sum of w * (e + 1) * x[t] over token t's pairs (exact for these small values).
std::vector<float> Expected(const Routing& r, const std::vector<float>& x) {
  std::vector<float> out(r.tokens * kHidden, 0.0f);
  for (int64_t t = 0; t < r.tokens; ++t) {
    for (int64_t j = 0; j < r.top_k; ++j) {
      const float scale = r.weights[t * r.top_k + j] * (r.experts[t * r.top_k + j] + 1);
      for (int64_t k = 0; k < kHidden; ++k) out[t * kHidden + k] += scale * x[t * kHidden + k];
    }
  }
  return out;
}

std::vector<float> Inputs(int64_t tokens) {
  std::vector<float> x(tokens * kHidden);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) - 3.0f;
  return x;
}

class Reports : public DispatchObserver {
 public:
  void OnDispatch(std::span<const DispatchReport> reports) override {
    absl::MutexLock lock(&mu_);
    last_.assign(reports.begin(), reports.end());
  }
  std::vector<DispatchReport> last() {
    absl::MutexLock lock(&mu_);
    return last_;
  }

 private:
  absl::Mutex mu_;
  std::vector<DispatchReport> last_ ABSL_GUARDED_BY(mu_);
};

// Waits up to 5 s for `pred`.
template <typename Pred>
bool Eventually(Pred pred) {
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return pred();
}

TEST(GrpcTransportTest, TwoWorkersCombineToTheRoutedSum) {
  FakeWorker a({0, 4}), b({4, 8});
  auto t = GrpcTransport::Create(Config(), Options({&a, &b}));
  ASSERT_TRUE(t.ok()) << t.status();
  Reports reports;
  (*t)->set_dispatch_observer(&reports);
  const Routing r = ThreeTokens();
  const std::vector<float> x = Inputs(r.tokens);
  std::vector<float> out(r.tokens * kHidden, 123.0f);
  ASSERT_TRUE((*t)->Exchange(1, r, x.data(), out.data()).ok());
  EXPECT_EQ(out, Expected(r, x));
  // Worker a gets tokens 0, 1, 2 (experts 1; 2, 3; 0): 4 pairs; b tokens 0, 2: 2 pairs.
  const std::vector<DispatchReport> last = reports.last();
  ASSERT_EQ(last.size(), 2u);
  EXPECT_EQ(last[0].worker, 0);
  EXPECT_EQ(last[0].assignments, 4);
  EXPECT_EQ(last[1].worker, 1);
  EXPECT_EQ(last[1].assignments, 2);
  EXPECT_GT(last[0].bytes_sent, 3 * kHidden * 4);
  EXPECT_GT(last[1].bytes_received, 2 * kHidden * 4);
  // A step routed to one worker only sends nothing to the other.
  Routing only_a;
  only_a.Resize(1, 1);
  only_a.experts = {3};
  only_a.weights = {1.0f};
  const int64_t b_before = b.forwards();
  ASSERT_TRUE((*t)->Exchange(0, only_a, x.data(), out.data()).ok());
  EXPECT_EQ(b.forwards(), b_before);
  EXPECT_EQ(out[0], 4.0f * x[0]);
}

// --wire-dtype bf16 (and auto towards a non-loopback address) halves the bytes; these inputs
// and partial sums are exact in bf16, so the sums are still exact.
TEST(GrpcTransportTest, Bf16WireHalvesTheBytesAndKeepsExactValuesExact) {
  std::vector<int64_t> sent;
  for (WireDType wire : {WireDType::kF32, WireDType::kBF16, WireDType::kAuto}) {
    FakeWorker a({0, 4}), b({4, 8});
    GrpcTransportOptions options = Options({&a, &b});
    options.wire = wire;
    auto t = GrpcTransport::Create(Config(), options);
    ASSERT_TRUE(t.ok()) << t.status();
    Reports reports;
    (*t)->set_dispatch_observer(&reports);
    const Routing r = ThreeTokens();
    const std::vector<float> x = Inputs(r.tokens);
    std::vector<float> out(r.tokens * kHidden, 123.0f);
    ASSERT_TRUE((*t)->Exchange(1, r, x.data(), out.data()).ok());
    EXPECT_EQ(out, Expected(r, x));
    const pb::DType expected_wire = wire == WireDType::kBF16 ? pb::DTYPE_BF16 : pb::DTYPE_F32;
    EXPECT_EQ(a.last_wire(), expected_wire);  // auto: loopback workers get f32
    EXPECT_EQ((*t)->Workers()[0].transport, wire == WireDType::kBF16 ? "grpc/bf16" : "grpc/f32");
    sent.push_back(reports.last()[0].bytes_sent);
  }
  // 3 rows of 4 values: 48 bytes of f32 or 24 of bf16 beside the same assignments.
  EXPECT_EQ(sent[0] - sent[1], 3 * kHidden * 2);
  EXPECT_EQ(sent[2], sent[0]);
  WireDType parsed;
  EXPECT_TRUE(ParseWireDType("bf16", &parsed));
  EXPECT_EQ(parsed, WireDType::kBF16);
  EXPECT_FALSE(ParseWireDType("fp16", &parsed));
}

// Frame channels carry the same exchange: exact sums, the transport named, bf16 on request; a
// worker that refuses a channel, or offers none of the factory's kind, stays on its stream.
TEST(GrpcTransportChannelTest, WorkersOnChannelsAndStreamsMixInOneCluster) {
  for (WireDType wire : {WireDType::kAuto, WireDType::kBF16}) {
    FakeWorker a({0, 4}), b({4, 8});
    b.set_refuse_channels(true);
    GrpcTransportOptions options = Options({&a, &b});
    options.channels = MemoryChannelFactory();
    options.wire = wire;
    auto t = GrpcTransport::Create(Config(), options);
    ASSERT_TRUE(t.ok()) << t.status();
    const Routing r = ThreeTokens();
    const std::vector<float> x = Inputs(r.tokens);
    std::vector<float> out(r.tokens * kHidden, 123.0f);
    for (int step = 0; step < 3; ++step) {
      ASSERT_TRUE((*t)->Exchange(step % kLayers, r, x.data(), out.data()).ok());
      EXPECT_EQ(out, Expected(r, x));
    }
    EXPECT_EQ(a.forwards(), 3);
    EXPECT_EQ(b.forwards(), 3);
    const std::vector<WorkerSnapshot> workers = (*t)->Workers();
    const std::string dtype = wire == WireDType::kBF16 ? "/bf16" : "/f32";
    EXPECT_EQ(workers[0].transport, "memory" + dtype);
    EXPECT_EQ(workers[1].transport, "grpc" + dtype);
    EXPECT_EQ(a.last_wire(), wire == WireDType::kBF16 ? pb::DTYPE_BF16 : pb::DTYPE_F32);
  }
}

TEST(GrpcTransportChannelTest, NcclIsOnlyForWorkersThatOfferItAndNeedsTheCudaBuild) {
  std::unique_ptr<ChannelFactory> nccl = NcclChannelFactory(0);
  EXPECT_FALSE(nccl->Accepts({}));
  EXPECT_TRUE(nccl->Accepts({"nccl"}));
  EXPECT_TRUE(nccl->Bf16ByDefault());
  // The fakes offer no channel kinds: an NCCL coordinator reaches them over gRPC.
  FakeWorker a({0, 8});
  GrpcTransportOptions options = Options({&a});
  options.channels = std::move(nccl);
  auto t = GrpcTransport::Create(Config(), options);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Workers()[0].transport, "grpc/f32");
#ifndef MOE_HAVE_CUDA
  bool asked = false;
  auto opened = NcclChannelFactory(0)->Open([&](const ChannelRequest&) {
    asked = true;
    return absl::OkStatus();
  });
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(opened.status().message(), HasSubstr("-DMOE_ENABLE_CUDA=ON"));
  EXPECT_FALSE(asked);  // no id, so the worker is never asked to join
#endif
}

TEST(GrpcTransportTest, CreateRefusesBadClusters) {
  FakeWorker a({0, 4}), other({4, 8}, "other-model");
  auto missing = GrpcTransport::Create(Config(), Options({&a}));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(missing.status().message(),
              HasSubstr("experts [4, 8) of every layer are hosted by no worker; start a worker "
                        "with --experts 4-7"));
  auto foreign = GrpcTransport::Create(Config(), Options({&a, &other}));
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(foreign.status().message(), HasSubstr("serves a different model"));
  EXPECT_THAT(foreign.status().message(), HasSubstr(other.address()));

  FakeWorker wide({0, 8});
  wide.set_hidden(5);
  auto shape = GrpcTransport::Create(Config(), Options({&wide}));
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(shape.status().message(), HasSubstr("inconsistent shape"));

  EXPECT_EQ(GrpcTransport::Create(Config(), GrpcTransportOptions{}).status().code(),
            absl::StatusCode::kInvalidArgument);

  GrpcTransportOptions nobody = Options({});
  nobody.worker_addresses = {"127.0.0.1:1"};
  nobody.connect_timeout = absl::Milliseconds(200);
  auto unreachable = GrpcTransport::Create(Config(), nobody);
  EXPECT_EQ(unreachable.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(unreachable.status().message(), HasSubstr("127.0.0.1:1 did not answer"));
}

struct GarbageCase {
  Mode mode;
  const char* message;
  bool channel = false;  // over a memory frame channel instead of the Forward stream
};

class GrpcTransportGarbageTest : public ::testing::TestWithParam<GarbageCase> {};

TEST_P(GrpcTransportGarbageTest, BadAnswerFailsTheStepMarksTheWorkerDownAndItReconnects) {
  FakeWorker a({0, 4}), b({4, 8});
  // Declared before the transport, so they outlive its threads (which call the callback).
  absl::Mutex mu;
  std::vector<bool> health;
  GrpcTransportOptions options = Options({&a, &b});
  options.step_timeout = absl::Milliseconds(300);
  if (GetParam().channel) options.channels = MemoryChannelFactory();
  auto t = GrpcTransport::Create(Config(), options);
  ASSERT_TRUE(t.ok()) << t.status();
  (*t)->set_on_health_change([&](bool served) {
    absl::MutexLock lock(&mu);
    health.push_back(served);
  });
  const Routing r = ThreeTokens();
  const std::vector<float> x = Inputs(r.tokens);
  std::vector<float> out(r.tokens * kHidden);

  b.set_mode(GetParam().mode);
  const absl::Time start = absl::Now();
  const absl::Status s = (*t)->Exchange(0, r, x.data(), out.data());
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));  // bounded by the step deadline
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(s.message(), HasSubstr(b.address()));
  EXPECT_THAT(s.message(), HasSubstr("failed at layer 0: "));
  EXPECT_THAT(s.message(), HasSubstr(GetParam().message));
  EXPECT_FALSE((*t)->AllExpertsServed());
  const std::vector<WorkerSnapshot> workers = (*t)->Workers();
  ASSERT_EQ(workers.size(), 2u);
  EXPECT_TRUE(workers[0].ready);
  EXPECT_FALSE(workers[1].ready);
  EXPECT_EQ(workers[1].experts, (ExpertRange{4, 8}));

  // Worker b is fixed: the reconnect thread brings it back and steps work again. (Until then a
  // step needing its experts fails fast naming it.)
  b.set_mode(Mode::kCorrect);
  ASSERT_TRUE(Eventually([&] { return (*t)->AllExpertsServed(); }));
  ASSERT_TRUE((*t)->Exchange(0, r, x.data(), out.data()).ok());
  EXPECT_EQ(out, Expected(r, x));
  // Back on a new channel where it had one.
  EXPECT_EQ((*t)->Workers()[1].transport, GetParam().channel ? "memory/f32" : "grpc/f32");
  // The reconnect marks the worker ready, then tells the health callback: wait for it.
  EXPECT_TRUE(Eventually([&] {
    absl::MutexLock lock(&mu);
    return health.size() >= 2;
  }));
  absl::MutexLock lock(&mu);
  ASSERT_GE(health.size(), 2u);
  EXPECT_FALSE(health.front());
  EXPECT_TRUE(health.back());
}

// With a replica, the same garbage costs nothing: the step succeeds with the exact sums from
// the replica, and only the bad worker is marked down (never its honest peer).
TEST_P(GrpcTransportGarbageTest, BadAnswerWithAReplicaFailsOverWithinTheStep) {
  FakeWorker a({0, 8}), b({0, 8});
  GrpcTransportOptions options = Options({&a, &b});
  options.step_timeout = absl::Milliseconds(300);
  options.deadline_floor = absl::Milliseconds(100);
  options.reconnect_interval = absl::Seconds(60);  // stays down for the test
  if (GetParam().channel) options.channels = MemoryChannelFactory();
  auto t = GrpcTransport::Create(Config(), options);
  ASSERT_TRUE(t.ok()) << t.status();
  const Routing r = ThreeTokens();
  const std::vector<float> x = Inputs(r.tokens);
  std::vector<float> out(r.tokens * kHidden);
  ASSERT_TRUE((*t)->Exchange(0, r, x.data(), out.data()).ok());  // measures the answer time
  b.set_mode(GetParam().mode);
  // The copies alternate: within two steps the bad one is asked, and both steps succeed.
  for (int step = 0; step < 2; ++step) {
    ASSERT_TRUE((*t)->Exchange(0, r, x.data(), out.data()).ok());
    EXPECT_EQ(out, Expected(r, x));
  }
  const std::vector<WorkerSnapshot> workers = (*t)->Workers();
  EXPECT_TRUE(workers[0].ready);
  EXPECT_FALSE(workers[1].ready);
  // (One worker holds every expert here, so it gets all 3 rows.)
  const std::string why = GetParam().mode == Mode::kHang ? "no answer within 100ms"
                          : GetParam().mode == Mode::kWrongShape
                              ? "output: expected shape [3, 4], got [2, 4]"
                              : GetParam().message;
  EXPECT_THAT(workers[1].message, HasSubstr(why));
}

std::string GarbageName(const ::testing::TestParamInfo<GarbageCase>& info) {
  static const char* const kNames[] = {"Correct", "WrongStep", "WrongShape", "WrongDtype",
                                       "Close",   "Hang",      "NaN",        "Huge",
                                       "Garbage", "HugeFrame"};
  return std::string(kNames[static_cast<int>(info.param.mode)]) +
         (info.param.channel ? "OverAChannel" : "");
}

INSTANTIATE_TEST_SUITE_P(
    Answers, GrpcTransportGarbageTest,
    ::testing::Values(
        GarbageCase{Mode::kWrongStep, "answered step"},
        GarbageCase{Mode::kWrongShape, "output: expected shape [2, 4], got [1, 4]"},
        GarbageCase{Mode::kWrongDtype,
                    "answered in DTYPE_BF16 to a request in "
                    "DTYPE_F32"},
        GarbageCase{Mode::kClose, "fake closes"},
        GarbageCase{Mode::kHang, "no answer within 300ms"},
        GarbageCase{Mode::kNaN, "output row 1 holds nan"},
        GarbageCase{Mode::kHuge, "output row 0 holds 1e+30"},
        // The same over a frame channel, and what only a
        // channel can carry.
        GarbageCase{Mode::kWrongStep, "answered step", true},
        GarbageCase{Mode::kWrongShape, "output: expected shape [2, 4], got [1, 4]", true},
        GarbageCase{Mode::kClose, "the channel was aborted", true},
        GarbageCase{Mode::kHang, "no answer within 300ms", true},
        GarbageCase{Mode::kNaN, "output row 1 holds nan", true},
        GarbageCase{Mode::kGarbageFrame, "a frame that is not a ForwardResponse", true},
        GarbageCase{Mode::kHugeFrame, "exceeds the limit of", true}),
    GarbageName);

TEST(GrpcTransportTest, ReplicasShareStepsAndTakeOverWithinTheStep) {
  FakeWorker a({0, 8}), replica({0, 8});
  auto t = GrpcTransport::Create(Config(), Options({&a, &replica}));
  ASSERT_TRUE(t.ok()) << t.status();
  const Routing r = ThreeTokens();
  const std::vector<float> x = Inputs(r.tokens);
  std::vector<float> out(r.tokens * kHidden);
  for (int step = 0; step < 4; ++step) ASSERT_TRUE((*t)->Exchange(0, r, x.data(), out.data()).ok());
  EXPECT_EQ(a.forwards(), 2);  // the copies alternate
  EXPECT_EQ(replica.forwards(), 2);
  a.Stop();
  // Whether the step finds `a` failing mid-exchange or already marked down by its health
  // watch, its rows go to the replica and the step succeeds.
  for (int step = 0; step < 2; ++step) {
    ASSERT_TRUE((*t)->Exchange(1, r, x.data(), out.data()).ok());
    EXPECT_EQ(out, Expected(r, x));
  }
  EXPECT_GE(replica.forwards(), 3);
  EXPECT_TRUE((*t)->AllExpertsServed());
  EXPECT_TRUE(Eventually([&] { return !(*t)->Workers()[0].ready; }));
}

TEST(GrpcTransportTest, StepNeedingADownWorkerFailsFastNamingIt) {
  FakeWorker a({0, 4}), b({4, 8});
  GrpcTransportOptions options = Options({&a, &b});
  options.reconnect_interval = absl::Seconds(60);  // stays down for the test
  auto t = GrpcTransport::Create(Config(), options);
  ASSERT_TRUE(t.ok()) << t.status();
  const Routing r = ThreeTokens();
  const std::vector<float> x = Inputs(r.tokens);
  std::vector<float> out(r.tokens * kHidden);
  b.set_mode(Mode::kClose);
  ASSERT_FALSE((*t)->Exchange(0, r, x.data(), out.data()).ok());
  const int64_t a_before = a.forwards();
  const absl::Status s = (*t)->Exchange(0, r, x.data(), out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("experts [4, 8) have no ready worker (expert worker " +
                                     b.address() + " (experts [4, 8)): layer 0: fake closes)"));
  EXPECT_EQ(a.forwards(), a_before);  // nothing was sent
}

}  // namespace
}  // namespace moe
