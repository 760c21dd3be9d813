#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common/cuda/cuda_experts.h"

namespace moe::cuda {
namespace {

#define MOE_CUDA_TRY(expr)                                                                        \
  do {                                                                                            \
    const cudaError_t moe_err_ = (expr);                                                          \
    if (moe_err_ != cudaSuccess) return std::string(#expr) + ": " + cudaGetErrorString(moe_err_); \
  } while (0)

#define MOE_CUBLAS_TRY(expr)                                             \
  do {                                                                   \
    const cublasStatus_t moe_st_ = (expr);                               \
    if (moe_st_ != CUBLAS_STATUS_SUCCESS) {                              \
      return std::string(#expr) + ": " + cublasGetStatusString(moe_st_); \
    }                                                                    \
  } while (0)

std::string GiB(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / (1 << 30));
  return buf;
}

// Device memory (or, kPinned, page-locked host memory) that frees itself.
template <bool kPinned>
class Buffer {
 public:
  Buffer() = default;
  ~Buffer() { Free(); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  // At least `bytes`, contents not kept.
  std::string Reserve(size_t bytes) {
    if (bytes <= size_) return "";
    Free();
    if constexpr (kPinned) {
      MOE_CUDA_TRY(cudaMallocHost(&ptr_, bytes));
    } else {
      MOE_CUDA_TRY(cudaMalloc(&ptr_, bytes));
    }
    size_ = bytes;
    return "";
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void Free() {
    if constexpr (kPinned) {
      cudaFreeHost(ptr_);
    } else {
      cudaFree(ptr_);
    }
    ptr_ = nullptr;
    size_ = 0;
  }
  void* ptr_ = nullptr;
  size_t size_ = 0;
};
using DeviceBuffer = Buffer<false>;
using PinnedBuffer = Buffer<true>;

template <typename T>
__device__ T FromFloat(float v);
template <>
__device__ __nv_bfloat16 FromFloat(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __half FromFloat(float v) {
  return __float2half_rn(v);
}
__device__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ float ToFloat(__half v) { return __half2float(v); }

// xg[s, :] = x[slot_row[s], :] in T.
template <typename T>
__global__ void GatherRows(const float* x, const int32_t* slot_row, int64_t slots, int64_t hidden,
                           T* xg) {
  const int64_t n = slots * hidden;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t s = i / hidden, c = i % hidden;
    xg[i] = FromFloat<T>(x[slot_row[s] * hidden + c]);
  }
}

// gate[i] = silu(gate[i]) * up[i], in f32.
template <typename T>
__global__ void SiluMul(T* gate, const T* up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g = ToFloat(gate[i]);
    gate[i] = FromFloat<T>(g / (1.0f + expf(-g)) * ToFloat(up[i]));
  }
}

// out[r, c] = sum over row r's slots s (experts ascending) of slot_weight[s] * down[s, c].
template <typename T>
__global__ void AddRows(const T* down, const int32_t* offsets, const int32_t* row_slots,
                        const float* slot_weight, int64_t rows, int64_t hidden, float* out) {
  const int64_t n = rows * hidden;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / hidden, c = i % hidden;
    float acc = 0.0f;
    for (int32_t k = offsets[r]; k < offsets[r + 1]; ++k) {
      const int32_t s = row_slots[k];
      acc = fmaf(slot_weight[s], ToFloat(down[s * hidden + c]), acc);
    }
    out[i] = acc;
  }
}

int Blocks(int64_t n) {
  constexpr int64_t kThreads = 256, kMaxBlocks = 4096;
  return static_cast<int>(
      std::min(kMaxBlocks, std::max<int64_t>(1, (n + kThreads - 1) / kThreads)));
}

class Experts;

template <typename T>
class Runner : public CudaRunner {
 public:
  explicit Runner(const Experts* experts) : e_(experts) {}
  ~Runner() override {
    if (handle_ != nullptr) cublasDestroy(handle_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  std::string Init();
  std::string Forward(const GroupedBatch& b, float* out) override;

 private:
  const Experts* e_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  DeviceBuffer x_, xg_, gate_, up_, down_, out_, meta_;
  PinnedBuffer host_x_, host_out_, host_meta_;
  // The grouped GEMMs' per-group arguments: the experts with rows this step and their rows;
  // the rest are the same for every group, sized once for all hosted experts.
  std::vector<int> groups_, group_rows_;
  std::vector<cublasOperation_t> trans_a_, trans_b_;
  std::vector<float> alpha_, beta_;
  std::vector<int> ffn_v_, hidden_v_, two_, one_;
};

template <typename T>
std::unique_ptr<CudaRunner> MakeRunner(const Experts* experts, std::string* error) {
  auto runner = std::make_unique<Runner<T>>(experts);
  *error = runner->Init();
  if (!error->empty()) return nullptr;
  return runner;
}

class Experts : public CudaExperts {
 public:
  int device = 0;
  int64_t layers = 0, hosted = 0, hidden = 0, ffn = 0;
  bool half = false;  // F16 weights (else BF16)
  std::string name;
  uint64_t bytes = 0;
  DeviceBuffer weights;
  // Per (layer, hosted expert): device pointers of w1, w3, w2 (row-major as on the host).
  std::vector<const void*> w1, w3, w2;

  std::string Describe() const override {
    return "cuda:" + std::to_string(device) + " (" + name + ", " + (half ? "F16" : "BF16") +
           " weights, " + GiB(bytes) + ")";
  }
  std::unique_ptr<CudaRunner> NewRunner(std::string* error) const override {
    return half ? MakeRunner<__half>(this, error) : MakeRunner<__nv_bfloat16>(this, error);
  }
};

template <typename T>
std::string Runner<T>::Init() {
  MOE_CUDA_TRY(cudaSetDevice(e_->device));
  MOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MOE_CUBLAS_TRY(cublasCreate(&handle_));
  MOE_CUBLAS_TRY(cublasSetStream(handle_, stream_));
  const auto n = static_cast<size_t>(e_->hosted);
  groups_.reserve(n);
  group_rows_.reserve(n);
  trans_a_.assign(n, CUBLAS_OP_T);
  trans_b_.assign(n, CUBLAS_OP_N);
  alpha_.assign(n, 1.0f);
  beta_.assign(n, 0.0f);
  ffn_v_.assign(n, static_cast<int>(e_->ffn));
  hidden_v_.assign(n, static_cast<int>(e_->hidden));
  two_.assign(n, 2);
  one_.assign(n, 1);
  return "";
}

template <typename T>
std::string Runner<T>::Forward(const GroupedBatch& b, float* out) {
  const int64_t hidden = e_->hidden, ffn = e_->ffn;
  if (b.rows == 0) return "";
  MOE_CUDA_TRY(cudaSetDevice(e_->device));
  // The experts with rows: one GEMM group each.
  groups_.clear();
  group_rows_.clear();
  for (int64_t j = 0; j < e_->hosted; ++j) {
    const int32_t n = b.expert_begin[j + 1] - b.expert_begin[j];
    if (n > 0) {
      groups_.push_back(static_cast<int>(j));
      group_rows_.push_back(n);
    }
  }
  const size_t g = groups_.size();
  // Metadata, one copy: 5 pointer arrays (w1/w3 GEMM: A, B, C of 2 per group; w2 GEMM: A, B, C of
  // 1 per group = 9 g pointers), then offsets, slot_row, slot_weight, row_slots.
  const size_t ptr_bytes = 9 * g * sizeof(void*);
  const size_t int_bytes = (b.rows + 1 + 3 * b.slots) * 4;
  const size_t x_bytes = b.rows * hidden * sizeof(float);
  std::string err;
  for (auto [buf, bytes] : {std::pair{&host_x_, x_bytes},
                            {&host_out_, x_bytes},
                            {&host_meta_, ptr_bytes + int_bytes}}) {
    if (!(err = buf->Reserve(bytes)).empty()) return err;
  }
  for (auto [buf, bytes] : {std::pair{&x_, x_bytes},
                            {&out_, x_bytes},
                            {&meta_, ptr_bytes + int_bytes},
                            {&xg_, b.slots * hidden * sizeof(T)},
                            {&gate_, b.slots * ffn * sizeof(T)},
                            {&up_, b.slots * ffn * sizeof(T)},
                            {&down_, b.slots * hidden * sizeof(T)}}) {
    if (!(err = buf->Reserve(bytes)).empty()) return err;
  }
  const void** ptrs = host_meta_.as<const void*>();
  const void** a1 = ptrs;
  const void** b1 = a1 + 2 * g;
  const void** c1 = b1 + 2 * g;
  const void** a2 = c1 + 2 * g;
  const void** b2 = a2 + g;
  const void** c2 = b2 + g;
  for (size_t i = 0; i < g; ++i) {
    const int64_t j = groups_[i], first = b.expert_begin[j];
    const int64_t we = b.layer * e_->hosted + j;
    a1[2 * i] = e_->w1[we];
    a1[2 * i + 1] = e_->w3[we];
    b1[2 * i] = b1[2 * i + 1] = xg_.as<T>() + first * hidden;
    c1[2 * i] = gate_.as<T>() + first * ffn;
    c1[2 * i + 1] = up_.as<T>() + first * ffn;
    a2[i] = e_->w2[we];
    b2[i] = gate_.as<T>() + first * ffn;
    c2[i] = down_.as<T>() + first * hidden;
  }
  auto* ints = reinterpret_cast<int32_t*>(host_meta_.as<char>() + ptr_bytes);
  std::memcpy(ints, b.offsets, (b.rows + 1) * 4);
  std::memcpy(ints + b.rows + 1, b.slot_row, b.slots * 4);
  std::memcpy(ints + b.rows + 1 + b.slots, b.slot_weight, b.slots * 4);
  std::memcpy(ints + b.rows + 1 + 2 * b.slots, b.row_slots, b.slots * 4);
  std::memcpy(host_x_.as<float>(), b.x, x_bytes);
  MOE_CUDA_TRY(cudaMemcpyAsync(meta_.as<char>(), host_meta_.as<char>(), ptr_bytes + int_bytes,
                               cudaMemcpyHostToDevice, stream_));
  MOE_CUDA_TRY(cudaMemcpyAsync(x_.as<float>(), host_x_.as<float>(), x_bytes, cudaMemcpyHostToDevice,
                               stream_));
  const auto* d_ptrs = meta_.as<const void*>();
  const auto* d_ints = reinterpret_cast<const int32_t*>(meta_.as<char>() + ptr_bytes);
  const int32_t* d_offsets = d_ints;
  const int32_t* d_slot_row = d_ints + b.rows + 1;
  const auto* d_slot_weight = reinterpret_cast<const float*>(d_ints + b.rows + 1 + b.slots);
  const int32_t* d_row_slots = d_ints + b.rows + 1 + 2 * b.slots;

  GatherRows<T><<<Blocks(b.slots * hidden), 256, 0, stream_>>>(x_.as<float>(), d_slot_row, b.slots,
                                                               hidden, xg_.as<T>());
  MOE_CUDA_TRY(cudaGetLastError());
  // Row-major [n, k] activations and [m, k] weights are column-major [k, n] and [k, m]:
  // C^T (m x n, ld m) = W (op T of the [k, m] column-major weights) * X^T.
  const cudaDataType_t type = e_->half ? CUDA_R_16F : CUDA_R_16BF;
  // No pairs for these experts (rows with none are answered with zeros): no GEMM to run.
  if (g > 0) {
    MOE_CUBLAS_TRY(cublasGemmGroupedBatchedEx(
        handle_, trans_a_.data(), trans_b_.data(), ffn_v_.data(), group_rows_.data(),
        hidden_v_.data(), alpha_.data(), d_ptrs, type, hidden_v_.data(), d_ptrs + 2 * g, type,
        hidden_v_.data(), beta_.data(), const_cast<void* const*>(d_ptrs + 4 * g), type,
        ffn_v_.data(), static_cast<int>(g), two_.data(), CUBLAS_COMPUTE_32F));
    SiluMul<T>
        <<<Blocks(b.slots * ffn), 256, 0, stream_>>>(gate_.as<T>(), up_.as<T>(), b.slots * ffn);
    MOE_CUDA_TRY(cudaGetLastError());
    MOE_CUBLAS_TRY(cublasGemmGroupedBatchedEx(
        handle_, trans_a_.data(), trans_b_.data(), hidden_v_.data(), group_rows_.data(),
        ffn_v_.data(), alpha_.data(), d_ptrs + 6 * g, type, ffn_v_.data(), d_ptrs + 7 * g, type,
        ffn_v_.data(), beta_.data(), const_cast<void* const*>(d_ptrs + 8 * g), type,
        hidden_v_.data(), static_cast<int>(g), one_.data(), CUBLAS_COMPUTE_32F));
  }
  AddRows<T><<<Blocks(b.rows * hidden), 256, 0, stream_>>>(
      down_.as<T>(), d_offsets, d_row_slots, d_slot_weight, b.rows, hidden, out_.as<float>());
  MOE_CUDA_TRY(cudaGetLastError());
  MOE_CUDA_TRY(cudaMemcpyAsync(host_out_.as<float>(), out_.as<float>(), x_bytes,
                               cudaMemcpyDeviceToHost, stream_));
  MOE_CUDA_TRY(cudaStreamSynchronize(stream_));
  std::memcpy(out, host_out_.as<float>(), x_bytes);
  return "";
}

// dst[i] = bf16(src[i]), rounded to nearest even.
__global__ void F32ToBF16(const float* src, int64_t n, __nv_bfloat16* dst) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromFloat<__nv_bfloat16>(src[i]);
  }
}

// Uploads m to dst; an F32 matrix goes through `staging` and is rounded to BF16 on the GPU.
std::string Upload(const HostMatrix& m, void* dst, DeviceBuffer* staging) {
  if (m.type != HostType::kF32) {
    const size_t row_bytes = m.cols * 2;
    MOE_CUDA_TRY(cudaMemcpy2D(dst, row_bytes, m.data, m.row_stride * 2, row_bytes, m.rows,
                              cudaMemcpyHostToDevice));
    return "";
  }
  const size_t row_bytes = m.cols * 4;
  if (std::string e = staging->Reserve(m.rows * row_bytes); !e.empty()) return e;
  MOE_CUDA_TRY(cudaMemcpy2D(staging->as<float>(), row_bytes, m.data, m.row_stride * 4, row_bytes,
                            m.rows, cudaMemcpyHostToDevice));
  F32ToBF16<<<Blocks(m.rows * m.cols), 256>>>(staging->as<float>(), m.rows * m.cols,
                                              static_cast<__nv_bfloat16*>(dst));
  MOE_CUDA_TRY(cudaGetLastError());
  MOE_CUDA_TRY(cudaDeviceSynchronize());  // before the next matrix reuses `staging`
  return "";
}

std::string DeviceCount(int* count) {
  *count = 0;
  MOE_CUDA_TRY(cudaGetDeviceCount(count));
  return "";
}

}  // namespace

std::unique_ptr<CudaExperts> CudaExperts::Create(
    int device, int64_t layers, int64_t hosted, int64_t hidden, int64_t ffn,
    const std::vector<HostExpert>& experts, const std::function<void(uint64_t, uint64_t)>& progress,
    std::string* error) {
  const auto fail = [&](std::string message) -> std::unique_ptr<CudaExperts> {
    *error = "cuda:" + std::to_string(device) + ": " + std::move(message);
    return nullptr;
  };
  int count = 0;
  if (std::string e = DeviceCount(&count); !e.empty()) return fail("no CUDA device: " + e);
  if (device < 0 || device >= count) {
    return fail("no such device (" + std::to_string(count) + " CUDA device(s) visible)");
  }
  if (static_cast<int64_t>(experts.size()) != layers * hosted) {
    return fail("internal: expected " + std::to_string(layers * hosted) + " experts, got " +
                std::to_string(experts.size()));
  }
  auto out = std::make_unique<Experts>();
  out->device = device;
  out->layers = layers;
  out->hosted = hosted;
  out->hidden = hidden;
  out->ffn = ffn;
  out->half = !experts.empty() && experts[0].w1.type == HostType::kF16;
  for (const HostExpert& x : experts) {
    for (const HostMatrix* m : {&x.w1, &x.w3, &x.w2}) {
      if ((m->type == HostType::kF16) != out->half) {
        return fail("expert matrices mix F16 with BF16/F32; the CUDA backend needs one type");
      }
    }
  }
  const uint64_t matrix_bytes = static_cast<uint64_t>(hidden) * ffn * 2;
  out->bytes = 3 * matrix_bytes * experts.size();
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) out->name = prop.name;
  if (cudaSetDevice(device) != cudaSuccess) return fail("cudaSetDevice failed");
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess && out->bytes > free_bytes) {
    return fail("the hosted experts need " + GiB(out->bytes) + " but only " + GiB(free_bytes) +
                " of " + GiB(total_bytes) + " are free; host fewer experts on this worker");
  }
  if (std::string e = out->weights.Reserve(out->bytes); !e.empty()) {
    return fail("allocating " + GiB(out->bytes) + " for the experts: " + e);
  }
  uint64_t done = 0;
  DeviceBuffer staging;  // F32 matrices before rounding
  for (const HostExpert& x : experts) {
    char* base = out->weights.as<char>() + done;
    if (std::string e = Upload(x.w1, base, &staging); !e.empty()) return fail(e);
    if (std::string e = Upload(x.w3, base + matrix_bytes, &staging); !e.empty()) return fail(e);
    if (std::string e = Upload(x.w2, base + 2 * matrix_bytes, &staging); !e.empty()) {
      return fail(e);
    }
    out->w1.push_back(base);
    out->w3.push_back(base + matrix_bytes);
    out->w2.push_back(base + 2 * matrix_bytes);
    done += 3 * matrix_bytes;
    if (progress) progress(done, out->bytes);
  }
  return out;
}

}  // namespace moe::cuda

namespace moe::cuda {
// nccl_link.cc.
std::string NcclUniqueId(std::string* id);
std::unique_ptr<NcclLink> NcclConnect(const std::string& id, int rank, int device,
                                      int64_t timeout_ms, std::string* error);
}  // namespace moe::cuda

extern "C" __attribute__((visibility("default"))) const moe::cuda::Api* moe_cuda_api() {
  static const moe::cuda::Api api{&moe::cuda::DeviceCount, &moe::cuda::CudaExperts::Create,
                                  &moe::cuda::NcclUniqueId, &moe::cuda::NcclConnect};
  return &api;
}
