#include "coordinator/transport/grpc_transport.h"

#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc_util.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "grpcpp/grpcpp.h"
#include "moecluster/v1/expert.grpc.pb.h"

namespace moe {

namespace pb = moecluster::v1;

struct GrpcTransport::Worker {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::ExpertWorker::Stub> stub;
  // State shown by Workers(); guarded by mu_.
  bool ready = false;
  int64_t expert_begin = 0;
  int64_t expert_end = 0;
  std::string message = "not connected yet";
  // I/O hand-off, guarded by mu_: Exchange sets job; the I/O thread clears it and sets done.
  bool job = false;
  bool done = false;
  // Replaced only under exchange_mu_; used by the I/O thread only while `job` is set.
  std::unique_ptr<grpc::ClientContext> context;
  std::unique_ptr<grpc::ClientReaderWriter<pb::ForwardRequest, pb::ForwardResponse>> stream;
  bool stream_finished = true;  // Finish() was called on `stream` (or there is none)
  pb::ForwardRequest request;
  pb::ForwardResponse response;
  absl::Status result;
  double seconds = 0;  // of the last job: request written -> answer read
  std::thread io_thread;

  std::string Name() const {
    return absl::StrCat("expert worker ", address, " (experts [", expert_begin, ", ", expert_end,
                        "))");
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
  std::vector<bool> hosted(config.num_local_experts, false);
  for (auto& w : t->workers_) {
    for (int64_t e = w->expert_begin; e < w->expert_end; ++e) hosted[e] = true;
  }
  for (int64_t e = 0; e < config.num_local_experts;) {
    if (hosted[e]) {
      ++e;
      continue;
    }
    int64_t end = e;
    while (end < config.num_local_experts && !hosted[end]) ++end;
    return absl::FailedPreconditionError(absl::StrCat(
        "experts [", e, ", ", end, ") of every layer are hosted by no worker; start a worker "
        "with --experts ", e, "-", end - 1, " or widen an existing worker's range"));
  }
  for (auto& w : t->workers_) {
    Worker* raw = w.get();
    raw->io_thread = std::thread([t = t.get(), raw] { t->IoLoop(raw); });
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

// Asks the worker who it is, checks it serves our model, and opens its Forward stream.
absl::Status GrpcTransport::Connect(Worker* w, absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  ctx.set_wait_for_ready(true);
  pb::WorkerInfo info;
  grpc::Status s = w->stub->GetInfo(&ctx, pb::GetInfoRequest(), &info);
  if (!s.ok()) {
    return absl::UnavailableError(absl::StrCat("expert worker ", w->address, " did not answer: ",
                                               s.error_message()));
  }
  const std::string who = absl::StrCat("expert worker ", w->address);
  if (info.model_fingerprint() != options_.model_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        who, " serves a different model (fingerprint ", info.model_fingerprint(),
        ", the coordinator's is ", options_.model_fingerprint,
        "): point both at the same checkpoint"));
  }
  if (info.num_layers() != config_.num_hidden_layers ||
      info.num_experts() != config_.num_local_experts ||
      info.hidden_size() != config_.hidden_size || info.expert_begin() < 0 ||
      info.expert_begin() >= info.expert_end() || info.expert_end() > config_.num_local_experts) {
    return absl::FailedPreconditionError(absl::StrCat(
        who, " reports an inconsistent shape (layers ", info.num_layers(), ", experts ",
        info.num_experts(), ", hidden ", info.hidden_size(), ", hosts [", info.expert_begin(),
        ", ", info.expert_end(), "))"));
  }
  auto context = std::make_unique<grpc::ClientContext>();
  absl::MutexLock exchange(&exchange_mu_);
  CloseStream(w);
  w->stream = w->stub->Forward(context.get());
  w->context = std::move(context);
  w->stream_finished = false;
  {
    absl::MutexLock lock(&mu_);
    w->expert_begin = info.expert_begin();
    w->expert_end = info.expert_end();
    w->ready = true;
    w->message.clear();
  }
  LOG(INFO) << "connected to " << w->Name();
  NotifyHealth();
  return absl::OkStatus();
}

void GrpcTransport::MarkDown(Worker* w, const std::string& why) {
  {
    absl::MutexLock lock(&mu_);
    if (!w->ready) return;
    w->ready = false;
    w->message = why;
  }
  LOG(WARNING) << w->Name() << " is unavailable: " << why;
  NotifyHealth();
}

void GrpcTransport::ReconnectLoop() {
  while (true) {
    std::vector<Worker*> down;
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&shutdown_), options_.reconnect_interval);
      if (shutdown_) return;
      for (auto& w : workers_) {
        if (!w->ready) down.push_back(w.get());
      }
    }
    for (Worker* w : down) {
      absl::Status s = Connect(w, absl::Seconds(1));
      if (!s.ok()) {
        absl::MutexLock lock(&mu_);
        w->message = std::string(s.message());
      }
    }
  }
}

void GrpcTransport::IoLoop(Worker* w) {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      auto wake = [this, w]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return w->job || shutdown_; };
      mu_.Await(absl::Condition(&wake));
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
    w->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    absl::MutexLock lock(&mu_);
    w->result = result;
    w->job = false;
    w->done = true;
  }
}

absl::Status GrpcTransport::ChooseWorkers() {
  absl::MutexLock lock(&mu_);
  worker_of_expert_.assign(config_.num_local_experts, -1);
  for (size_t i = 0; i < workers_.size(); ++i) {
    const Worker& w = *workers_[i];
    if (!w.ready) continue;
    for (int64_t e = w.expert_begin; e < w.expert_end; ++e) {
      if (worker_of_expert_[e] < 0) worker_of_expert_[e] = static_cast<int32_t>(i);
    }
  }
  for (int64_t e = 0; e < config_.num_local_experts; ++e) {
    if (worker_of_expert_[e] >= 0) continue;
    std::string down;
    for (const auto& w : workers_) {
      if (!w->ready && e >= w->expert_begin && e < w->expert_end) {
        absl::StrAppend(&down, down.empty() ? "" : "; ", w->Name(), ": ", w->message);
      }
    }
    return absl::UnavailableError(absl::StrCat("expert ", e, " has no ready worker (", down, ")"));
  }
  return absl::OkStatus();
}

absl::Status GrpcTransport::Exchange(int64_t layer, const Routing& routing, const float* x,
                                     float* out) {
  absl::MutexLock exchange(&exchange_mu_);
  MOE_RETURN_IF_ERROR(ChooseWorkers());
  plan_.Build(routing, worker_of_expert_, static_cast<int64_t>(workers_.size()));
  const int64_t hidden = config_.hidden_size;
  ++step_;
  std::vector<Worker*>& active = active_;  // reused: no allocation per layer step
  active.clear();
  for (size_t i = 0; i < workers_.size(); ++i) {
    const WorkerDispatch& d = plan_.workers()[i];
    if (d.rows() == 0) continue;
    Worker* w = workers_[i].get();
    pb::ForwardRequest& req = w->request;
    req.set_step(step_);
    req.set_layer(static_cast<int32_t>(layer));
    pb::Tensor* t = req.mutable_hidden();
    t->set_dtype(pb::DTYPE_F32);
    t->clear_shape();
    t->add_shape(d.rows());
    t->add_shape(hidden);
    std::string* bytes = t->mutable_data();
    bytes->resize(d.rows() * hidden * sizeof(float));
    for (int64_t r = 0; r < d.rows(); ++r) {
      std::memcpy(bytes->data() + r * hidden * sizeof(float), x + d.tokens[r] * hidden,
                  hidden * sizeof(float));
    }
    req.mutable_row_offsets()->Assign(d.offsets.begin(), d.offsets.end());
    req.clear_experts();
    req.clear_weights();
    for (const ExpertAssignment& a : d.assignments) {
      req.add_experts(a.expert);
      req.add_weights(a.weight);
    }
    active.push_back(w);
  }
  {
    absl::MutexLock lock(&mu_);
    for (Worker* w : active) w->job = true, w->done = false;
    auto all_done = [&active]() {
      for (Worker* w : active) {
        if (!w->done) return false;
      }
      return true;
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&all_done), options_.step_timeout)) {
      std::vector<Worker*> late;
      for (Worker* w : active) {
        if (w->done) continue;
        w->context->TryCancel();  // unblocks the I/O thread's Read
        late.push_back(w);
      }
      mu_.Await(absl::Condition(&all_done));
      // A cancelled stream is unusable even if the answer slipped in: fail those workers.
      for (Worker* w : late) {
        w->result = absl::DeadlineExceededError(
            absl::StrCat("no answer within ", absl::FormatDuration(options_.step_timeout)));
      }
    }
  }
  std::fill(out, out + routing.tokens * hidden, 0.0f);
  absl::Status failure;
  reports_.clear();
  for (size_t i = 0; i < workers_.size(); ++i) {
    Worker* w = workers_[i].get();
    const WorkerDispatch& d = plan_.workers()[i];
    if (d.rows() == 0) continue;
    absl::Status s = w->result;
    const float* partial = nullptr;
    if (s.ok() && w->response.step() != step_) {
      s = absl::InternalError(absl::StrCat("answered step ", w->response.step(), " for step ", step_));
    }
    if (s.ok()) {
      auto decoded = DecodeF32Tensor(w->response.output(), d.rows(), hidden, "output");
      if (decoded.ok()) partial = *decoded;
      s = decoded.status();
    }
    if (!s.ok()) {
      const std::string why = absl::StrCat("layer ", layer, ": ", s.message());
      if (failure.ok()) failure = absl::UnavailableError(absl::StrCat(w->Name(), " failed at ", why));
      MarkDown(w, why);
      continue;
    }
    for (int64_t r = 0; r < d.rows(); ++r) {
      float* dst = out + d.tokens[r] * hidden;
      const float* src = partial + r * hidden;
      for (int64_t k = 0; k < hidden; ++k) dst[k] += src[k];
    }
    if (dispatch_observer_ != nullptr) {
      reports_.push_back({static_cast<int32_t>(i), w->seconds,
                          static_cast<int64_t>(w->request.ByteSizeLong()),
                          static_cast<int64_t>(w->response.ByteSizeLong()),
                          static_cast<int64_t>(d.assignments.size())});
    }
  }
  if (dispatch_observer_ != nullptr && !reports_.empty()) dispatch_observer_->OnDispatch(reports_);
  return failure;
}

std::vector<WorkerSnapshot> GrpcTransport::Workers() const {
  absl::MutexLock lock(&mu_);
  std::vector<WorkerSnapshot> out;
  for (const auto& w : workers_) {
    out.push_back({w->address, w->ready, w->expert_begin, w->expert_end, w->message});
  }
  return out;
}

bool GrpcTransport::AllExpertsServed() const {
  absl::MutexLock lock(&mu_);
  std::vector<bool> served(config_.num_local_experts, false);
  for (const auto& w : workers_) {
    if (!w->ready) continue;
    for (int64_t e = w->expert_begin; e < w->expert_end; ++e) served[e] = true;
  }
  return std::all_of(served.begin(), served.end(), [](bool b) { return b; });
}

void GrpcTransport::set_on_health_change(std::function<void(bool)> callback) {
  absl::MutexLock lock(&mu_);
  on_health_change_ = std::move(callback);
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
