// NcclLink (cuda_experts.h): byte frames over a two-rank non-blocking NCCL communicator.
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/cuda/cuda_experts.h"

#if MOE_HAVE_NCCL
#include <nccl.h>
#endif

namespace moe::cuda {

#if MOE_HAVE_NCCL
namespace {

using Clock = std::chrono::steady_clock;

std::string NcclError(const char* what, ncclResult_t r, ncclComm_t comm) {
  std::string s = std::string(what) + ": " + ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') s += std::string(" (") + last + ")";
  return s;
}

std::string CudaError(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorString(e);
}

// Waits politely: spins briefly (an answer is often microseconds away), then sleeps in steps
// growing to 50 us — a worker waits for the next layer's rows between the coordinator's
// attention steps, and a longer sleep would be added to every layer of every step.
class Backoff {
 public:
  void Pause() {
    if (++polls_ < 1000) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(sleep_us_));
    if (sleep_us_ < 50) sleep_us_ *= 2;
  }

 private:
  int polls_ = 0;
  int sleep_us_ = 5;
};

// A device buffer and its pinned host twin, grown on demand.
class Staging {
 public:
  ~Staging() { Release(); }
  std::string Reserve(size_t bytes) {
    if (bytes <= capacity_) return "";
    Release();
    size_t n = 4096;
    while (n < bytes) n *= 2;
    if (cudaError_t e = cudaMalloc(&device_, n); e != cudaSuccess) {
      device_ = nullptr;
      return CudaError("cudaMalloc of a frame buffer", e);
    }
    if (cudaError_t e = cudaMallocHost(&host_, n); e != cudaSuccess) {
      host_ = nullptr;
      return CudaError("cudaMallocHost of a frame buffer", e);
    }
    capacity_ = n;
    return "";
  }
  void* device() const { return device_; }
  char* host() const { return static_cast<char*>(host_); }

 private:
  void Release() {
    if (device_ != nullptr) cudaFree(device_);
    if (host_ != nullptr) cudaFreeHost(host_);
    device_ = host_ = nullptr;
    capacity_ = 0;
  }
  void* device_ = nullptr;
  void* host_ = nullptr;
  size_t capacity_ = 0;
};

class Link final : public NcclLink {
 public:
  Link(ncclComm_t comm, int rank, int device) : comm_(comm), peer_(1 - rank), device_(device) {}
  ~Link() override {
    AbortComm();
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  std::string Init() {
    cudaSetDevice(device_);
    if (cudaError_t e = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking);
        e != cudaSuccess) {
      stream_ = nullptr;
      return CudaError("cudaStreamCreate", e);
    }
    return "";
  }

  std::string Send(const std::string& frame) override {
    if (std::string e = Usable(); !e.empty()) return e;
    const int64_t n = static_cast<int64_t>(frame.size());
    if (std::string e = Transfer(&header_, &n, nullptr, sizeof n); !e.empty()) return e;
    if (n == 0) return "";
    return Transfer(&payload_, frame.data(), nullptr, frame.size());
  }

  std::string Receive(int64_t max_bytes, std::string* frame, bool* too_large) override {
    *too_large = false;
    if (std::string e = Usable(); !e.empty()) return e;
    int64_t n = 0;
    if (std::string e = Transfer(&header_, nullptr, &n, sizeof n); !e.empty()) return e;
    if (n < 0 || n > max_bytes) {
      *too_large = true;
      AbortComm();  // the peer's Send then fails instead of waiting for a receive
      return "the peer announced a frame of " + std::to_string(n) + " bytes, beyond the limit " +
             std::to_string(max_bytes);
    }
    frame->resize(static_cast<size_t>(n));
    if (n == 0) return "";
    return Transfer(&payload_, nullptr, frame->data(), frame->size());
  }

  void Abort() override { abort_requested_ = true; }

 private:
  std::string Usable() {
    cudaSetDevice(device_);
    if (abort_requested_) AbortComm();
    std::lock_guard<std::mutex> lock(comm_mu_);
    return comm_ == nullptr ? "the NCCL channel was aborted" : "";
  }

  // One send of n bytes from `src` (host -> staging -> ncclSend) when it is set, else one
  // receive into `dst` (ncclRecv -> staging -> host); waited for.
  std::string Transfer(Staging* staging, const void* src, void* dst, size_t n) {
    const bool send = src != nullptr;
    if (std::string e = staging->Reserve(n); !e.empty()) return Fail(e);
    ncclComm_t comm;
    {
      std::lock_guard<std::mutex> lock(comm_mu_);
      comm = comm_;
    }
    if (comm == nullptr) return "the NCCL channel was aborted";
    if (send) {
      std::memcpy(staging->host(), src, n);
      if (cudaError_t e = cudaMemcpyAsync(staging->device(), staging->host(), n,
                                          cudaMemcpyHostToDevice, stream_);
          e != cudaSuccess) {
        return Fail(CudaError("cudaMemcpyAsync to the frame buffer", e));
      }
      ncclResult_t r = ncclSend(staging->device(), n, ncclUint8, peer_, comm, stream_);
      if (r != ncclSuccess && r != ncclInProgress) return Fail(NcclError("ncclSend", r, comm));
    } else {
      ncclResult_t r = ncclRecv(staging->device(), n, ncclUint8, peer_, comm, stream_);
      if (r != ncclSuccess && r != ncclInProgress) return Fail(NcclError("ncclRecv", r, comm));
      // Nothing else goes on the stream until NCCL has enqueued the receive (its state is
      // ncclSuccess): wait for the receive, then copy.
      if (std::string e = Wait(comm); !e.empty()) return e;
      if (cudaError_t e = cudaMemcpyAsync(staging->host(), staging->device(), n,
                                          cudaMemcpyDeviceToHost, stream_);
          e != cudaSuccess) {
        return Fail(CudaError("cudaMemcpyAsync from the frame buffer", e));
      }
    }
    if (std::string e = Wait(comm); !e.empty()) return e;
    if (!send) std::memcpy(dst, staging->host(), n);
    return "";
  }

  // Until the stream has run everything posted: the communicator's asynchronous errors and
  // Abort are checked on every poll.
  std::string Wait(ncclComm_t comm) {
    Backoff backoff;
    while (true) {
      // The communicator's state first: only once it is ncclSuccess is the operation on the
      // stream, so an idle stream means it has completed.
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess) return Fail(NcclError("ncclCommGetAsyncError", r, comm));
      if (state != ncclSuccess && state != ncclInProgress) {
        return Fail(NcclError("the NCCL communicator failed", state, comm));
      }
      const cudaError_t q = state == ncclSuccess ? cudaStreamQuery(stream_) : cudaErrorNotReady;
      if (q == cudaSuccess) return "";
      if (q != cudaSuccess && q != cudaErrorNotReady) return Fail(CudaError("the CUDA stream", q));
      if (abort_requested_) return Fail("the NCCL channel was aborted");
      backoff.Pause();
    }
  }

  std::string Fail(const std::string& why) {
    AbortComm();
    return why;
  }

  void AbortComm() {
    std::lock_guard<std::mutex> lock(comm_mu_);
    if (comm_ == nullptr) return;
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  std::mutex comm_mu_;
  ncclComm_t comm_;  // null once aborted
  const int peer_;
  const int device_;
  cudaStream_t stream_ = nullptr;
  std::atomic<bool> abort_requested_{false};
  Staging header_;
  Staging payload_;
};

}  // namespace

std::string NcclUniqueId(std::string* id) {
  ncclUniqueId uid;
  if (ncclResult_t r = ncclGetUniqueId(&uid); r != ncclSuccess) {
    return NcclError("ncclGetUniqueId", r, nullptr);
  }
  id->assign(reinterpret_cast<const char*>(&uid), sizeof uid);
  return "";
}

std::unique_ptr<NcclLink> NcclConnect(const std::string& id, int rank, int device,
                                      int64_t timeout_ms, std::string* error) {
  ncclUniqueId uid;
  if (id.size() != sizeof uid || (rank != 0 && rank != 1)) {
    *error = "an NCCL unique id has " + std::to_string(sizeof uid) + " bytes (got " +
             std::to_string(id.size()) + ") and the rank is 0 or 1 (got " + std::to_string(rank) +
             ")";
    return nullptr;
  }
  std::memcpy(&uid, id.data(), sizeof uid);
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    *error = CudaError(("cudaSetDevice(" + std::to_string(device) + ")").c_str(), e);
    return nullptr;
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, 2, uid, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    *error = NcclError("ncclCommInitRankConfig", r, comm);
    if (comm != nullptr) ncclCommAbort(comm);
    return nullptr;
  }
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  Backoff backoff;
  ncclResult_t state = ncclInProgress;
  while (true) {
    r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess || state != ncclInProgress) break;
    if (Clock::now() >= deadline) {
      ncclCommAbort(comm);
      *error = "the NCCL communicator did not form within " + std::to_string(timeout_ms) +
               " ms (is the peer's rank joining? NCCL_SOCKET_IFNAME, firewalls)";
      return nullptr;
    }
    backoff.Pause();
  }
  if (r != ncclSuccess || state != ncclSuccess) {
    *error = NcclError("forming the NCCL communicator", r != ncclSuccess ? r : state, comm);
    ncclCommAbort(comm);
    return nullptr;
  }
  auto link = std::make_unique<Link>(comm, rank, device);
  if (std::string e = link->Init(); !e.empty()) {
    *error = e;
    return nullptr;
  }
  return link;
}

#else  // !MOE_HAVE_NCCL

std::string NcclUniqueId(std::string*) {
  return "this build of libmoe_cuda.so has no NCCL (nccl.h / libnccl were not found at build "
         "time)";
}

std::unique_ptr<NcclLink> NcclConnect(const std::string& id, int rank, int device,
                                      int64_t timeout_ms, std::string* error) {
  (void)id, (void)rank, (void)device, (void)timeout_ms;
  NcclUniqueId(nullptr).swap(*error);
  return nullptr;
}

#endif  // MOE_HAVE_NCCL

}  // namespace moe::cuda
