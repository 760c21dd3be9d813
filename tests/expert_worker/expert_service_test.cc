// The expert worker over real gRPC channels: GetInfo, bit-exact Forward against a local
// ExpertFfn, rejection of every kind of malformed request (the worker never trusts the
// coordinator's bytes), --experts parsing, the memory footprint of a slice, and the
// moe-expert-worker binary's READY-line / signal / error contract.
#include <signal.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/time/time.h"
#include "common/expert_ffn.h"
#include "common/fingerprint.h"
#include "common/frame_channel.h"
#include "common/model_config.h"
#include "common/rpc/rpc_util.h"
#include "common/safetensors.h"
#include "expert_worker/worker_server.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "moecluster/v1/expert.grpc.pb.h"
#include "tests/testutil/checkpoint_writer.h"
#include "tests/testutil/http.h"
#include "tests/testutil/subprocess.h"

namespace moe {
namespace {

namespace pb = moecluster::v1;
using ::testing::HasSubstr;

// 32 experts, hidden 64, 2 layers, F16 weights, classic layout.
constexpr char kFixture[] = "tests/testdata/models/mixtral_32e_gqa_fp16";
constexpr int64_t kHidden = 64;
constexpr int64_t kBegin = 8;  // the suite's worker hosts experts 8..15
constexpr int64_t kEnd = 16;

std::unique_ptr<pb::ExpertWorker::Stub> Connect(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  return pb::ExpertWorker::NewStub(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

std::unique_ptr<grpc::ClientContext> ContextWithDeadline() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  return context;
}

// One layer step in plain form.
struct Step {
  int64_t layer = 0;
  int64_t rows = 0;
  std::vector<float> x;  // [rows, hidden]
  std::vector<int32_t> offsets;
  std::vector<ExpertAssignment> assignments;
};

// Rows r % 3 == 0 have no expert here; others one or two distinct hosted experts.
Step MakeStep(int64_t layer, int64_t rows, int seed) {
  Step s;
  s.layer = layer;
  s.rows = rows;
  s.x.resize(rows * kHidden);
  for (size_t i = 0; i < s.x.size(); ++i) s.x[i] = std::sin(0.37f * i + seed);
  s.offsets.push_back(0);
  for (int64_t r = 0; r < rows; ++r) {
    if (r % 3 != 0) {
      const int32_t e = static_cast<int32_t>(kBegin + (r * 5 + seed) % 8);
      const float w = 0.25f + 0.05f * static_cast<float>((r + seed) % 7);
      s.assignments.push_back({e, w});
      if (r % 3 == 2) {
        s.assignments.push_back({static_cast<int32_t>(kBegin + (r * 5 + seed + 3) % 8), 1 - w});
      }
    }
    s.offsets.push_back(static_cast<int32_t>(s.assignments.size()));
  }
  return s;
}

pb::ForwardRequest ToRequest(uint64_t step_id, const Step& s, pb::DType wire = pb::DTYPE_F32) {
  pb::ForwardRequest req;
  req.set_step(step_id);
  req.set_layer(static_cast<int32_t>(s.layer));
  EncodeRowsTensor(s.x.data(), s.rows, kHidden, wire, req.mutable_hidden());
  for (int32_t o : s.offsets) req.add_row_offsets(o);
  for (const ExpertAssignment& a : s.assignments) {
    req.add_experts(a.expert);
    req.add_weights(a.weight);
  }
  return req;
}

class ExpertServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    WorkerOptions options;
    options.model_dir = kFixture;
    options.experts = {kBegin, kEnd};
    auto server = WorkerServer::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    auto config = LoadModelConfig(kFixture);
    ASSERT_TRUE(config.ok()) << config.status();
    WeightsOptions weights_options;
    weights_options.load_shared = false;
    weights_options.experts = {kBegin, kEnd};
    auto weights = ModelWeights::Load(kFixture, *config, weights_options);
    ASSERT_TRUE(weights.ok()) << weights.status();
    local_weights_ = weights->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    delete local_weights_;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    stub_ = Connect(server_->address());
  }

  // What a local ExpertFfn over the same experts computes: [rows, hidden].
  static std::vector<float> LocalForward(const Step& s) {
    ExpertFfn ffn(local_weights_);
    ExpertBatch batch{s.layer, s.rows, s.x.data(), s.offsets, s.assignments};
    std::vector<float> out(s.rows * kHidden + 1);
    ffn.Forward(batch, out.data());
    out.pop_back();
    return out;
  }

  // Sends `req` on a fresh stream; the stream must end with INVALID_ARGUMENT and no response.
  grpc::Status SendMalformed(const pb::ForwardRequest& req) {
    auto context = ContextWithDeadline();
    auto stream = stub_->Forward(context.get());
    stream->Write(req);  // may fail once the server has already ended the stream
    stream->WritesDone();
    pb::ForwardResponse response;
    EXPECT_FALSE(stream->Read(&response));
    return stream->Finish();
  }

  static WorkerServer* server_;
  static ModelWeights* local_weights_;
  std::unique_ptr<pb::ExpertWorker::Stub> stub_;
};

WorkerServer* ExpertServiceTest::server_ = nullptr;
ModelWeights* ExpertServiceTest::local_weights_ = nullptr;

TEST_F(ExpertServiceTest, GetInfoDescribesTheSlice) {
  auto context = ContextWithDeadline();
  pb::WorkerInfo info;
  grpc::Status status = stub_->GetInfo(context.get(), pb::GetInfoRequest(), &info);
  ASSERT_TRUE(status.ok()) << status.error_message();
  auto config = LoadModelConfig(kFixture);
  auto store = TensorStore::Open(kFixture);
  ASSERT_TRUE(config.ok() && store.ok());
  EXPECT_EQ(info.model_fingerprint(), ModelFingerprint(*config, **store));
  EXPECT_EQ(info.model_fingerprint().size(), 16u);
  EXPECT_EQ(info.num_layers(), 2);
  EXPECT_EQ(info.num_experts(), 32);
  EXPECT_EQ(info.hidden_size(), 64);
  EXPECT_EQ(info.expert_begin(), 8);
  EXPECT_EQ(info.expert_end(), 16);
  EXPECT_EQ(info.weight_dtype(), pb::DTYPE_F16);
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_GT(server_->port(), 0);
  EXPECT_EQ(server_->address(), "127.0.0.1:" + std::to_string(server_->port()));
}

TEST_F(ExpertServiceTest, HealthServiceReportsServing) {
  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  for (const char* service : {"", "moecluster.v1.ExpertWorker"}) {
    auto context = ContextWithDeadline();
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    ASSERT_TRUE(health->Check(context.get(), request, &response).ok()) << service;
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
}

TEST_F(ExpertServiceTest, ForwardMatchesLocalExpertFfnBitForBitOverSeveralSteps) {
  auto context = ContextWithDeadline();
  auto stream = stub_->Forward(context.get());
  const std::vector<Step> steps = {MakeStep(0, 7, 1), MakeStep(1, 1, 2), MakeStep(1, 0, 3),
                                   MakeStep(0, 40, 4), MakeStep(1, 13, 5)};
  for (size_t i = 0; i < steps.size(); ++i) {
    const uint64_t step_id = 100 + i;
    ASSERT_TRUE(stream->Write(ToRequest(step_id, steps[i])));
    pb::ForwardResponse response;
    ASSERT_TRUE(stream->Read(&response)) << "step " << i;
    EXPECT_EQ(response.step(), step_id);
    EXPECT_EQ(response.output().dtype(), pb::DTYPE_F32);  // as the request
    const absl::Status checked =
        CheckRowsTensor(response.output(), steps[i].rows, kHidden, "output");
    ASSERT_TRUE(checked.ok()) << checked;
    const char* out = response.output().data().data();
    const std::vector<float> expected = LocalForward(steps[i]);
    bool any_nonzero = false;
    for (int64_t k = 0; k < steps[i].rows * kHidden; ++k) {
      float got;
      std::memcpy(&got, out + k * 4, 4);
      EXPECT_EQ(got, expected[k]) << "step " << i << " element " << k;
      any_nonzero |= got != 0.0f;
      // Rows with no expert here are exactly zero.
      if ((k / kHidden) % 3 == 0) {
        EXPECT_EQ(got, 0.0f);
      }
    }
    EXPECT_EQ(any_nonzero, steps[i].rows > 1) << "step " << i;
  }
  stream->WritesDone();
  grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
}

// A BF16 request is the F32 request of its rounded rows, answered with the F32 answer rounded
// to BF16 (nearest even), bit for bit.
TEST_F(ExpertServiceTest, Bf16RowsAreAnsweredInBf16) {
  Step step = MakeStep(1, 11, 6);
  for (float& v : step.x) v = BF16ToF32(F32ToBF16(v));
  auto context = ContextWithDeadline();
  auto stream = stub_->Forward(context.get());
  ASSERT_TRUE(stream->Write(ToRequest(1, step, pb::DTYPE_BF16)));
  pb::ForwardResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.output().dtype(), pb::DTYPE_BF16);
  const absl::Status checked = CheckRowsTensor(response.output(), step.rows, kHidden, "output");
  ASSERT_TRUE(checked.ok()) << checked;
  ASSERT_EQ(response.output().data().size(), static_cast<size_t>(step.rows * kHidden * 2));
  const std::vector<float> expected = LocalForward(step);
  std::vector<float> got(expected.size());
  DecodeRowsTensor(response.output(), got.data());
  int nonzero = 0;
  for (size_t k = 0; k < expected.size(); ++k) {
    EXPECT_EQ(got[k], BF16ToF32(F32ToBF16(expected[k]))) << "element " << k;
    nonzero += got[k] != 0.0f;
  }
  EXPECT_GT(nonzero, 0);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ExpertServiceTest, ConcurrentStreamsDoNotInterfere) {
  auto context_a = ContextWithDeadline();
  auto context_b = ContextWithDeadline();
  auto a = stub_->Forward(context_a.get());
  auto b = stub_->Forward(context_b.get());
  const Step step_a = MakeStep(0, 20, 7), step_b = MakeStep(1, 9, 8);
  ASSERT_TRUE(a->Write(ToRequest(1, step_a)));
  ASSERT_TRUE(b->Write(ToRequest(2, step_b)));
  pb::ForwardResponse ra, rb;
  ASSERT_TRUE(b->Read(&rb));
  ASSERT_TRUE(a->Read(&ra));
  EXPECT_EQ(ra.step(), 1u);
  EXPECT_EQ(rb.step(), 2u);
  const std::vector<float> ea = LocalForward(step_a), eb = LocalForward(step_b);
  EXPECT_EQ(ra.output().data(),
            std::string(reinterpret_cast<const char*>(ea.data()), ea.size() * 4));
  EXPECT_EQ(rb.output().data(),
            std::string(reinterpret_cast<const char*>(eb.data()), eb.size() * 4));
  a->WritesDone();
  b->WritesDone();
  EXPECT_TRUE(a->Finish().ok());
  EXPECT_TRUE(b->Finish().ok());
}

// OpenChannel: the same exchange over a frame channel (a memory one: the worker is in this
// process), answers bit-identical to the local FFN and to the stream's; a malformed request ends
// the channel; an oversized frame is refused unread; bad kinds and NCCL on a CPU worker are
// refused with the reason.
class ChannelClient {
 public:
  ChannelClient(pb::ExpertWorker::Stub* stub, const std::string& name) {
    auto [ours, theirs] = MemoryChannelPair();
    OfferMemoryChannel(name, std::move(theirs));
    channel_ = std::move(ours);
    pb::OpenChannelRequest request;
    request.set_kind("memory");
    request.set_memory_name(name);
    pb::OpenChannelResponse response;
    auto context = ContextWithDeadline();
    status_ = stub->OpenChannel(context.get(), request, &response);
  }
  const grpc::Status& status() const { return status_; }
  FrameChannel* channel() { return channel_.get(); }
  // Sends `req`; its answer, or why none came.
  absl::StatusOr<pb::ForwardResponse> RoundTrip(const pb::ForwardRequest& req) {
    std::string frame;
    req.SerializeToString(&frame);
    if (absl::Status s = channel_->Send(frame); !s.ok()) return s;
    if (absl::Status s = channel_->Receive(1 << 30, &frame); !s.ok()) return s;
    pb::ForwardResponse response;
    if (!response.ParseFromString(frame)) return absl::InternalError("not a response");
    return response;
  }

 private:
  std::unique_ptr<FrameChannel> channel_;
  grpc::Status status_;
};

TEST_F(ExpertServiceTest, ChannelsCarryTheSameExchangeBitForBit) {
  ChannelClient client(stub_.get(), "expert-service-test-1");
  ASSERT_TRUE(client.status().ok()) << client.status().error_message();
  const std::vector<Step> steps = {MakeStep(0, 7, 1), MakeStep(1, 0, 3), MakeStep(1, 13, 5)};
  for (size_t i = 0; i < steps.size(); ++i) {
    auto response = client.RoundTrip(ToRequest(10 + i, steps[i]));
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->step(), 10 + i);
    const std::vector<float> expected = LocalForward(steps[i]);
    EXPECT_EQ(response->output().data(),
              std::string(reinterpret_cast<const char*>(expected.data()), expected.size() * 4))
        << "step " << i;
  }
  // A malformed request ends the channel (the worker aborts it).
  pb::ForwardRequest bad = ToRequest(20, steps[0]);
  bad.set_layer(-1);
  EXPECT_EQ(client.RoundTrip(bad).status().code(), absl::StatusCode::kUnavailable);

  // A frame beyond the worker's message cap is refused before it is parsed.
  ChannelClient big(stub_.get(), "expert-service-test-2");
  ASSERT_TRUE(big.status().ok());
  ASSERT_TRUE(big.channel()->Send(std::string(size_t{64} << 20, '\0')).ok());  // cap: ~3 MB
  std::string frame;
  EXPECT_EQ(big.channel()->Receive(1 << 20, &frame).code(), absl::StatusCode::kUnavailable);
}

TEST_F(ExpertServiceTest, OpenChannelRefusesWhatItCannotServe) {
  auto open = [&](const std::string& kind, const std::string& id, const std::string& name) {
    pb::OpenChannelRequest request;
    request.set_kind(kind);
    request.set_nccl_unique_id(id);
    request.set_memory_name(name);
    pb::OpenChannelResponse response;
    auto context = ContextWithDeadline();
    return stub_->OpenChannel(context.get(), request, &response);
  };
  grpc::Status s = open("rdma", "", "");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("unknown channel kind 'rdma' (nccl or memory)"));
  s = open("nccl", std::string(128, 'x'), "");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("on the CPU (--device cpu): no NCCL channel"));
  s = open("memory", "", "never-offered");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  // A CPU worker offers no channel kinds.
  pb::WorkerInfo info;
  auto context = ContextWithDeadline();
  ASSERT_TRUE(stub_->GetInfo(context.get(), pb::GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.channels_size(), 0);
}

TEST(WorkerServerTest, ChannelsCountAgainstMaxStreamsAndEndAtShutdown) {
  WorkerOptions options;
  options.model_dir = kFixture;
  options.experts = {kBegin, kEnd};
  options.max_streams = 2;
  auto server = WorkerServer::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = Connect((*server)->address());
  ChannelClient one(stub.get(), "max-streams-1"), two(stub.get(), "max-streams-2");
  ASSERT_TRUE(one.status().ok());
  ASSERT_TRUE(two.status().ok());
  ChannelClient three(stub.get(), "max-streams-3");
  EXPECT_EQ(three.status().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(three.status().error_message(), HasSubstr("--max-streams"));
  ASSERT_TRUE(one.RoundTrip(ToRequest(1, MakeStep(0, 4, 1))).ok());
  // Shutdown aborts the open channels (and joins their threads): the client sees it.
  (*server)->Shutdown();
  (*server)->Wait();
  EXPECT_EQ(two.RoundTrip(ToRequest(2, MakeStep(0, 4, 1))).status().code(),
            absl::StatusCode::kUnavailable);
}

// A valid base: 3 rows, row 1 has no expert.
pb::ForwardRequest BaseRequest() {
  Step s;
  s.layer = 1;
  s.rows = 3;
  s.x.resize(3 * kHidden, 0.5f);
  s.offsets = {0, 2, 2, 4};
  s.assignments = {{8, 0.5f}, {12, 0.5f}, {9, 0.7f}, {15, 0.3f}};
  return ToRequest(7, s);
}

struct MalformedCase {
  const char* name;
  std::function<void(pb::ForwardRequest*)> mutate;
  const char* message;
};

TEST_F(ExpertServiceTest, MalformedRequestsEndTheStreamWithInvalidArgument) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<MalformedCase> cases = {
      {"layer -1", [](pb::ForwardRequest* r) { r->set_layer(-1); },
       "step 7: layer -1 is out of range [0, 2)"},
      {"layer 2", [](pb::ForwardRequest* r) { r->set_layer(2); }, "layer 2 is out of range"},
      {"dtype", [](pb::ForwardRequest* r) { r->mutable_hidden()->set_dtype(pb::DTYPE_F16); },
       "hidden: dtype must be F32"},
      {"no dtype",
       [](pb::ForwardRequest* r) { r->mutable_hidden()->set_dtype(pb::DTYPE_UNSPECIFIED); },
       "hidden: dtype must be F32"},
      {"hidden 63",
       [](pb::ForwardRequest* r) {
         r->mutable_hidden()->set_shape(1, 63);
         r->mutable_hidden()->mutable_data()->resize(3 * 63 * 4);
       },
       "hidden: expected shape [3, 64], got [3, 63]"},
      {"rank 1",
       [](pb::ForwardRequest* r) {
         r->mutable_hidden()->clear_shape();
         r->mutable_hidden()->add_shape(3 * 64);
       },
       "hidden: shape must be [rows, 64]"},
      {"bf16 with f32 bytes",
       [](pb::ForwardRequest* r) { r->mutable_hidden()->set_dtype(pb::DTYPE_BF16); },
       "hidden: 768 bytes for shape [3, 64] BF16, expected 384"},
      {"short by 4",
       [](pb::ForwardRequest* r) { r->mutable_hidden()->mutable_data()->resize(764); },
       "hidden: 764 bytes for shape [3, 64] F32, expected 768"},
      {"negative rows", [](pb::ForwardRequest* r) { r->mutable_hidden()->set_shape(0, -1); },
       "hidden: shape[0] = -1 rows"},
      {"huge rows",
       [](pb::ForwardRequest* r) {
         r->mutable_hidden()->set_shape(0, int64_t{1} << 40);
         r->mutable_hidden()->mutable_data()->resize(64 * 4);
         r->clear_row_offsets();
         r->add_row_offsets(0);
         r->add_row_offsets(0);
         r->clear_experts();
         r->clear_weights();
       },
       // DefaultMaxForwardRows of the fixture: (max(context, 4096) + 1024) x top-2.
       "hidden: shape[0] = 1099511627776 rows is outside [0, 10240] (the worker's "
       "--max-forward-rows)"},
      {"rows vs offsets",
       [](pb::ForwardRequest* r) {
         r->clear_row_offsets();
         for (int32_t o : {0, 2, 4}) r->add_row_offsets(o);
       },
       "row_offsets: expected rows + 1 = 4 entries for 3 hidden rows, got 3"},
      {"offsets start", [](pb::ForwardRequest* r) { r->set_row_offsets(0, 1); },
       "row_offsets[0] must be 0, got 1"},
      {"offsets decrease", [](pb::ForwardRequest* r) { r->set_row_offsets(1, 3); },
       "row_offsets decrease at row 1: 3 then 2"},
      {"offsets end", [](pb::ForwardRequest* r) { r->set_row_offsets(3, 3); },
       "row_offsets[3] = 3 must equal experts_size 4"},
      {"offsets past end", [](pb::ForwardRequest* r) { r->set_row_offsets(3, 1000); },
       "row_offsets[3] = 1000 must equal experts_size 4"},
      {"weights short", [](pb::ForwardRequest* r) { r->mutable_weights()->RemoveLast(); },
       "experts_size 4 != weights_size 3"},
      {"expert 3", [](pb::ForwardRequest* r) { r->set_experts(0, 3); },
       "experts[0] = 3 is not hosted here (this worker hosts experts 8-15)"},
      {"expert 99", [](pb::ForwardRequest* r) { r->set_experts(3, 99); },
       "experts[3] = 99 is not hosted here"},
      {"expert -1", [](pb::ForwardRequest* r) { r->set_experts(2, -1); },
       "experts[2] = -1 is not hosted here"},
      {"NaN weight", [nan](pb::ForwardRequest* r) { r->set_weights(1, nan); },
       "weights[1] = nan (expert 12) is not finite"},
      {"inf weight", [inf](pb::ForwardRequest* r) { r->set_weights(3, -inf); },
       "weights[3] = -inf (expert 15) is not finite"},
      {"duplicate expert", [](pb::ForwardRequest* r) { r->set_experts(1, 8); },
       "experts: row 0 lists expert 8 more than once (experts[1])"},
  };
  for (const MalformedCase& c : cases) {
    pb::ForwardRequest req = BaseRequest();
    c.mutate(&req);
    grpc::Status status = SendMalformed(req);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_THAT(status.error_message(), HasSubstr(c.message)) << c.name;
  }
}

TEST_F(ExpertServiceTest, BaseRequestIsValidAndTheServerSurvivesAMalformedStream) {
  pb::ForwardRequest bad = BaseRequest();
  bad.set_layer(5);
  EXPECT_EQ(SendMalformed(bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // A valid step after a bad one on the same stream is never answered: the stream is over.
  {
    auto context = ContextWithDeadline();
    auto stream = stub_->Forward(context.get());
    ASSERT_TRUE(stream->Write(BaseRequest()));
    pb::ForwardResponse response;
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_EQ(response.step(), 7u);
    stream->Write(bad);
    stream->Write(BaseRequest());
    stream->WritesDone();
    EXPECT_FALSE(stream->Read(&response));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // A new stream on the same server works.
  auto context = ContextWithDeadline();
  auto stream = stub_->Forward(context.get());
  const Step step = MakeStep(1, 5, 9);
  ASSERT_TRUE(stream->Write(ToRequest(42, step)));
  pb::ForwardResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.step(), 42u);
  const std::vector<float> expected = LocalForward(step);
  EXPECT_EQ(response.output().data(),
            std::string(reinterpret_cast<const char*>(expected.data()), expected.size() * 4));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST(WorkerServerTest, CreateRejectsBadOptions) {
  WorkerOptions options;
  options.model_dir = kFixture;
  options.experts = {0, 41};
  auto s = WorkerServer::Create(options);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("--experts 0-40 is outside the model's 32 experts"));

  options.experts = {0, 4};
  options.listen = "nonsense";
  s = WorkerServer::Create(options);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("--listen"));

  options.listen = "127.0.0.1:0";
  options.threads = -2;
  EXPECT_EQ(WorkerServer::Create(options).status().code(), absl::StatusCode::kInvalidArgument);

  options.threads = 0;
  options.model_dir = "/nonexistent/model";
  s = WorkerServer::Create(options);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.status().message(), HasSubstr("model /nonexistent/model does not exist"));
}

TEST(WorkerServerTest, MetricsCountRowsPerLayerAndHostedExpert) {
  WorkerOptions options;
  options.model_dir = kFixture;
  options.experts = {kBegin, kEnd};
  options.metrics_listen = "127.0.0.1:0";
  auto server = WorkerServer::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string metrics = (*server)->metrics_address();
  ASSERT_THAT(metrics, ::testing::StartsWith("127.0.0.1:"));

  // Every hosted (layer, expert) series exists from the start, at 0; no others.
  auto m = testing::ParseMetricsText(testing::HttpGet(metrics, "/metrics"));
  int series = 0;
  for (const auto& [name, value] : m) {
    if (name.rfind("moe_worker_rows_total{", 0) != 0) continue;
    ++series;
    EXPECT_EQ(value, 0) << name;
  }
  EXPECT_EQ(series, 2 * (kEnd - kBegin));
  EXPECT_EQ(m.count("moe_worker_rows_total{expert=\"0\",layer=\"0\"}"), 0u);  // not hosted

  const std::vector<Step> steps = {MakeStep(0, 7, 1), MakeStep(1, 13, 5), MakeStep(0, 40, 4)};
  std::map<std::pair<int64_t, int32_t>, int> expected;
  auto stub = Connect((*server)->address());
  auto context = ContextWithDeadline();
  auto stream = stub->Forward(context.get());
  for (size_t i = 0; i < steps.size(); ++i) {
    for (const ExpertAssignment& a : steps[i].assignments) ++expected[{steps[i].layer, a.expert}];
    ASSERT_TRUE(stream->Write(ToRequest(i, steps[i])));
    pb::ForwardResponse response;
    ASSERT_TRUE(stream->Read(&response));
  }
  stream->WritesDone();
  ASSERT_TRUE(stream->Finish().ok());
  // A malformed request computes nothing and counts nothing.
  pb::ForwardRequest bad = ToRequest(9, MakeStep(0, 4, 2));
  bad.set_experts(0, 0);
  {
    auto bad_context = ContextWithDeadline();
    auto bad_stream = stub->Forward(bad_context.get());
    bad_stream->Write(bad);
    bad_stream->WritesDone();
    EXPECT_EQ(bad_stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }

  m = testing::ParseMetricsText(testing::HttpGet(metrics, "/metrics"));
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (int32_t e = kBegin; e < kEnd; ++e) {
      const std::string name = "moe_worker_rows_total{expert=\"" + std::to_string(e) +
                               "\",layer=\"" + std::to_string(layer) + "\"}";
      ASSERT_EQ(m.count(name), 1u) << name;
      EXPECT_EQ(m[name], (expected[{layer, e}])) << name;
    }
  }
  EXPECT_EQ(m["moe_worker_forward_duration_seconds_count"], 3);
  EXPECT_GT(m["moe_worker_forward_duration_seconds_sum"], 0);
  bool build_info = false;
  for (const auto& [name, value] : m) {
    if (name.rfind("moe_build_info{", 0) == 0) {
      build_info = true;
      EXPECT_THAT(name, HasSubstr("role=\"worker\""));
      EXPECT_EQ(value, 1);
    }
  }
  EXPECT_TRUE(build_info);

  // A port that is taken: a clear error, no half-started worker.
  options.metrics_listen = metrics;
  auto busy = WorkerServer::Create(options);
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(busy.status().message(), HasSubstr(metrics));
  options.metrics_listen = "9400";
  auto bad_address = WorkerServer::Create(options);
  EXPECT_EQ(bad_address.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_address.status().message(), HasSubstr("--metrics-listen"));
}

TEST(WorkerServerTest, HalfTheExpertsMapsHalfTheExpertBytesAndNoSharedTensor) {
  auto store = TensorStore::Open(kFixture);
  ASSERT_TRUE(store.ok()) << store.status();
  // From the tensor headers: model.layers.{i}.block_sparse_moe.experts.{e}.w{1,2,3}.weight.
  const std::string marker = ".block_sparse_moe.experts.";
  uint64_t total = 0, hosted = 0, shared = 0;
  for (const std::string& name : (*store)->TensorNames()) {
    const uint64_t bytes = (*store)->Find(name)->byte_size;
    const size_t at = name.find(marker);
    if (at == std::string::npos) {
      shared += bytes;
      continue;
    }
    const std::string rest = name.substr(at + marker.size());
    int64_t expert = -1;
    ASSERT_TRUE(absl::SimpleAtoi(rest.substr(0, rest.find('.')), &expert)) << name;
    total += bytes;
    if (expert < 16) hosted += bytes;
  }
  ASSERT_GT(total, 0u);
  ASSERT_GT(shared, 0u);
  EXPECT_EQ(hosted * 2, total);

  WorkerOptions options;
  options.model_dir = kFixture;
  options.experts = {0, 16};
  auto server = WorkerServer::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  // Exactly the hosted experts' bytes: nothing else (embed_tokens, attention, norms, router,
  // lm_head, the other 16 experts) was mapped.
  EXPECT_EQ((*server)->mapped_expert_bytes(), hosted);
  EXPECT_EQ((*server)->mapped_expert_bytes(), total / 2);
  EXPECT_EQ((*server)->resident_expert_bytes(), hosted);

  // Quantized on load: the F16 slice is released, its Q8_0 copy (34 bytes per 32 values
  // instead of 64) is all that stays.
  server->reset();
  options.quantize = DType::kQ8_0;
  server = WorkerServer::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ((*server)->mapped_expert_bytes(), 0u);
  EXPECT_EQ((*server)->resident_expert_bytes(), hosted / 2 / 32 * 34);
}

// ---- The binary ----

TEST(WorkerBinaryTest, PrintsReadyServesAndExitsCleanlyOnSigterm) {
  const std::string log = testing::TempDir("worker_ready") + "/stderr.txt";
  testing::Subprocess worker;
  ASSERT_TRUE(worker
                  .Start(MOE_WORKER_PATH,
                         {"--model", kFixture, "--experts", "8-15", "--listen", "127.0.0.1:0",
                          "--threads", "2"},
                         log)
                  .ok());
  absl::StatusOr<std::string> address = worker.WaitForReady(absl::Seconds(30));
  ASSERT_TRUE(address.ok()) << address.status() << "\n" << testing::ReadLog(log);
  EXPECT_THAT(*address, ::testing::StartsWith("127.0.0.1:"));
  auto stub = Connect(*address);
  auto context = ContextWithDeadline();
  pb::WorkerInfo info;
  EXPECT_TRUE(stub->GetInfo(context.get(), pb::GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.expert_begin(), 8);
  EXPECT_EQ(info.expert_end(), 16);
  EXPECT_EQ(info.num_experts(), 32);

  // A Forward stream left open does not keep the process from exiting.
  auto stream_context = ContextWithDeadline();
  auto stream = stub->Forward(stream_context.get());
  ASSERT_TRUE(stream->Write(BaseRequest()));
  pb::ForwardResponse response;
  ASSERT_TRUE(stream->Read(&response));

  EXPECT_EQ(worker.Stop(SIGTERM), 0) << testing::ReadLog(log);
  const std::string err = testing::ReadLog(log);
  EXPECT_THAT(err, HasSubstr("experts 8-15 of 32"));
  EXPECT_THAT(err, HasSubstr(*address));
}

TEST(WorkerBinaryTest, BadExpertsExitsOneWithTheMessage) {
  struct Case {
    const char* experts;
    const char* message;
  };
  for (const Case& c :
       {Case{"3-1", "moe-expert-worker: error: --experts \"3-1\": the range is reversed"},
        Case{"0-40",
             "moe-expert-worker: error: --experts 0-40 is outside the model's 32 "
             "experts (ids 0-31)"}}) {
    const std::string log = testing::TempDir("worker_bad") + "/stderr.txt";
    testing::Subprocess worker;
    ASSERT_TRUE(worker
                    .Start(MOE_WORKER_PATH,
                           {"--model", kFixture, "--experts", c.experts, "--listen", "127.0.0.1:0"},
                           log)
                    .ok());
    absl::StatusOr<std::string> address = worker.WaitForReady(absl::Seconds(30));
    EXPECT_FALSE(address.ok()) << c.experts;  // exits before READY
    EXPECT_EQ(worker.WaitForExit(absl::Seconds(30)), 1) << c.experts;
    EXPECT_THAT(testing::ReadLog(log), HasSubstr(c.message));
  }
}

// --device: a bad spelling, and cuda where it cannot run (no CUDA backend in this build, or no
// GPU), exit 1 naming what to do; with a GPU the worker serves and says where.
TEST(WorkerBinaryTest, DeviceFlag) {
  struct Case {
    const char* device;
    const char* message;  // empty: expected to start
  };
  std::vector<Case> cases = {{"gpu", "--device: 'gpu' is not a device; use cpu, cuda or cuda:N"}};
#ifdef MOE_HAVE_CUDA
  const absl::StatusOr<int> gpus = CudaDeviceCount();
  const bool have_gpu = gpus.ok() && *gpus > 0;
  cases.push_back({"cuda", have_gpu ? "" : "cuda:0: no CUDA device"});
#else
  cases.push_back({"cuda",
                   "this build has no CUDA backend; build with scripts/build.sh "
                   "-DMOE_ENABLE_CUDA=ON"});
#endif
  for (const Case& c : cases) {
    const std::string log = testing::TempDir("worker_device") + "/stderr.txt";
    testing::Subprocess worker;
    ASSERT_TRUE(worker
                    .Start(MOE_WORKER_PATH,
                           {"--model", kFixture, "--device", c.device, "--listen", "127.0.0.1:0"},
                           log)
                    .ok());
    absl::StatusOr<std::string> address = worker.WaitForReady(absl::Seconds(60));
    if (*c.message == '\0') {
      ASSERT_TRUE(address.ok()) << testing::ReadLog(log);
      EXPECT_THAT(testing::ReadLog(log), HasSubstr(") on cuda:0 ("));
      continue;  // the Subprocess stops it
    }
    EXPECT_FALSE(address.ok()) << c.device;
    EXPECT_EQ(worker.WaitForExit(absl::Seconds(30)), 1) << c.device;
    EXPECT_THAT(testing::ReadLog(log), HasSubstr(c.message)) << c.device;
  }
}

}  // namespace
}  // namespace moe
