#include "common/rpc/rpc_util.h"

#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "glog/logging.h"

namespace moe {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

moecluster::v1::DType ToProtoDType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return moecluster::v1::DTYPE_F32;
    case DType::kF16:
      return moecluster::v1::DTYPE_F16;
    case DType::kBF16:
      return moecluster::v1::DTYPE_BF16;
    case DType::kQ8_0:
      return moecluster::v1::DTYPE_Q8_0;
    case DType::kQ4_0:
      return moecluster::v1::DTYPE_Q4_0;
    case DType::kQ4_1:
      return moecluster::v1::DTYPE_Q4_1;
    case DType::kQ5_0:
      return moecluster::v1::DTYPE_Q5_0;
    case DType::kQ5_1:
      return moecluster::v1::DTYPE_Q5_1;
    case DType::kQ4_K:
      return moecluster::v1::DTYPE_Q4_K;
    case DType::kQ5_K:
      return moecluster::v1::DTYPE_Q5_K;
    case DType::kQ6_K:
      return moecluster::v1::DTYPE_Q6_K;
  }
  return moecluster::v1::DTYPE_UNSPECIFIED;
}

void EncodeRowsTensor(const float* data, int64_t rows, int64_t cols, moecluster::v1::DType dtype,
                      moecluster::v1::Tensor* out) {
  out->set_dtype(dtype);
  out->clear_shape();
  out->add_shape(rows);
  out->add_shape(cols);
  const auto n = static_cast<size_t>(rows * cols);
  if (dtype != moecluster::v1::DTYPE_BF16) {
    out->mutable_data()->assign(reinterpret_cast<const char*>(data), n * sizeof(float));
    return;
  }
  std::string* bytes = out->mutable_data();
  bytes->resize(n * 2);
  for (size_t i = 0; i < n; ++i) {
    const uint16_t b = F32ToBF16(data[i]);
    std::memcpy(bytes->data() + 2 * i, &b, 2);
  }
}

absl::Status CheckRowsTensor(const moecluster::v1::Tensor& t, int64_t rows, int64_t cols,
                             const char* what) {
  uint64_t element = 4;
  if (t.dtype() == moecluster::v1::DTYPE_BF16) {
    element = 2;
  } else if (t.dtype() != moecluster::v1::DTYPE_F32) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": dtype must be F32 or BF16, got ",
                                                   moecluster::v1::DType_Name(t.dtype())));
  }
  if (t.shape_size() != 2 || t.shape(0) != rows || t.shape(1) != cols) {
    std::string shape;
    for (int64_t d : t.shape()) absl::StrAppend(&shape, shape.empty() ? "" : ", ", d);
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected shape [", rows, ", ", cols, "], got [", shape, "]"));
  }
  const uint64_t expected = static_cast<uint64_t>(rows) * static_cast<uint64_t>(cols) * element;
  if (t.data().size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", t.data().size(), " bytes for shape [", rows, ", ", cols, "] ",
                     moecluster::v1::DType_Name(t.dtype()).substr(6), ", expected ", expected));
  }
  return absl::OkStatus();
}

void DecodeRowsTensor(const moecluster::v1::Tensor& t, float* out) {
  const std::string& bytes = t.data();
  if (t.dtype() != moecluster::v1::DTYPE_BF16) {
    std::memcpy(out, bytes.data(), bytes.size());
    return;
  }
  for (size_t i = 0; i < bytes.size() / 2; ++i) {
    uint16_t b;
    std::memcpy(&b, bytes.data() + 2 * i, 2);
    out[i] = BF16ToF32(b);
  }
}

absl::Status ValidateListenAddress(const std::string& address, const char* flag) {
  const size_t colon = address.rfind(':');
  uint32_t port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, " must be HOST:PORT (e.g. 127.0.0.1:50051), got \"", address, "\""));
  }
  return absl::OkStatus();
}

bool IsLoopbackAddress(const std::string& address) {
  std::string host = address.substr(0, address.rfind(':'));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

int64_t MaxForwardMessageBytes(const ModelConfig& config, int64_t rows) {
  return rows * (config.hidden_size * 4 + config.routed_experts_per_token() * 8 + 8) + (64 << 10);
}

int64_t WorkerMemoryQuotaBytes(int64_t max_message) { return 4 * max_message + (16 << 20); }

void WarnIfExposed(const std::string& address, const char* flag, const char* advice) {
  if (address.empty() || IsLoopbackAddress(address)) return;
  LOG(WARNING) << "--" << flag << " " << address
               << " is reachable from other hosts and its traffic is plaintext; " << advice;
}

}  // namespace moe
