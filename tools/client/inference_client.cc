#include "tools/client/inference_client.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/rpc/rpc_util.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace moe {

namespace pb = moecluster::v1;

InferenceClient::InferenceClient(const std::string& address, const std::string& api_token,
                                 std::shared_ptr<grpc::ChannelCredentials> credentials)
    : api_token_(api_token),
      channel_(grpc::CreateChannel(
          address, credentials != nullptr ? credentials : grpc::InsecureChannelCredentials())),
      stub_(pb::Inference::NewStub(channel_)) {}

void InferenceClient::Prepare(grpc::ClientContext* context) const {
  if (!api_token_.empty()) context->AddMetadata("authorization", "Bearer " + api_token_);
}

absl::StatusOr<ClientResult> InferenceClient::Generate(
    const pb::GenerateRequest& request, const std::function<void(const pb::TokenDelta&)>& on_delta,
    const std::function<void(grpc::ClientContext*)>& context_hook) {
  grpc::ClientContext context;
  Prepare(&context);
  if (context_hook) context_hook(&context);
  auto reader = stub_->Generate(&context, request);
  ClientResult result;
  pb::GenerateResponse response;
  while (reader->Read(&response)) {
    if (response.has_delta()) {
      const pb::TokenDelta& d = response.delta();
      result.tokens.insert(result.tokens.end(), d.token_ids().begin(), d.token_ids().end());
      result.text += d.text();
      result.routing.insert(result.routing.end(), d.routing().begin(), d.routing().end());
      if (on_delta) on_delta(d);
    } else if (response.has_final()) {
      result.final = response.final();
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return FromGrpcStatus(status);
  return result;
}

absl::StatusOr<pb::ClusterStatus> InferenceClient::GetClusterStatus() {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  Prepare(&context);
  pb::ClusterStatus status;
  grpc::Status s = stub_->GetClusterStatus(&context, pb::GetClusterStatusRequest(), &status);
  if (!s.ok()) return FromGrpcStatus(s);
  return status;
}

absl::StatusOr<pb::ModelInfo> InferenceClient::GetModelInfo() {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  Prepare(&context);
  pb::ModelInfo info;
  grpc::Status s = stub_->GetModelInfo(&context, pb::GetModelInfoRequest(), &info);
  if (!s.ok()) return FromGrpcStatus(s);
  return info;
}

absl::StatusOr<bool> InferenceClient::IsServing() {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status s = health->Check(&context, grpc::health::v1::HealthCheckRequest(), &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

absl::Status InferenceClient::WaitForHealth(bool want, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  auto health = grpc::health::v1::Health::NewStub(channel_);
  // Watch streams every status change; it ends when the server goes away, so re-watch.
  while (absl::Now() < deadline) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(deadline));
    context.set_wait_for_ready(true);
    auto reader = health->Watch(&context, grpc::health::v1::HealthCheckRequest());
    grpc::health::v1::HealthCheckResponse response;
    while (reader->Read(&response)) {
      const bool serving = response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
      if (serving == want) {
        context.TryCancel();
        reader->Finish().ok();
        return absl::OkStatus();
      }
    }
    reader->Finish().ok();
  }
  return absl::DeadlineExceededError(want ? "server did not become SERVING in time"
                                          : "server did not stop SERVING in time");
}

bool InferenceClient::WaitForConnected(absl::Duration timeout) {
  return channel_->WaitForConnected(absl::ToChronoTime(absl::Now() + timeout));
}

std::string FormatClusterStatus(const pb::ClusterStatus& status) {
  std::string out = absl::StrFormat(
      "cluster: %s, %d running, %d waiting, KV cache %.1f%% used\n",
      !status.serving()   ? "NOT SERVING"
      : status.degraded() ? "SERVING (degraded: some experts lost, rerouted)"
                          : "SERVING",
      status.running_requests(), status.waiting_requests(), 100 * status.kv_cache_usage());
  absl::StrAppendFormat(&out, "%-24s %-12s %-10s %-10s %s\n", "worker", "state", "experts",
                        "transport", "device");
  for (const pb::WorkerStatus& w : status.workers()) {
    absl::StrAppendFormat(&out, "%-24s %-12s %-10s %-10s %s%s%s\n", w.address(),
                          w.state() == pb::WORKER_STATE_READY      ? "ready"
                          : w.state() == pb::WORKER_STATE_DRAINING ? "draining"
                                                                   : "UNAVAILABLE",
                          absl::StrFormat("[%d, %d)", w.expert_begin(), w.expert_end()),
                          w.transport(), w.device(), w.message().empty() ? "" : " ", w.message());
  }
  if (status.load().empty()) return out;
  out += "\ntokens routed per layer and expert (share of the layer's routed tokens):\n";
  absl::StrAppendFormat(&out, "%-6s", "layer");
  for (int e = 0; e < status.load(0).tokens_size(); ++e)
    absl::StrAppendFormat(&out, " %9s", absl::StrCat("e", e));
  out += "\n";
  for (const pb::ExpertLoad& l : status.load()) {
    uint64_t total = 0;
    for (uint64_t t : l.tokens()) total += t;
    absl::StrAppendFormat(&out, "%-6d", l.layer());
    for (uint64_t t : l.tokens()) {
      absl::StrAppendFormat(&out, " %4d %3.0f%%", t, total ? 100.0 * t / total : 0.0);
    }
    out += "\n";
  }
  return out;
}

}  // namespace moe
