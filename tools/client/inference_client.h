// A small client for the public Inference API, used by moe-cli, the benchmarks and the
// integration tests.
#ifndef MOE_TOOLS_CLIENT_INFERENCE_CLIENT_H_
#define MOE_TOOLS_CLIENT_INFERENCE_CLIENT_H_

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "moecluster/v1/inference.grpc.pb.h"

namespace moe {

struct ClientResult {
  std::vector<int32_t> tokens;
  std::string text;  // concatenated deltas
  moecluster::v1::Final final;
  std::vector<moecluster::v1::TokenRoute> routing;
};

// Thread-safety: all methods may be called concurrently.
class InferenceClient {
 public:
  // `api_token`: sent as "authorization: Bearer <token>" on every call (empty: none).
  // `credentials`: TLS (ChannelCredentials in common/rpc/tls.h); null for plaintext.
  explicit InferenceClient(const std::string& address, const std::string& api_token = "",
                           std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

  // Streams a generation; `on_delta` (optional) sees each TokenDelta as it arrives. Returns the
  // server's status (e.g. INVALID_ARGUMENT, UNAVAILABLE) if the stream ends with an error.
  // `context_hook` (optional) may keep the ClientContext to cancel the call from another thread.
  absl::StatusOr<ClientResult> Generate(
      const moecluster::v1::GenerateRequest& request,
      const std::function<void(const moecluster::v1::TokenDelta&)>& on_delta = nullptr,
      const std::function<void(grpc::ClientContext*)>& context_hook = nullptr);

  absl::StatusOr<moecluster::v1::ClusterStatus> GetClusterStatus();
  absl::StatusOr<moecluster::v1::ModelInfo> GetModelInfo();
  // grpc.health.v1 status of the server ("" = overall): SERVING -> true.
  absl::StatusOr<bool> IsServing();
  // Watches grpc.health.v1 until the server reports SERVING (want = true) or anything else
  // (want = false). DEADLINE_EXCEEDED after `timeout`.
  absl::Status WaitForHealth(bool want, absl::Duration timeout);
  // Waits until the channel is connected (or the deadline passes).
  bool WaitForConnected(absl::Duration timeout);

 private:
  void Prepare(grpc::ClientContext* context) const;

  std::string api_token_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<moecluster::v1::Inference::Stub> stub_;
};

// Human-readable cluster table: workers (address, state, experts) and tokens per layer and
// expert with each expert's share.
std::string FormatClusterStatus(const moecluster::v1::ClusterStatus& status);

}  // namespace moe

#endif  // MOE_TOOLS_CLIENT_INFERENCE_CLIENT_H_
