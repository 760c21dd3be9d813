#include "coordinator/coordinator_server.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/compute_backend.h"
#include "common/nccl_channel.h"
#include "common/rpc/rpc_util.h"
#include "common/status_macros.h"
#include "coordinator/placement.h"
#include "glog/logging.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace moe {
namespace {

// --nccl-device: a CUDA device, in a build whose NCCL works (checked now, not at the first worker).
absl::StatusOr<std::shared_ptr<ChannelFactory>> NcclFactoryFor(const std::string& spelled) {
  absl::StatusOr<DeviceSpec> device = ParseDevice(spelled);
  if (!device.ok() || device->kind != DeviceSpec::Kind::kCuda) {
    return absl::InvalidArgumentError(
        absl::StrCat("--nccl-device must be cuda or cuda:N, not '", spelled, "'"));
  }
  if (absl::StatusOr<std::string> id = NewNcclUniqueId(); !id.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("--nccl-device ", spelled, ": ", id.status().message()));
  }
  return std::shared_ptr<ChannelFactory>(NcclChannelFactory(device->index));
}

}  // namespace

namespace {
constexpr char kServiceName[] = "moecluster.v1.Inference";
}  // namespace

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Create(
    const CoordinatorOptions& options) {
  MOE_RETURN_IF_ERROR(ValidateListenAddress(options.listen, "listen"));
  if (!options.metrics_listen.empty()) {
    MOE_RETURN_IF_ERROR(ValidateListenAddress(options.metrics_listen, "metrics-listen"));
  }
  if (!options.http_listen.empty()) {
    MOE_RETURN_IF_ERROR(ValidateListenAddress(options.http_listen, "http-listen"));
  }
  MOE_RETURN_IF_ERROR(ValidateSchedulerOptions(options.scheduler));
  std::unique_ptr<CoordinatorServer> server(new CoordinatorServer());
  MOE_RETURN_IF_ERROR(server->Start(options));
  return server;
}

absl::Status CoordinatorServer::Start(const CoordinatorOptions& options) {
  LocalModelOptions model_options;
  model_options.model_dir = options.model_dir;
  model_options.in_process_workers = options.in_process_workers;
  model_options.quantize = options.quantize;
  model_options.engine = options.engine;
  if (!options.workers.empty() || !options.placement_file.empty()) {
    model_options.transport_factory =
        [&](const Checkpoint& checkpoint) -> absl::StatusOr<std::unique_ptr<ExpertTransport>> {
      GrpcTransportOptions t;
      t.worker_addresses = options.workers;
      if (!options.placement_file.empty()) {
        MOE_ASSIGN_OR_RETURN(PlacementFile file,
                             LoadPlacementFile(options.placement_file, checkpoint.config()));
        t.worker_addresses = file.addresses;
        t.placement = std::move(file.placement);
      }
      if (!options.placement_record.empty()) {
        MOE_ASSIGN_OR_RETURN(t.balance_tokens,
                             LoadExpertRecord(options.placement_record, checkpoint.config()));
      }
      t.model_fingerprint = checkpoint.fingerprint();
      t.connect_timeout = options.worker_connect_timeout;
      t.step_timeout = options.step_timeout;
      t.deadline_floor = options.failover_deadline_floor;
      t.deadline_factor = options.failover_deadline_factor;
      t.health_check_timeout = options.health_check_timeout;
      t.on_expert_loss = options.engine.on_expert_loss;
      t.wire = options.wire_dtype;
      if (!options.nccl_device.empty()) {
        MOE_ASSIGN_OR_RETURN(t.channels, NcclFactoryFor(options.nccl_device));
      }
      // A step holds up to --max-step-tokens rows, or one whole prompt when it is longer (up
      // to the context) beside the running decodes; each row goes to a worker at most once
      // per expert.
      const ModelConfig& mc = checkpoint.config();
      t.max_rows_per_step =
          (std::max<int64_t>(options.scheduler.max_step_tokens, mc.max_position_embeddings) +
           options.scheduler.max_running) *
          mc.routed_experts_per_token();
      if (!options.tls.ca.empty()) {
        if (options.tls.cert.empty()) {
          return absl::InvalidArgumentError(
              "--tls-ca turns on mTLS to the workers, which need the coordinator's client "
              "certificate: give --tls-cert and --tls-key too");
        }
        MOE_ASSIGN_OR_RETURN(t.credentials, ChannelCredentials(options.tls));
      }
      MOE_ASSIGN_OR_RETURN(std::unique_ptr<GrpcTransport> transport,
                           GrpcTransport::Create(checkpoint.config(), t));
      grpc_transport_ = transport.get();
      return transport;
    };
  }
  if (!options.api_token_file.empty()) {
    MOE_ASSIGN_OR_RETURN(api_tokens_, ApiTokens::Load(options.api_token_file));
  }
  MOE_ASSIGN_OR_RETURN(model_, LocalModel::Create(model_options));
  const ModelConfig& c = model_->config();
  expert_load_ = std::make_unique<ExpertLoadCounter>(c.num_hidden_layers, c.num_local_experts);
  model_->engine()->AddRoutingObserver(expert_load_.get());
  if (grpc_transport_ != nullptr && options.rebalance.interval > absl::ZeroDuration()) {
    rebalancer_ =
        std::make_unique<Rebalancer>(grpc_transport_, expert_load_.get(), options.rebalance);
  }
  scheduler_ =
      std::make_unique<Scheduler>(model_->engine(), model_->tokenizer(), options.scheduler);
  const int64_t experts = c.num_local_experts;
  GrpcTransport* transport = grpc_transport_;
  auto workers = [transport, experts]() {
    if (transport != nullptr) return transport->Workers();
    return std::vector<WorkerSnapshot>{
        {"in-process", true, {0, experts}, "", false, "cpu", "in-process", {}}};
  };
  if (!options.metrics_listen.empty()) {
    Scheduler* scheduler = scheduler_.get();
    metrics_ = std::make_unique<CoordinatorMetrics>(
        c, CoordinatorMetrics::Sources{[scheduler]() { return scheduler->stats(); }, workers});
    CoordinatorMetrics* metrics = metrics_.get();
    expert_load_->set_step_listener(
        [metrics](bool ok, std::span<const uint64_t> counts, std::span<const uint64_t> degraded) {
          metrics->OnStepEnd(ok, counts, degraded);
        });
    scheduler_->set_observer(metrics);
    if (transport != nullptr) transport->set_dispatch_observer(metrics);
    MOE_ASSIGN_OR_RETURN(metrics_server_,
                         MetricsServer::Start(options.metrics_listen, {metrics_->collectable()}));
  }

  InferenceServiceDeps deps;
  deps.scheduler = scheduler_.get();
  deps.tokenizer = model_->tokenizer();
  deps.config = &model_->engine()->config();  // with --experts-per-token applied
  deps.expert_load = expert_load_.get();
  deps.dtype = std::string(DTypeName(model_->weights().dtype()));
  deps.model_experts_per_token = model_->config().num_experts_per_tok;
  deps.fingerprint = model_->checkpoint().fingerprint();
  deps.workers = workers;
  deps.api_tokens = api_tokens_ ? &*api_tokens_ : nullptr;
  deps.max_prompt_bytes = MaxPromptBytes(*model_->tokenizer(), c.max_position_embeddings);
  deps.on_expert_loss = options.engine.on_expert_loss;
  client_limit_ = std::make_unique<ClientLimit>(options.max_streams_per_client);
  deps.client_limit = client_limit_.get();
  if (metrics_ != nullptr) {
    CoordinatorMetrics* metrics = metrics_.get();
    deps.on_rejected = [metrics]() { metrics->OnRejected(); };
  }
  service_ = std::make_unique<InferenceService>(deps);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!options.tls.cert.empty()) {
    MOE_ASSIGN_OR_RETURN(credentials, ServerCredentials({options.tls.cert, options.tls.key, ""},
                                                        /*require_client_cert=*/false));
  }
  builder.AddListeningPort(options.listen, credentials, &port);
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(64 << 20);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen, " (address in use or not local?)"));
  }
  address_ = absl::StrCat(options.listen.substr(0, options.listen.rfind(':')), ":", port);
  if (grpc_transport_ != nullptr) {
    grpc_transport_->set_on_health_change([this](bool serving) { SetHealth(serving); });
    SetHealth(grpc_transport_->Serving());
  } else {
    SetHealth(true);
  }
  scheduler_->Start();
  const KvCache& kv = model_->engine()->kv_cache();
  const double context_blocks =
      std::ceil(static_cast<double>(c.max_position_embeddings) / kv.block_size());
  LOG(INFO) << "KV cache: " << kv.num_blocks() << " blocks of " << kv.block_size()
            << " tokens, room for " << kv.num_blocks() / context_blocks << " full contexts of "
            << c.max_position_embeddings << " tokens (--max-running "
            << options.scheduler.max_running
            << "; sequences beyond it are preempted, never failed)";
  if (!options.http_listen.empty()) MOE_RETURN_IF_ERROR(StartHttp(options));
  LOG(INFO) << "coordinator serving " << options.model_dir << " on " << address_ << " with "
            << (options.workers.empty() ? std::string("in-process experts")
                                        : absl::StrCat(options.workers.size(), " expert workers"));
  return absl::OkStatus();
}

absl::Status CoordinatorServer::StartHttp(const CoordinatorOptions& options) {
  OpenAiApiDeps deps;
  deps.scheduler = scheduler_.get();
  deps.tokenizer = model_->tokenizer();
  deps.config = &model_->engine()->config();  // with --experts-per-token applied
  deps.model_name = options.served_model_name;
  if (deps.model_name.empty()) {
    std::string path = options.model_dir;
    while (path.size() > 1 && path.back() == '/') path.pop_back();
    deps.model_name = path.substr(path.rfind('/') + 1);
  }
  deps.max_sequences_per_request = std::max<int64_t>(options.scheduler.max_waiting, 1);
  deps.api_tokens = api_tokens_ ? &*api_tokens_ : nullptr;
  deps.client_limit = client_limit_.get();
  absl::StatusOr<std::string> source = options.chat_template_file.empty()
                                           ? model_->checkpoint().ChatTemplateSource()
                                           : ChatTemplate::ReadFile(options.chat_template_file);
  if (source.ok()) {
    absl::StatusOr<std::unique_ptr<ChatTemplate>> parsed = ChatTemplate::Parse(*source);
    if (parsed.ok()) {
      chat_template_ = std::move(*parsed);
      deps.chat_template = chat_template_.get();
      deps.chat_template_source = *source;
    } else if (!options.chat_template_file.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--chat-template ", options.chat_template_file,
                                                     ": ", parsed.status().message()));
    } else {
      LOG(WARNING) << "the model's chat template does not parse (" << parsed.status().message()
                   << "); /v1/chat/completions is off (give one with --chat-template)";
    }
  } else if (!options.chat_template_file.empty() || !absl::IsNotFound(source.status())) {
    return source.status();
  } else {
    LOG(INFO) << "the model has no chat template; /v1/chat/completions is off";
  }
  GrpcTransport* transport = grpc_transport_;
  deps.healthy = [this, transport] {
    return !draining_ && (transport == nullptr || transport->Serving());
  };
  if (metrics_ != nullptr) {
    CoordinatorMetrics* metrics = metrics_.get();
    deps.on_rejected = [metrics]() { metrics->OnRejected(); };
  }
  openai_ = std::make_unique<OpenAiApi>(std::move(deps));
  OpenAiApi* api = openai_.get();
  // HTTPS with the coordinator's certificate when it has one (--tls-cert/--tls-key).
  HttpServerOptions http = options.http;
  http.tls_cert_file = options.tls.cert;
  http.tls_key_file = options.tls.key;
  MOE_ASSIGN_OR_RETURN(http_server_,
                       HttpServer::Start(options.http_listen, http,
                                         [api](const HttpRequest& r) { return api->Handle(r); }));
  return absl::OkStatus();
}

void CoordinatorServer::SetHealth(bool serving) {
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  health->SetServingStatus(serving);
  health->SetServingStatus(kServiceName, serving);
}

bool CoordinatorServer::Drain(absl::Duration timeout) {
  if (server_ == nullptr || shut_down_) return true;
  const absl::Time start = absl::Now();
  draining_ = true;
  if (grpc_transport_ != nullptr) grpc_transport_->set_on_health_change(nullptr);
  SetHealth(false);
  scheduler_->StopAdmitting();
  const Scheduler::Stats open = scheduler_->stats();
  LOG(INFO) << "draining: " << open.running << " running and " << open.waiting
            << " waiting requests get up to " << absl::FormatDuration(timeout) << " to finish";
  const absl::Time deadline = start + timeout;
  bool done = scheduler_->WaitUntilIdle(deadline);
  // Their handlers write the last bytes.
  if (http_server_ != nullptr) done = http_server_->WaitUntilIdle(deadline) && done;
  if (done) {
    LOG(INFO) << "drained in " << absl::FormatDuration(absl::Now() - start);
  } else {
    const Scheduler::Stats left = scheduler_->stats();
    LOG(WARNING) << "drain timeout: " << left.running + left.waiting
                 << " requests did not finish and are cancelled";
  }
  return done;
}

void CoordinatorServer::Shutdown() {
  if (server_ == nullptr || shut_down_) return;
  shut_down_ = true;
  draining_ = true;
  http_server_.reset();  // cancels its requests: the scheduler is still running
  rebalancer_.reset();
  if (grpc_transport_ != nullptr) grpc_transport_->set_on_health_change(nullptr);
  server_->GetHealthCheckService()->Shutdown();
  // The scheduler keeps running while the server stops: calls still open at the deadline are
  // cancelled, their handlers cancel their requests and return.
  server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  metrics_server_.reset();  // scrapes read the scheduler
  scheduler_.reset();       // fails anything left, before the engine it drives goes away
}

void CoordinatorServer::Wait() {
  if (server_ != nullptr) server_->Wait();
}

CoordinatorServer::~CoordinatorServer() { Shutdown(); }

}  // namespace moe
