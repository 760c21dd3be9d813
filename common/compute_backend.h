// Where a worker's expert FFNs run: the compute backend seam. A ComputeBackend holds what a
// device needs for the worker's slice of the experts (for CUDA: the weights uploaded once at
// load); each Forward stream asks it for its own ExpertRunner (scratch buffers, for CUDA a stream
// and cuBLAS handle), so streams share no mutable state.
//
//   --device cpu        today's CPU kernels (common/kernels.h), the default
//   --device cuda[:N]   GPU N (default 0): BF16 / F16 experts as stored, F32 ones rounded to
//                       BF16; quantized experts are refused (they run on the CPU only)
#ifndef MOE_COMMON_COMPUTE_BACKEND_H_
#define MOE_COMMON_COMPUTE_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/expert_batch.h"
#include "common/weights.h"

namespace moe {

struct DeviceSpec {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int index = 0;  // kCuda only

  // "cpu" or "cuda:N".
  std::string ToString() const;
};

// "cpu", "cuda" (= cuda:0) or "cuda:N"; INVALID_ARGUMENT naming the accepted forms otherwise.
absl::StatusOr<DeviceSpec> ParseDevice(absl::string_view text);

// Not thread-safe: one per stream.
class ExpertRunner {
 public:
  virtual ~ExpertRunner() = default;
  // out: [rows, hidden], overwritten with ExpertFfn's sum. REQUIRES: `batch` is well-formed
  // (ExpertBatch). INTERNAL naming the device and the failing call when the device fails.
  virtual absl::Status Forward(const ExpertBatch& batch, float* out) = 0;
};

// Thread-safe: NewRunner may be called from several streams at once.
class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;
  // E.g. "cpu" or "cuda:0 (NVIDIA H200, BF16 weights, 2.10 GiB)".
  virtual std::string Describe() const = 0;
  virtual absl::StatusOr<std::unique_ptr<ExpertRunner>> NewRunner() const = 0;
  // The CUDA device the experts are on; -1 on the CPU.
  virtual int cuda_device() const { return -1; }
};

// The CUDA devices visible to a build with the CUDA backend; FAILED_PRECONDITION with the CUDA
// runtime's message otherwise (no driver, no GPU) or in a build without it.
absl::StatusOr<int> CudaDeviceCount();

// The backend for `device` over `weights` (which must outlive it and host the experts to
// serve). FAILED_PRECONDITION when this build has no CUDA backend or the GPU cannot be used
// (none visible, not enough free memory: the message names the bytes), INVALID_ARGUMENT when the
// experts' types cannot run there (e.g. Q4_K on cuda).
absl::StatusOr<std::unique_ptr<ComputeBackend>> CreateComputeBackend(const DeviceSpec& device,
                                                                     const ModelWeights* weights);

}  // namespace moe

#endif  // MOE_COMMON_COMPUTE_BACKEND_H_
