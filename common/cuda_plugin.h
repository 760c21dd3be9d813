// libmoe_cuda.so's entry points (common/cuda/cuda_experts.h), loaded once with dlopen, for the
// code that uses them: the CUDA compute backend and the NCCL frame channels. Builds with
// MOE_HAVE_CUDA only.
#ifndef MOE_COMMON_CUDA_PLUGIN_H_
#define MOE_COMMON_CUDA_PLUGIN_H_

#include "absl/status/statusor.h"
#include "common/cuda/cuda_experts.h"

namespace moe {

// FAILED_PRECONDITION naming every path tried when the library cannot be loaded.
absl::StatusOr<const cuda::Api*> CudaApi();

}  // namespace moe

#endif  // MOE_COMMON_CUDA_PLUGIN_H_
