// The CUDA expert FFN (built only with -DMOE_ENABLE_CUDA=ON): a worker's experts uploaded once to
// one GPU, and per-stream runners that compute ExpertFfn's sum on it. This header uses only the
// standard library (no CUDA, no Abseil) so that host code includes it freely; errors come back
// as a message ("" = success) that common/compute_backend.cc turns into an absl::Status.
//
// A runner's Forward, for a batch already grouped by expert (common/expert_grouping.h):
//   1. copies the rows and the grouping to the GPU (pinned staging buffers, one stream);
//   2. gathers each slot's row, converting it to the weights' element type (BF16 or F16);
//   3. w1 and w3 of every expert with rows in one grouped GEMM (cublasGemmGroupedBatchedEx,
//      f32 compute), a fused SiLU(gate) * up kernel, w2 in a second grouped GEMM;
//   4. adds each row's weighted results in f32, experts ascending (as the CPU FFN does);
//   5. copies the sums back: the one host synchronisation of the call.
// Buffers (device and pinned host) grow to the largest batch seen and are reused.
#ifndef MOE_COMMON_CUDA_CUDA_EXPERTS_H_
#define MOE_COMMON_CUDA_CUDA_EXPERTS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moe::cuda {

// How a matrix is stored on the host. kF32 matrices are rounded to BF16 when uploaded.
enum class HostType { kBF16, kF16, kF32 };

struct HostMatrix {
  const void* data = nullptr;
  HostType type = HostType::kBF16;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;  // elements
};

struct HostExpert {
  HostMatrix w1;  // [ffn, hidden]
  HostMatrix w3;  // [ffn, hidden]
  HostMatrix w2;  // [hidden, ffn]
};

// One ExpertFfn batch, grouped (see ExpertGrouping for the arrays' meaning).
struct GroupedBatch {
  int64_t layer = 0;
  int64_t rows = 0;
  int64_t slots = 0;
  const float* x = nullptr;               // [rows, hidden]
  const int32_t* offsets = nullptr;       // [rows + 1]
  const int32_t* expert_begin = nullptr;  // [hosted experts + 1]
  const int32_t* slot_row = nullptr;      // [slots]
  const float* slot_weight = nullptr;     // [slots]
  const int32_t* row_slots = nullptr;     // [slots]
};

class CudaExperts;

// Not thread-safe: one per Forward stream (its own CUDA stream, cuBLAS handle and buffers).
class CudaRunner {
 public:
  virtual ~CudaRunner() = default;
  // out: [rows, hidden] f32, overwritten. "" or the failing call and CUDA's message.
  virtual std::string Forward(const GroupedBatch& batch, float* out) = 0;
};

// Immutable after Create; runners may be created and used from several threads.
class CudaExperts {
 public:
  virtual ~CudaExperts() = default;

  // Uploads experts[layer * hosted + j] (every matrix BF16 or F32, or every one F16) to device
  // `device`. progress(done, total) is called with bytes uploaded. nullptr and *error set on
  // failure: no such device, not enough free memory (naming the bytes needed and free), mixed
  // element types, or a CUDA error.
  static std::unique_ptr<CudaExperts> Create(
      int device, int64_t layers, int64_t hosted, int64_t hidden, int64_t ffn,
      const std::vector<HostExpert>& experts,
      const std::function<void(uint64_t, uint64_t)>& progress, std::string* error);

  // E.g. "cuda:0 (NVIDIA H200, BF16 weights, 2.1 GiB)".
  virtual std::string Describe() const = 0;
  virtual std::unique_ptr<CudaRunner> NewRunner(std::string* error) const = 0;
};

// One end of a two-rank NCCL communicator carrying byte frames (common/nccl_channel.h wraps it
// as a FrameChannel). A frame is an 8-byte length, then the bytes: each an ncclSend/ncclRecv
// through a device staging buffer, completed before the next is posted. The communicator is
// non-blocking; every wait polls the CUDA stream and ncclCommGetAsyncError, and Abort (from any
// thread) makes the waiting call abort the communicator, so nothing blocks for ever.
// Send and Receive: one thread at a time.
class NcclLink {
 public:
  virtual ~NcclLink() = default;
  // "" or why it failed (the link is then unusable).
  virtual std::string Send(const std::string& frame) = 0;
  // "" and the next frame, or why not; *too_large when the peer announced more than max_bytes
  // (nothing of it is received).
  virtual std::string Receive(int64_t max_bytes, std::string* frame, bool* too_large) = 0;
  virtual void Abort() = 0;
};

// What libmoe_cuda.so offers (compute_backend.cc loads it with dlopen, see plugin_loader.h).
struct Api {
  // "" and *count = the CUDA devices visible, or the CUDA runtime's error.
  std::string (*device_count)(int* count);
  // CudaExperts::Create.
  std::unique_ptr<CudaExperts> (*create)(int device, int64_t layers, int64_t hosted, int64_t hidden,
                                         int64_t ffn, const std::vector<HostExpert>& experts,
                                         const std::function<void(uint64_t, uint64_t)>& progress,
                                         std::string* error);
  // "" and *id = a new ncclUniqueId's bytes, or NCCL's error (or that it was built without NCCL).
  std::string (*nccl_unique_id)(std::string* id);
  // Joins the two-rank communicator `id` as `rank` (0 or 1; the peer is the other) on `device`.
  // Returns once both ranks have joined; null with *error after timeout_ms or on an error.
  std::unique_ptr<NcclLink> (*nccl_connect)(const std::string& id, int rank, int device,
                                            int64_t timeout_ms, std::string* error);
};

}  // namespace moe::cuda

// The library's one exported symbol.
#define MOE_CUDA_API_SYMBOL "moe_cuda_api"
extern "C" const moe::cuda::Api* moe_cuda_api();

namespace moe::cuda {}  // namespace moe::cuda

#endif  // MOE_COMMON_CUDA_CUDA_EXPERTS_H_
