#include "coordinator/transport/grpc_transport.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc_util.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "grpcpp/grpcpp.h"
#include "moecluster/v1/expert.grpc.pb.h"

namespace moe {

namespace pb = moecluster::v1;

namespace {

std::string WorkerName(const std::string& address, const ExpertRange& experts) {
  return absl::StrCat("expert worker ", address, " (experts ", experts.ToString(), ")");
}

// The request for one worker's part of a layer: its rows of x and their (expert, weight) pairs.
void EncodeRequest(uint64_t step, int64_t layer, const WorkerDispatch& d, const float* x,
                   int64_t hidden, pb::ForwardRequest* req) {
  req->set_step(step);
  req->set_layer(static_cast<int32_t>(layer));
  pb::Tensor* t = req->mutable_hidden();
  t->set_dtype(pb::DTYPE_F32);
  t->clear_shape();
  t->add_shape(d.rows());
  t->add_shape(hidden);
  std::string* bytes = t->mutable_data();
  bytes->resize(static_cast<size_t>(d.rows() * hidden) * sizeof(float));
  GatherRows(x, hidden, d.tokens, bytes->data());
  req->mutable_row_offsets()->Assign(d.offsets.begin(), d.offsets.end());
  req->clear_experts();
  req->clear_weights();
  for (const ExpertAssignment& a : d.assignments) {
    req->add_experts(a.expert);
    req->add_weights(a.weight);
  }
}

// Bigger than any honest hidden-state value (fp16 checkpoints keep them below 65504), far below
// what a broken or hostile worker could send.
constexpr float kMaxPartialSum = 1e8f;

// A worker's answer is untrusted: the step it echoes, the output's dtype, shape and size, and
// its values.
absl::StatusOr<const void*> CheckResponse(const pb::ForwardResponse& response, uint64_t step,
                                          int64_t rows, int64_t hidden) {
  if (response.step() != step) {
    return absl::InternalError(absl::StrCat("answered step ", response.step(), " for step ", step));
  }
  MOE_RETURN_IF_ERROR(CheckF32Tensor(response.output(), rows, hidden, "output"));
  // The values too: a NaN, an infinity or an absurd magnitude would flow into the residual
  // stream and the next layer's routing (and get an honest worker blamed for it there).
  const char* data = response.output().data().data();
  for (int64_t i = 0; i < rows * hidden; ++i) {
    float v;
    std::memcpy(&v, data + i * sizeof(float), sizeof(float));
    if (!(std::fabs(v) <= kMaxPartialSum)) {  // NaN fails too
      return absl::InternalError(absl::StrCat("output row ", i / hidden, " holds ", v,
                                              " (partial sums must be finite and within ±",
                                              kMaxPartialSum, ")"));
    }
  }
  return static_cast<const void*>(data);
}

}  // namespace

struct GrpcTransport::Worker {
  // Constant after Create.
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::ExpertWorker::Stub> stub;
  std::thread io_thread;

  // State shown by Workers() and the I/O hand-off: Send sets `job`; the I/O thread clears it,
  // stores result and seconds, and sets `done`.
  mutable absl::Mutex mu;
  bool ready ABSL_GUARDED_BY(mu) = false;
  ExpertRange experts ABSL_GUARDED_BY(mu);
  std::string message ABSL_GUARDED_BY(mu) = "not connected yet";
  bool job ABSL_GUARDED_BY(mu) = false;
  bool done ABSL_GUARDED_BY(mu) = false;
  bool shutdown ABSL_GUARDED_BY(mu) = false;
  absl::Status result ABSL_GUARDED_BY(mu);
  double seconds ABSL_GUARDED_BY(mu) = 0;  // of the last job: request written -> answer read

  // The stream and the messages have no lock: while `job` is set (from Send until the I/O
  // thread sets `done`) only the I/O thread touches them (except context->TryCancel(), which
  // gRPC allows from any thread); otherwise only the holder of exchange_mu_ does.
  std::unique_ptr<grpc::ClientContext> context;
  std::unique_ptr<grpc::ClientReaderWriter<pb::ForwardRequest, pb::ForwardResponse>> stream;
  bool stream_finished = true;  // Finish() was called on `stream` (or there is none)
  pb::ForwardRequest request;
  pb::ForwardResponse response;

  bool HasJobOrShutdown() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return job || shutdown; }
  std::string Name() const ABSL_LOCKS_EXCLUDED(mu) {
    absl::MutexLock lock(&mu);
    return WorkerName(address, experts);
  }
};

GrpcTransport::GrpcTransport(const ModelConfig& config, const GrpcTransportOptions& options)
    : config_(config), options_(options) {}

absl::StatusOr<std::unique_ptr<GrpcTransport>> GrpcTransport::Create(
    const ModelConfig& config, const GrpcTransportOptions& options) {
  if (options.worker_addresses.empty()) {
    return absl::InvalidArgumentError("--workers must name at least one expert worker");
  }
  std::unique_ptr<GrpcTransport> t(new GrpcTransport(config, options));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  for (const std::string& address : options.worker_addresses) {
    auto w = std::make_unique<Worker>();
    w->address = address;
    w->channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
    w->stub = pb::ExpertWorker::NewStub(w->channel);
    t->workers_.push_back(std::move(w));
  }
  for (auto& w : t->workers_) {
    MOE_RETURN_IF_ERROR(t->Connect(w.get(), options.connect_timeout));
  }
  std::vector<ExpertRange> hosted;
  for (const WorkerSnapshot& w : t->Workers()) hosted.push_back(w.experts);
  const std::vector<ExpertRange> missing = UncoveredExperts(hosted, config.num_local_experts);
  if (!missing.empty()) {
    const ExpertRange& m = missing.front();
    return absl::FailedPreconditionError(
        absl::StrCat("experts ", m.ToString(),
                     " of every layer are hosted by no worker; start a worker "
                     "with --experts ",
                     m.InclusiveSpelling(), " or widen an existing worker's range"));
  }
  for (auto& w : t->workers_) {
    Worker* raw = w.get();
    raw->io_thread = std::thread([raw] { IoLoop(raw); });
  }
  t->reconnect_thread_ = std::thread([t = t.get()] { t->ReconnectLoop(); });
  return t;
}

GrpcTransport::~GrpcTransport() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
  }
  if (reconnect_thread_.joinable()) reconnect_thread_.join();
  for (auto& w : workers_) {
    {
      absl::MutexLock lock(&w->mu);
      w->shutdown = true;
    }
    if (w->io_thread.joinable()) w->io_thread.join();
    CloseStream(w.get());
  }
}

void GrpcTransport::CloseStream(Worker* w) {
  if (w->stream == nullptr || w->stream_finished) return;
  w->context->TryCancel();
  w->stream->Finish().ok();  // CANCELLED; only to release the call
  w->stream_finished = true;
}

absl::Status GrpcTransport::Connect(Worker* w, absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  ctx.set_wait_for_ready(true);
  pb::WorkerInfo info;
  grpc::Status s = w->stub->GetInfo(&ctx, pb::GetInfoRequest(), &info);
  if (!s.ok()) {
    return absl::UnavailableError(
        absl::StrCat("expert worker ", w->address, " did not answer: ", s.error_message()));
  }
  const std::string who = absl::StrCat("expert worker ", w->address);
  if (info.model_fingerprint() != options_.model_fingerprint) {
    return absl::FailedPreconditionError(
        absl::StrCat(who, " serves a different model (fingerprint ", info.model_fingerprint(),
                     ", the coordinator's is ", options_.model_fingerprint,
                     "): point both at the same checkpoint"));
  }
  const ExpertRange experts{info.expert_begin(), info.expert_end()};
  if (info.num_layers() != config_.num_hidden_layers ||
      info.num_experts() != config_.num_local_experts ||
      info.hidden_size() != config_.hidden_size || experts.begin < 0 || experts.empty() ||
      experts.end > config_.num_local_experts) {
    return absl::FailedPreconditionError(absl::StrCat(
        who, " reports an inconsistent shape (layers ", info.num_layers(), ", experts ",
        info.num_experts(), ", hidden ", info.hidden_size(), ", hosts ", experts.ToString(), ")"));
  }
  auto context = std::make_unique<grpc::ClientContext>();
  {
    absl::MutexLock exchange(&exchange_mu_);
    CloseStream(w);
    w->stream = w->stub->Forward(context.get());
    w->context = std::move(context);
    w->stream_finished = false;
    absl::MutexLock lock(&w->mu);
    w->experts = experts;
    w->ready = true;
    w->message.clear();
  }
  LOG(INFO) << "connected to " << w->Name();
  NotifyHealth();
  return absl::OkStatus();
}

void GrpcTransport::MarkDown(Worker* w, const std::string& why) {
  std::string name;
  {
    absl::MutexLock lock(&w->mu);
    if (!w->ready) return;
    w->ready = false;
    w->message = why;
    name = WorkerName(w->address, w->experts);
  }
  LOG(WARNING) << name << " is unavailable: " << why;
  NotifyHealth();
}

void GrpcTransport::ReconnectLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&shutdown_), options_.reconnect_interval);
      if (shutdown_) return;
    }
    for (auto& w : workers_) {
      {
        absl::MutexLock lock(&w->mu);
        if (w->ready) continue;
      }
      absl::Status s = Connect(w.get(), absl::Seconds(1));
      if (!s.ok()) {
        absl::MutexLock lock(&w->mu);
        w->message = std::string(s.message());
      }
    }
  }
}

void GrpcTransport::IoLoop(Worker* w) {
  while (true) {
    {
      absl::MutexLock lock(&w->mu);
      w->mu.Await(absl::Condition(w, &Worker::HasJobOrShutdown));
      if (!w->job) return;  // shutdown
    }
    absl::Status result;
    const auto start = std::chrono::steady_clock::now();
    if (!w->stream->Write(w->request) || !w->stream->Read(&w->response)) {
      grpc::Status s = w->stream->Finish();
      w->stream_finished = true;
      result = s.ok() ? absl::UnavailableError("the worker closed its stream")
                      : absl::UnavailableError(s.error_message());
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    absl::MutexLock lock(&w->mu);
    w->result = result;
    w->seconds = seconds;
    w->job = false;
    w->done = true;
  }
}

absl::Status GrpcTransport::Exchange(int64_t layer, const Routing& routing, const float* x,
                                     float* out) {
  absl::MutexLock exchange(&exchange_mu_);
  MOE_RETURN_IF_ERROR(Plan(routing));
  ++step_;
  Send(layer, x);
  Await();
  return Combine(layer, routing.tokens, out);
}

absl::Status GrpcTransport::Plan(const Routing& routing) {
  live_.clear();  // reused: no allocation per layer step
  for (auto& w : workers_) {
    absl::MutexLock lock(&w->mu);
    live_.push_back(w->ready ? w->experts : ExpertRange{});
  }
  AssignExpertsToWorkers(live_, config_.num_local_experts, &worker_of_expert_);
  for (int64_t e = 0; e < config_.num_local_experts; ++e) {
    if (worker_of_expert_[e] >= 0) continue;
    std::string down;
    for (const WorkerSnapshot& w : Workers()) {
      if (!w.ready && w.experts.Contains(e)) {
        absl::StrAppend(&down, down.empty() ? "" : "; ", WorkerName(w.address, w.experts), ": ",
                        w.message);
      }
    }
    return absl::UnavailableError(absl::StrCat("expert ", e, " has no ready worker (", down, ")"));
  }
  plan_.Build(routing, worker_of_expert_, static_cast<int64_t>(workers_.size()));
  return absl::OkStatus();
}

void GrpcTransport::Send(int64_t layer, const float* x) {
  active_.clear();
  for (size_t i = 0; i < workers_.size(); ++i) {
    const WorkerDispatch& d = plan_.workers()[i];
    if (d.rows() == 0) continue;
    Worker* w = workers_[i].get();
    EncodeRequest(step_, layer, d, x, config_.hidden_size, &w->request);
    absl::MutexLock lock(&w->mu);
    w->job = true;
    w->done = false;
    active_.push_back(w);
  }
}

void GrpcTransport::Await() {
  const absl::Time deadline = absl::Now() + options_.step_timeout;
  for (Worker* w : active_) {
    if (w->mu.LockWhenWithDeadline(absl::Condition(&w->done), deadline)) {
      w->mu.Unlock();
      continue;
    }
    // Late: cancel the stream, which unblocks the I/O thread's Read, and wait for it. A
    // cancelled stream is unusable even if the answer slipped in: the worker fails this step.
    w->context->TryCancel();
    w->mu.Await(absl::Condition(&w->done));
    w->result = absl::DeadlineExceededError(
        absl::StrCat("no answer within ", absl::FormatDuration(options_.step_timeout)));
    w->mu.Unlock();
  }
}

absl::Status GrpcTransport::Combine(int64_t layer, int64_t tokens, float* out) {
  const int64_t hidden = config_.hidden_size;
  std::fill(out, out + tokens * hidden, 0.0f);
  absl::Status failure;
  reports_.clear();
  for (size_t i = 0; i < workers_.size(); ++i) {
    const WorkerDispatch& d = plan_.workers()[i];
    if (d.rows() == 0) continue;
    Worker* w = workers_[i].get();
    absl::Status s;
    double seconds = 0;
    {
      absl::MutexLock lock(&w->mu);
      s = w->result;
      seconds = w->seconds;
    }
    absl::StatusOr<const void*> partial =
        s.ok() ? CheckResponse(w->response, step_, d.rows(), hidden) : s;
    if (!partial.ok()) {
      const std::string why = absl::StrCat("layer ", layer, ": ", partial.status().message());
      if (failure.ok()) {
        failure = absl::UnavailableError(absl::StrCat(w->Name(), " failed at ", why));
      }
      MarkDown(w, why);
      continue;
    }
    ScatterAddRows(*partial, hidden, d.tokens, out);
    if (dispatch_observer_ != nullptr) {
      reports_.push_back({static_cast<int32_t>(i), seconds,
                          static_cast<int64_t>(w->request.ByteSizeLong()),
                          static_cast<int64_t>(w->response.ByteSizeLong()),
                          static_cast<int64_t>(d.assignments.size())});
    }
  }
  if (dispatch_observer_ != nullptr && !reports_.empty()) dispatch_observer_->OnDispatch(reports_);
  return failure;
}

std::vector<WorkerSnapshot> GrpcTransport::Workers() const {
  std::vector<WorkerSnapshot> out;
  for (const auto& w : workers_) {
    absl::MutexLock lock(&w->mu);
    out.push_back({w->address, w->ready, w->experts, w->message});
  }
  return out;
}

bool GrpcTransport::AllExpertsServed() const {
  return moe::AllExpertsServed(Workers(), config_.num_local_experts);
}

void GrpcTransport::set_on_health_change(std::function<void(bool)> callback) {
  absl::MutexLock lock(&mu_);
  on_health_change_ = std::move(callback);
}

void GrpcTransport::set_dispatch_observer(DispatchObserver* observer) {
  absl::MutexLock lock(&exchange_mu_);
  dispatch_observer_ = observer;
}

void GrpcTransport::NotifyHealth() {
  std::function<void(bool)> callback;
  {
    absl::MutexLock lock(&mu_);
    callback = on_health_change_;
  }
  if (callback) callback(AllExpertsServed());
}

}  // namespace moe
