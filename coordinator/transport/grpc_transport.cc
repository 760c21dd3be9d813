#include "coordinator/transport/grpc_transport.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc_util.h"
#include "common/status_macros.h"
#include "coordinator/placement.h"
#include "glog/logging.h"
#include "grpcpp/grpcpp.h"
#include "moecluster/v1/expert.grpc.pb.h"

namespace moe {

namespace pb = moecluster::v1;

namespace {

std::string WorkerName(const std::string& address, const ExpertRange& experts) {
  return absl::StrCat("expert worker ", address, " (experts ", experts.ToString(), ")");
}

// The request for one worker's part of a layer: its rows of x (in `wire`, F32 or BF16; BF16
// goes through `scratch`) and their (expert, weight) pairs.
void EncodeRequest(uint64_t step, int64_t layer, const DispatchRows& d, const float* x,
                   int64_t hidden, pb::DType wire, std::vector<float>* scratch,
                   pb::ForwardRequest* req) {
  req->set_step(step);
  req->set_layer(static_cast<int32_t>(layer));
  pb::Tensor* t = req->mutable_hidden();
  if (wire == pb::DTYPE_BF16) {
    scratch->resize(static_cast<size_t>(d.rows() * hidden));
    GatherRows(x, hidden, d.tokens, scratch->data());
    EncodeRowsTensor(scratch->data(), d.rows(), hidden, wire, t);
  } else {
    t->set_dtype(pb::DTYPE_F32);
    t->clear_shape();
    t->add_shape(d.rows());
    t->add_shape(hidden);
    std::string* bytes = t->mutable_data();
    bytes->resize(static_cast<size_t>(d.rows() * hidden) * sizeof(float));
    GatherRows(x, hidden, d.tokens, bytes->data());
  }
  req->mutable_row_offsets()->Assign(d.offsets.begin(), d.offsets.end());
  req->clear_experts();
  req->clear_weights();
  for (const ExpertAssignment& a : d.assignments) {
    req->add_experts(a.expert);
    req->add_weights(a.weight);
  }
}

// A worker's answer is untrusted: the step it echoes and the output's dtype (the request's),
// shape and size (the dispatcher checks the values as it copies them). BF16 answers are
// widened into `scratch`.
absl::StatusOr<const void*> CheckResponse(const pb::ForwardResponse& response, uint64_t step,
                                          int64_t rows, int64_t hidden, pb::DType wire,
                                          std::vector<float>* scratch) {
  if (response.step() != step) {
    return absl::InternalError(absl::StrCat("answered step ", response.step(), " for step ", step));
  }
  const pb::Tensor& out = response.output();
  if (out.dtype() != wire) {
    return absl::InternalError(absl::StrCat("answered in ", pb::DType_Name(out.dtype()),
                                            " to a request in ", pb::DType_Name(wire)));
  }
  MOE_RETURN_IF_ERROR(CheckRowsTensor(out, rows, hidden, "output"));
  if (wire != pb::DTYPE_BF16) return static_cast<const void*>(out.data().data());
  scratch->resize(static_cast<size_t>(rows * hidden));
  DecodeRowsTensor(out, scratch->data());
  return static_cast<const void*>(scratch->data());
}

// A placement given at start, against what the workers loaded: its coverage, and each worker's
// loaded range holding everything it is to serve.
absl::Status CheckPlacement(const Placement& placement, std::span<const ExpertRange> loaded,
                            const ModelConfig& config, const GrpcTransportOptions& options) {
  if (placement.worker_count() != static_cast<int64_t>(loaded.size())) {
    return absl::InvalidArgumentError(absl::StrCat("the placement names ", placement.worker_count(),
                                                   " workers but ", loaded.size(),
                                                   " are connected"));
  }
  if (absl::Status s = placement.CheckCoverage(config.num_hidden_layers, config.num_local_experts);
      !s.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("the placement: ", s.message()));
  }
  for (int32_t w = 0; w < placement.worker_count(); ++w) {
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      for (const ExpertRange& r : placement.Served(l, w)) {
        if (r.empty() || (loaded[w].begin <= r.begin && r.end <= loaded[w].end)) continue;
        return absl::FailedPreconditionError(
            absl::StrCat("the placement has ", WorkerName(options.worker_addresses[w], loaded[w]),
                         " serve experts ", r.ToString(), " in layer ", l,
                         ", which it has not loaded: start it with --experts covering ",
                         placement.Span(w, config.num_hidden_layers).InclusiveSpelling()));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

bool ParseWireDType(std::string_view text, WireDType* out) {
  if (text == "auto") {
    *out = WireDType::kAuto;
  } else if (text == "f32") {
    *out = WireDType::kF32;
  } else if (text == "bf16") {
    *out = WireDType::kBF16;
  } else {
    return false;
  }
  return true;
}

struct GrpcTransport::Worker {
  // Constant after Create.
  int32_t index = 0;  // in options.worker_addresses
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::ExpertWorker::Stub> stub;
  std::thread io_thread;
  std::thread watch_thread;

  // State shown by Workers() and the I/O hand-off: Send sets `job`; the I/O thread clears it,
  // stores result and seconds, and sets `done`.
  mutable absl::Mutex mu;
  bool ready ABSL_GUARDED_BY(mu) = false;
  ExpertRange experts ABSL_GUARDED_BY(mu);
  bool registered ABSL_GUARDED_BY(mu) = false;         // `experts` is fixed from the first connect
  bool draining ABSL_GUARDED_BY(mu) = false;           // its last GetInfo said so
  std::string device ABSL_GUARDED_BY(mu);              // its GetInfo's device
  std::string transport ABSL_GUARDED_BY(mu) = "grpc";  // of the data path: grpc, nccl, memory
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
  // The data path instead of `stream` when a frame channel is open (then `stream` is none).
  std::unique_ptr<FrameChannel> frames;
  std::string frame;  // a serialized request or answer
  // Of its rows and answers (GrpcTransportOptions::wire), set at each connect; written with
  // exchange_mu_ and mu held.
  pb::DType wire = pb::DTYPE_F32;
  pb::ForwardRequest request;
  pb::ForwardResponse response;
  uint64_t request_step = 0;
  int64_t request_rows = 0;
  std::vector<float> wire_rows;  // BF16 wire: the gathered f32 rows, then the widened answer

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
  // A step's message to one worker: at most max_rows_per_step rows (as the worker's cap).
  const int64_t max_message = std::min<int64_t>(
      MaxForwardMessageBytes(config, options.max_rows_per_step), std::numeric_limits<int>::max());
  t->max_message_ = max_message;
  args.SetMaxReceiveMessageSize(static_cast<int>(max_message));
  args.SetMaxSendMessageSize(static_cast<int>(max_message));
  // Keepalive pings notice a dead connection even while no call is running on it (the worker
  // permits them: worker_server.cc).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 2000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 1000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  for (const std::string& address : options.worker_addresses) {
    auto w = std::make_unique<Worker>();
    w->index = static_cast<int32_t>(t->workers_.size());
    w->address = address;
    w->channel = grpc::CreateCustomChannel(
        address, options.credentials ? options.credentials : grpc::InsecureChannelCredentials(),
        args);
    w->stub = pb::ExpertWorker::NewStub(w->channel);
    t->workers_.push_back(std::move(w));
  }
  for (auto& w : t->workers_) {
    MOE_RETURN_IF_ERROR(t->Connect(w.get(), options.connect_timeout));
  }
  std::vector<ExpertRange> hosted;
  for (const WorkerSnapshot& w : t->Workers()) hosted.push_back(w.experts);
  Placement placement;
  if (!options.placement.has_value() && !options.balance_tokens.empty()) {
    absl::StatusOr<Placement> balanced = BalancedPlacement(options.balance_tokens, hosted);
    if (!balanced.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("--placement-from-record: ", balanced.status().message()));
    }
    Placement loaded;
    loaded.workers = hosted;
    LOG(INFO) << "placement from the record: the busiest worker of a layer gets "
              << MeanImbalance(loaded, options.balance_tokens)
              << "x the mean of the recorded tokens with the workers' own ranges, "
              << MeanImbalance(*balanced, options.balance_tokens) << "x with the new placement";
    placement = *std::move(balanced);
  } else if (options.placement.has_value()) {
    placement = *options.placement;
  } else {
    const std::vector<ExpertRange> missing = UncoveredExperts(hosted, config.num_local_experts);
    if (!missing.empty()) {
      const ExpertRange& m = missing.front();
      return absl::FailedPreconditionError(
          absl::StrCat("experts ", m.ToString(),
                       " of every layer are hosted by no worker; start a worker "
                       "with --experts ",
                       m.InclusiveSpelling(), " or widen an existing worker's range"));
    }
    placement.workers = hosted;
  }
  t->dispatch_options_.step_timeout = options.step_timeout;
  t->dispatch_options_.deadline_floor = options.deadline_floor;
  t->dispatch_options_.deadline_factor = options.deadline_factor;
  MOE_RETURN_IF_ERROR(t->SetPlacement(placement));
  for (auto& w : t->workers_) {
    Worker* raw = w.get();
    raw->io_thread = std::thread([t = t.get(), raw] { t->IoLoop(raw); });
    raw->watch_thread = std::thread([t = t.get(), raw] { t->WatchLoop(raw); });
  }
  return t;
}

GrpcTransport::~GrpcTransport() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
  }
  for (auto& w : workers_) {
    if (w->watch_thread.joinable()) w->watch_thread.join();
  }
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
  if (w->frames != nullptr) {
    w->frames->Abort();
    w->frames.reset();
  }
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
  if (info.max_rows() > 0 && info.max_rows() < options_.max_rows_per_step) {
    return absl::FailedPreconditionError(
        absl::StrCat(who, " accepts at most ", info.max_rows(),
                     " rows per request (its --max-forward-rows) but a step can send it ",
                     options_.max_rows_per_step,
                     " (--max-step-tokens x experts per token): raise the worker's flag or lower "
                     "--max-step-tokens"));
  }
  {
    absl::MutexLock lock(&w->mu);
    if (w->registered && experts != w->experts) {
      // The placement (and with it the combine order) is fixed for the coordinator's life.
      return absl::FailedPreconditionError(absl::StrCat(
          who, " came back hosting experts ", experts.ToString(), " but joined with ",
          w->experts.ToString(), ": restart it with --experts ", w->experts.InclusiveSpelling(),
          ", or restart the coordinator to change the placement"));
    }
  }
  std::unique_ptr<FrameChannel> frames;
  if (options_.channels != nullptr &&
      options_.channels->Accepts({info.channels().begin(), info.channels().end()})) {
    frames = OpenChannel(w, timeout);
  }
  const bool bf16 =
      options_.wire == WireDType::kBF16 ||
      (options_.wire == WireDType::kAuto &&
       (frames != nullptr ? options_.channels->Bf16ByDefault() : !IsLoopbackAddress(w->address)));
  auto context = std::make_unique<grpc::ClientContext>();
  {
    absl::MutexLock exchange(&exchange_mu_);
    CloseStream(w);
    if (frames != nullptr) {
      w->frames = std::move(frames);
    } else {
      w->stream = w->stub->Forward(context.get());
      w->context = std::move(context);
      w->stream_finished = false;
    }
    absl::MutexLock lock(&w->mu);
    w->wire = bf16 ? pb::DTYPE_BF16 : pb::DTYPE_F32;
    w->experts = experts;
    w->registered = true;
    w->draining = info.draining();
    w->device = info.device();
    w->transport = w->frames != nullptr ? w->frames->kind() : "grpc";
    w->ready = true;
    w->message.clear();
  }
  LOG(INFO) << "connected to " << w->Name();
  NotifyHealth();
  return absl::OkStatus();
}

std::unique_ptr<FrameChannel> GrpcTransport::OpenChannel(Worker* w, absl::Duration timeout) {
  auto ask_worker = [&](const ChannelRequest& r) {
    pb::OpenChannelRequest request;
    request.set_kind(r.kind);
    request.set_nccl_unique_id(r.nccl_unique_id);
    request.set_memory_name(r.memory_name);
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    pb::OpenChannelResponse response;
    grpc::Status s = w->stub->OpenChannel(&ctx, request, &response);
    return s.ok() ? absl::OkStatus() : FromGrpcStatus(s);
  };
  absl::StatusOr<std::unique_ptr<FrameChannel>> frames = options_.channels->Open(ask_worker);
  if (!frames.ok()) {
    LOG(WARNING) << "expert worker " << w->address << ": no " << options_.channels->kind()
                 << " channel (" << frames.status() << "); its rows go over gRPC";
    return nullptr;
  }
  return std::move(*frames);
}

void GrpcTransport::MarkDown(int32_t index, const std::string& why) {
  Worker* w = workers_[index].get();
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

bool GrpcTransport::Probe(Worker* w) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.health_check_timeout));
  pb::WorkerInfo info;
  if (!w->stub->GetInfo(&ctx, pb::GetInfoRequest(), &info).ok()) return false;
  bool was;
  {
    absl::MutexLock lock(&w->mu);
    was = w->draining;
    w->draining = info.draining();
  }
  if (info.draining() && !was) {
    LOG(INFO) << w->Name() << " is draining: its rows go to replicas where there are";
  }
  return true;
}

void GrpcTransport::WatchLoop(Worker* w) {
  int missed = 0;
  while (true) {
    {
      // After a missed probe the next one follows at once, so a hung worker is marked down
      // within interval + 2 x timeout.
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&shutdown_),
                           missed > 0 ? absl::ZeroDuration() : options_.reconnect_interval);
      if (shutdown_) return;
    }
    bool ready;
    {
      absl::MutexLock lock(&w->mu);
      ready = w->ready;
    }
    if (ready) {
      missed = Probe(w) ? 0 : missed + 1;
      if (missed >= 2) {
        MarkDown(w->index,
                 absl::StrCat("missed 2 health checks (",
                              absl::FormatDuration(options_.health_check_timeout), " each)"));
        missed = 0;
      }
      continue;
    }
    absl::Status s = Connect(w, 2 * options_.health_check_timeout);
    if (!s.ok()) {
      absl::MutexLock lock(&w->mu);
      w->message = std::string(s.message());
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
    if (w->frames != nullptr) {
      // One frame each way; a failed channel stays failed (aborted) until the worker reconnects.
      w->request.SerializeToString(&w->frame);
      result = w->frames->Send(w->frame);
      if (result.ok()) result = w->frames->Receive(max_message_, &w->frame);
      if (result.ok() && !w->response.ParseFromString(w->frame)) {
        result = absl::InternalError("answered a frame that is not a ForwardResponse");
      }
      if (!result.ok()) w->frames->Abort();
    } else if (!w->stream->Write(w->request) || !w->stream->Read(&w->response)) {
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
  return dispatcher_->Exchange(layer, routing, x, out, &links_);
}

bool GrpcTransport::Links::Ready(int32_t index) {
  Worker* w = t_->workers_[index].get();
  absl::MutexLock lock(&w->mu);
  return w->ready;
}

void GrpcTransport::Links::Start(int32_t index, int64_t layer, const DispatchRows& rows,
                                 const float* x) {
  Worker* w = t_->workers_[index].get();
  t_->exchange_mu_.AssertHeld();
  w->request_step = ++t_->step_;
  w->request_rows = rows.rows();
  EncodeRequest(w->request_step, layer, rows, x, t_->config_.hidden_size, w->wire, &w->wire_rows,
                &w->request);
  absl::MutexLock lock(&w->mu);
  w->job = true;
  w->done = false;
}

bool GrpcTransport::Links::Wait(int32_t index, absl::Time deadline) {
  Worker* w = t_->workers_[index].get();
  const bool done = w->mu.LockWhenWithDeadline(absl::Condition(&w->done), deadline);
  w->mu.Unlock();
  return done;
}

void GrpcTransport::Links::Abandon(int32_t index) {
  Worker* w = t_->workers_[index].get();
  // Cancelling unblocks the I/O thread's Read (aborting, its channel's Receive). A cancelled
  // stream is unusable even if the answer slipped in: the worker reconnects with a new one.
  if (w->frames != nullptr) {
    w->frames->Abort();
  } else {
    w->context->TryCancel();
  }
  absl::MutexLock lock(&w->mu);
  w->mu.Await(absl::Condition(&w->done));
}

absl::StatusOr<const void*> GrpcTransport::Links::Answer(int32_t index, DispatchReport* report) {
  Worker* w = t_->workers_[index].get();
  {
    absl::MutexLock lock(&w->mu);
    MOE_RETURN_IF_ERROR(w->result);
    report->seconds = w->seconds;
  }
  return CheckResponse(w->response, w->request_step, w->request_rows, t_->config_.hidden_size,
                       w->wire, &w->wire_rows);
}

void GrpcTransport::Links::MessageSizes(int32_t index, DispatchReport* report) {
  Worker* w = t_->workers_[index].get();
  report->bytes_sent = static_cast<int64_t>(w->request.ByteSizeLong());
  report->bytes_received = static_cast<int64_t>(w->response.ByteSizeLong());
}

std::string GrpcTransport::Links::Name(int32_t index) { return t_->workers_[index]->Name(); }

bool GrpcTransport::Links::Draining(int32_t index) {
  Worker* w = t_->workers_[index].get();
  absl::MutexLock lock(&w->mu);
  return w->draining;
}

std::string GrpcTransport::Links::DownReason(int32_t index) {
  Worker* w = t_->workers_[index].get();
  absl::MutexLock lock(&w->mu);
  return w->ready ? "" : w->message;
}

std::vector<WorkerSnapshot> GrpcTransport::Workers() const {
  std::vector<std::vector<std::vector<ExpertRange>>> layers;
  {
    absl::MutexLock lock(&placement_mu_);
    layers = placement_.layers;
  }
  std::vector<WorkerSnapshot> out;
  for (const auto& w : workers_) {
    absl::MutexLock lock(&w->mu);
    out.push_back({w->address,
                   w->ready,
                   w->experts,
                   w->message,
                   w->draining,
                   w->device.empty() ? "cpu" : w->device,
                   absl::StrCat(w->transport, w->wire == pb::DTYPE_BF16 ? "/bf16" : "/f32"),
                   {}});
    for (const auto& layer : layers) out.back().layers.push_back(layer[w->index]);
  }
  return out;
}

Placement GrpcTransport::placement() const {
  absl::MutexLock lock(&placement_mu_);
  return placement_;
}

absl::Status GrpcTransport::SetPlacement(const Placement& placement) {
  std::vector<ExpertRange> loaded;
  for (const auto& w : workers_) {
    absl::MutexLock lock(&w->mu);
    loaded.push_back(w->experts);
  }
  MOE_RETURN_IF_ERROR(CheckPlacement(placement, loaded, config_, options_));
  auto dispatcher =
      std::make_unique<Dispatcher>(placement, config_.num_hidden_layers, config_.num_local_experts,
                                   config_.hidden_size, dispatch_options_);
  {
    absl::MutexLock exchange(&exchange_mu_);  // between two exchanges
    dispatcher->set_observer(observer_);
    dispatcher_ = std::move(dispatcher);
    absl::MutexLock lock(&placement_mu_);
    placement_ = placement;
  }
  NotifyHealth();
  return absl::OkStatus();
}

bool GrpcTransport::AllExpertsServed() const {
  return moe::AllExpertsServed(Workers(), config_.num_local_experts);
}

bool GrpcTransport::Serving() const {
  return ClusterServing(Workers(), config_.num_local_experts, config_.num_experts_per_tok,
                        options_.on_expert_loss);
}

bool GrpcTransport::LiveExperts(int64_t layer, std::vector<char>* live) {
  absl::MutexLock exchange(&exchange_mu_);
  return dispatcher_->LiveExperts(layer, &links_, live);
}

void GrpcTransport::set_on_health_change(std::function<void(bool)> callback) {
  absl::MutexLock lock(&mu_);
  on_health_change_ = std::move(callback);
}

void GrpcTransport::set_dispatch_observer(DispatchObserver* observer) {
  absl::MutexLock lock(&exchange_mu_);
  observer_ = observer;
  dispatcher_->set_observer(observer);
}

void GrpcTransport::NotifyHealth() {
  std::function<void(bool)> callback;
  {
    absl::MutexLock lock(&mu_);
    callback = on_health_change_;
  }
  if (callback) callback(Serving());
}

}  // namespace moe
