// Glue shared by the gRPC services of the coordinator and the expert worker: status conversion,
// tensors on the wire, and listen-address checks.
#ifndef MOE_COMMON_RPC_RPC_UTIL_H_
#define MOE_COMMON_RPC_RPC_UTIL_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/model_config.h"
#include "grpcpp/grpcpp.h"
#include "moecluster/v1/expert.pb.h"

namespace moe {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

moecluster::v1::DType ToProtoDType(DType dtype);

// Rows of activations on the Forward wire: F32, or BF16 (half the bytes; values rounded to
// nearest even, --wire-dtype bf16).
// Fills `out` with the [rows, cols] f32 `data` as a tensor of `dtype` (DTYPE_F32 or DTYPE_BF16).
void EncodeRowsTensor(const float* data, int64_t rows, int64_t cols, moecluster::v1::DType dtype,
                      moecluster::v1::Tensor* out);

// Checks that `t` is an F32 or BF16 tensor of shape [rows, cols] whose byte length is rows *
// cols * its element size (every field untrusted); `what` names it in errors.
absl::Status CheckRowsTensor(const moecluster::v1::Tensor& t, int64_t rows, int64_t cols,
                             const char* what);
// The values of a tensor CheckRowsTensor accepted, as f32 (BF16 widens exactly) into `out`
// (t's element count).
void DecodeRowsTensor(const moecluster::v1::Tensor& t, float* out);

// The largest Forward message (request or response) for `rows` rows of a model: the hidden
// rows in f32, up to routed_experts_per_token (expert, weight) pairs and an offset per row, and
// 64 KiB of framing. The worker's and the coordinator's gRPC message caps, so they agree.
int64_t MaxForwardMessageBytes(const ModelConfig& config, int64_t rows);
// A worker's gRPC memory quota for Forward messages of at most max_message bytes: room for a
// few of them in and out, and the most it buffers of one message however large it claims to be.
int64_t WorkerMemoryQuotaBytes(int64_t max_message);

// Parses "HOST:PORT" (PORT may be 0). INVALID_ARGUMENT naming the flag otherwise.
absl::Status ValidateListenAddress(const std::string& address, const char* flag);
// Whether HOST:PORT binds only the loopback interface (localhost, 127.x.y.z, [::1]).
bool IsLoopbackAddress(const std::string& address);
// Logs a warning when `address` (given with --`flag`) is reachable from other hosts: the
// traffic is plaintext (call it only without TLS). `advice` says how to restrict who gets in.
void WarnIfExposed(const std::string& address, const char* flag, const char* advice);

}  // namespace moe

#endif  // MOE_COMMON_RPC_RPC_UTIL_H_
