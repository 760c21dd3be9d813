#include "expert_worker/worker_server.h"

#include <chrono>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/fingerprint.h"
#include "common/model_config.h"
#include "common/rpc/rpc_util.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace moe {
namespace {

constexpr std::chrono::milliseconds kShutdownGrace(1000);

// A non-negative decimal expert id: digits only (no sign, no spaces), at most 9 of them.
bool ParseExpertId(std::string_view s, int64_t* id) {
  if (s.empty() || s.size() > 9) return false;
  for (char c : s) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return absl::SimpleAtoi(std::string(s), id);
}

// The user's inclusive spelling of [begin, end): "5" or "0-40".
std::string InclusiveSpelling(const ExpertRange& r) {
  if (r.end == r.begin + 1) return absl::StrCat(r.begin);
  return absl::StrCat(r.begin, "-", r.end - 1);
}

}  // namespace

absl::StatusOr<ExpertRange> ParseExpertRange(std::string_view spec) {
  if (spec == "all") return ExpertRange{0, -1};
  const auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--experts \"", std::string(spec), "\": ", std::string(why),
        " (expected A-B for the inclusive range A..B, a single expert A, or all)"));
  };
  const size_t dash = spec.find('-');
  int64_t first = 0, last = 0;
  if (dash == std::string_view::npos) {
    if (!ParseExpertId(spec, &first)) return bad("not an expert id");
    return ExpertRange{first, first + 1};
  }
  if (!ParseExpertId(spec.substr(0, dash), &first) ||
      !ParseExpertId(spec.substr(dash + 1), &last)) {
    return bad("not a range of expert ids");
  }
  if (last < first) return bad("the range is reversed");
  return ExpertRange{first, last + 1};
}

absl::StatusOr<ExpertRange> ResolveExpertRange(const ExpertRange& range, int64_t num_experts) {
  ExpertRange r = range;
  if (r.end < 0) r.end = num_experts;
  if (r.begin < 0 || r.begin >= r.end) {
    return absl::InvalidArgumentError(absl::StrCat("the expert range [", r.begin, ", ", r.end,
                                                   ") is empty or negative"));
  }
  if (r.end > num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("--experts ", InclusiveSpelling(r), " is outside the model's ",
                     num_experts, " experts (ids 0-", num_experts - 1, ")"));
  }
  return r;
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
  MOE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(options.model_dir));
  MOE_ASSIGN_OR_RETURN(
      ExpertRange range,
      ResolveExpertRange({options.expert_begin, options.expert_end}, config.num_local_experts));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> opened, TensorStore::Open(options.model_dir));
  std::shared_ptr<TensorStore> store(std::move(opened));

  std::unique_ptr<WorkerServer> w(new WorkerServer());
  WeightsOptions weights_options;
  weights_options.load_shared = false;
  weights_options.expert_begin = range.begin;
  weights_options.expert_end = range.end;
  MOE_ASSIGN_OR_RETURN(w->weights_, ModelWeights::Load(store, config, weights_options));
  w->fingerprint_ = ModelFingerprint(config, *store);
  if (!options.metrics_listen.empty()) {
    w->metrics_ = std::make_unique<WorkerMetrics>(config.num_hidden_layers, range.begin, range.end);
    MOE_ASSIGN_OR_RETURN(w->metrics_server_,
                         MetricsServer::Start(options.metrics_listen, {w->metrics_->collectable()}));
  }
  w->service_ = std::make_unique<ExpertService>(w->weights_.get(), w->fingerprint_, options.threads,
                                                w->metrics_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &w->port_);
  builder.SetMaxReceiveMessageSize(kMaxWorkerMessageBytes);
  builder.SetMaxSendMessageSize(kMaxWorkerMessageBytes);
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
  w->address_ =
      absl::StrCat(options.listen.substr(0, options.listen.rfind(':')), ":", w->port_);
  return w;
}

WorkerServer::~WorkerServer() {
  if (server_ == nullptr) return;  // Create failed after construction
  Shutdown();
  Wait();
}

void WorkerServer::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  server_->GetHealthCheckService()->SetServingStatus(false);
  server_->Shutdown(std::chrono::system_clock::now() + kShutdownGrace);
}

void WorkerServer::Wait() { server_->Wait(); }

}  // namespace moe
