#include "expert_worker/worker_server.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/checkpoint.h"
#include "common/model_config.h"
#include "common/rpc/rpc_util.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace moe {
namespace {

constexpr std::chrono::milliseconds kShutdownGrace(1000);

}  // namespace

int64_t DefaultMaxForwardRows(const ModelConfig& config) {
  return (std::max<int64_t>(config.max_position_embeddings, 4096) + 1024) *
         config.routed_experts_per_token();
}

absl::StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Create(const WorkerOptions& options) {
  if (options.model_dir.empty()) return absl::InvalidArgumentError("--model is required");
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--threads must be >= 0 (0 = OpenMP default), got ", options.threads));
  }
  MOE_RETURN_IF_ERROR(ValidateListenAddress(options.listen, "listen"));
  if (!options.metrics_listen.empty()) {
    MOE_RETURN_IF_ERROR(ValidateListenAddress(options.metrics_listen, "metrics-listen"));
  }
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<Checkpoint> checkpoint, Checkpoint::Open(options.model_dir));
  const ModelConfig& config = checkpoint->config();
  MOE_ASSIGN_OR_RETURN(ExpertRange range,
                       ResolveExpertRange(options.experts, config.num_local_experts));
  std::unique_ptr<WorkerServer> w(new WorkerServer());
  WeightsOptions weights_options;
  weights_options.load_shared = false;
  weights_options.experts = range;
  weights_options.quantize = options.quantize;
  MOE_ASSIGN_OR_RETURN(w->weights_, checkpoint->LoadWeights(weights_options));
  MOE_ASSIGN_OR_RETURN(w->backend_, CreateComputeBackend(options.device, w->weights_.get()));
  w->fingerprint_ = checkpoint->fingerprint();
  if (!options.metrics_listen.empty()) {
    w->metrics_ = std::make_unique<WorkerMetrics>(config.num_hidden_layers, range);
    MOE_ASSIGN_OR_RETURN(w->metrics_server_, MetricsServer::Start(options.metrics_listen,
                                                                  {w->metrics_->collectable()}));
  }
  const int64_t max_rows =
      options.max_forward_rows > 0 ? options.max_forward_rows : DefaultMaxForwardRows(config);
  if (options.max_forward_rows < 0 || max_rows > (int64_t{1} << 24) || options.max_streams < 1 ||
      options.max_streams > 1024) {
    return absl::InvalidArgumentError(
        "--max-forward-rows must be in [0, 16777216] (0: from the model) and --max-streams in "
        "[1, 1024]");
  }
  const int64_t max_message = MaxForwardMessageBytes(config, max_rows);
  if (max_message > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        max_rows, " rows per request (--max-forward-rows) make a Forward message of ", max_message,
        " bytes, beyond gRPC's 2 GiB: give a smaller --max-forward-rows (and a coordinator "
        "--max-step-tokens to match)"));
  }
  w->service_ = std::make_unique<ExpertService>(w->weights_.get(), w->backend_.get(),
                                                w->fingerprint_, options.threads, max_rows,
                                                options.max_streams, w->metrics_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (options.tls.enabled() &&
      (options.tls.cert.empty() || options.tls.key.empty() || options.tls.ca.empty())) {
    return absl::InvalidArgumentError(
        "a worker's TLS is mutual: give --tls-cert and --tls-key (its certificate) and "
        "--tls-ca (the CA that signs the coordinator's client certificate)");
  }
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                       ServerCredentials(options.tls, /*require_client_cert=*/true));
  builder.AddListeningPort(options.listen, credentials, &w->port_);
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_message));
  builder.SetMaxSendMessageSize(static_cast<int>(max_message));
  // Threads: the streams, GetInfo/health probes and a few spare. Memory: gRPC 1.51 checks the
  // message size only once a message is assembled, but its HTTP/2 flow control shrinks the
  // windows under memory-quota pressure, so an oversized message is refused before the worker
  // has buffered more than the quota (room for a few legitimate messages in and out).
  grpc::ResourceQuota quota("moe-expert-worker");
  quota.SetMaxThreads(options.max_streams + 8);
  quota.Resize(static_cast<size_t>(WorkerMemoryQuotaBytes(max_message)));
  builder.SetResourceQuota(quota);
  // The coordinator's keepalive pings (every 2 s, also between calls) are welcome.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 1000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  builder.RegisterService(w->service_.get());
  w->server_ = builder.BuildAndStart();
  if (w->server_ == nullptr || w->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen, " (address in use or not local?)"));
  }
  const std::string service_name = moecluster::v1::ExpertWorker::service_full_name();
  grpc::HealthCheckServiceInterface* health = w->server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(service_name, true);
  w->address_ = absl::StrCat(options.listen.substr(0, options.listen.rfind(':')), ":", w->port_);
  return w;
}

WorkerServer::~WorkerServer() {
  if (server_ == nullptr) return;  // Create failed after construction
  Shutdown();
  Wait();
}

bool WorkerServer::Drain(absl::Duration timeout) {
  service_->StartDraining();
  server_->GetHealthCheckService()->SetServingStatus(false);
  const absl::Time start = absl::Now();
  // A second without requests: the coordinator probes every 200 ms and then stops choosing
  // this worker where a replica is live.
  const bool quiet = service_->WaitUntilQuiet(absl::Seconds(1), start + timeout);
  if (quiet) {
    LOG(INFO) << "drained: no expert requests for 1s (after "
              << absl::FormatDuration(absl::Now() - start) << ")";
  } else {
    LOG(WARNING) << "drain timeout (" << absl::FormatDuration(timeout)
                 << "): still receiving expert requests (no live replica of these experts?)";
  }
  return quiet;
}

void WorkerServer::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  server_->GetHealthCheckService()->SetServingStatus(false);
  server_->Shutdown(std::chrono::system_clock::now() + kShutdownGrace);
  service_->StopChannels();
}

void WorkerServer::Wait() { server_->Wait(); }

}  // namespace moe
