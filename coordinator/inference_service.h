// gRPC glue for the public Inference API: proto -> plain structs -> Scheduler -> proto.
#ifndef MOE_COORDINATOR_INFERENCE_SERVICE_H_
#define MOE_COORDINATOR_INFERENCE_SERVICE_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/api_tokens.h"
#include "common/tokenizer.h"
#include "coordinator/client_limit.h"
#include "coordinator/expert_load.h"
#include "coordinator/scheduler.h"
#include "coordinator/transport/dispatch.h"
#include "moecluster/v1/inference.grpc.pb.h"

namespace moe {

// What the service reads; every pointer must outlive the service.
struct InferenceServiceDeps {
  Scheduler* scheduler = nullptr;
  const Tokenizer* tokenizer = nullptr;
  const ModelConfig* config = nullptr;  // the engine's (experts per token as routed)
  int64_t model_experts_per_token = 0;  // the checkpoint's
  const ExpertLoadCounter* expert_load = nullptr;
  std::string dtype;        // of the checkpoint's matrices
  std::string fingerprint;  // of the checkpoint
  // The expert workers as they stand now.
  std::function<std::vector<WorkerSnapshot>()> workers;
  int64_t default_max_tokens = 64;
  // Called for each Generate refused before it was queued (metrics); may be empty.
  std::function<void()> on_rejected;
  // Non-null: every call needs the metadata "authorization: Bearer <token>" (else
  // UNAUTHENTICATED). grpc.health.v1 stays open.
  const ApiTokens* api_tokens = nullptr;
  // Text prompts longer than this are refused before they are tokenized (MaxPromptBytes);
  // 0: no bound.
  size_t max_prompt_bytes = 0;
  ExpertLossPolicy on_expert_loss = ExpertLossPolicy::kFail;  // what `serving` means
  // Bounds the Generate streams one client host holds open (RESOURCE_EXHAUSTED beyond), shared
  // with the HTTP API; null: no bound.
  ClientLimit* client_limit = nullptr;
};

// Converts a public request to the scheduler's form (text prompts tokenized, unset fields
// defaulted). It checks nothing: the scheduler validates every request once
// (ValidateGenerationRequest: INVALID_ARGUMENT naming the parameter).
GenerationRequest FromProto(const moecluster::v1::GenerateRequest& request,
                            const Tokenizer& tokenizer, int64_t default_max_tokens);

// Thread-safety: handlers run concurrently on gRPC's threads.
class InferenceService final : public moecluster::v1::Inference::Service {
 public:
  explicit InferenceService(const InferenceServiceDeps& deps) : deps_(deps) {}

  grpc::Status Generate(grpc::ServerContext* context,
                        const moecluster::v1::GenerateRequest* request,
                        grpc::ServerWriter<moecluster::v1::GenerateResponse>* writer) override;
  grpc::Status Tokenize(grpc::ServerContext* context,
                        const moecluster::v1::TokenizeRequest* request,
                        moecluster::v1::TokenizeResponse* response) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context,
                            const moecluster::v1::GetModelInfoRequest* request,
                            moecluster::v1::ModelInfo* response) override;
  grpc::Status GetClusterStatus(grpc::ServerContext* context,
                                const moecluster::v1::GetClusterStatusRequest* request,
                                moecluster::v1::ClusterStatus* response) override;

 private:
  // OK, or UNAUTHENTICATED when a token is required and `context` lacks it.
  grpc::Status Authorize(const grpc::ServerContext* context) const;
  // OK, or INVALID_ARGUMENT for a text the tokenizer must not see (too long, not UTF-8).
  grpc::Status CheckText(const std::string& text, const char* field) const;

  InferenceServiceDeps deps_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_INFERENCE_SERVICE_H_
