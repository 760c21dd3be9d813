// The ExpertWorker gRPC service: proto -> plain ExpertBatch -> ExpertFfn -> proto.
//
// Every ForwardRequest is untrusted: before any compute the service checks the layer, the hidden
// tensor (F32 or BF16, shape [rows, hidden_size], exact byte length, rows <= the service's
// max_rows), the CSR row_offsets (rows + 1 entries, starting at 0, non-decreasing, ending at
// experts_size), experts_size == weights_size, every expert hosted here, every weight finite, and
// no row naming an expert twice. The first violation ends the stream with INVALID_ARGUMENT, its
// message naming the step and the field (e.g. "step 7: row_offsets[0] must be 0, got 1"); the
// server and its other streams are unaffected.
#ifndef MOE_EXPERT_WORKER_EXPERT_SERVICE_H_
#define MOE_EXPERT_WORKER_EXPERT_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/compute_backend.h"
#include "common/frame_channel.h"
#include "common/weights.h"
#include "moecluster/v1/expert.grpc.pb.h"

namespace moe {

// Told about every answered ForwardRequest (metrics). Called from each Forward stream's thread,
// concurrently when several coordinators are connected; must be thread-safe and cheap.
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  // rows_per_expert[e - hosted.begin]: rows computed for each hosted expert of `layer`;
  // `seconds`: from the request read to the answer ready.
  virtual void OnForward(int64_t layer, std::span<const int64_t> rows_per_expert,
                         double seconds) = 0;
};

// Thread-safety: gRPC's sync server may run several Forward streams (and GetInfo calls) at once.
// The service itself is immutable after construction; each Forward stream owns its ExpertFfn and
// its buffers (ExpertFfn is not thread-safe and holds only scratch), so streams never share
// mutable state and run in parallel. Buffers grow to the largest step seen on the stream and are
// reused, so a steady stream allocates nothing per step.
class ExpertService final : public moecluster::v1::ExpertWorker::Service {
 public:
  // `weights` (hosting the experts to serve; shared weights not needed) must outlive the service.
  // `fingerprint` is ModelFingerprint of the checkpoint. `threads` > 0 sets the OpenMP team size
  // each stream's compute uses; 0 keeps the OpenMP default (OMP_NUM_THREADS or all cores).
  // `observer` (may be null) must outlive the service.
  // `max_rows` bounds the rows of one request (INVALID_ARGUMENT beyond; GetInfo reports it),
  // `max_streams` the Forward streams open at once (RESOURCE_EXHAUSTED beyond).
  // `backend` (over `weights`; must outlive the service) computes: each stream takes a runner.
  ExpertService(const ModelWeights* weights, const ComputeBackend* backend, std::string fingerprint,
                int threads, int64_t max_rows, int max_streams,
                ForwardObserver* observer = nullptr);

  grpc::Status GetInfo(grpc::ServerContext* context, const moecluster::v1::GetInfoRequest* request,
                       moecluster::v1::WorkerInfo* info) override;

  // GetInfo reports draining from now on.
  void StartDraining() { draining_ = true; }
  // Waits until no Forward stream is open, or none has sent a request for `quiet` (the
  // coordinator has moved its traffic away), or `deadline` passes; false on the deadline.
  bool WaitUntilQuiet(absl::Duration quiet, absl::Time deadline) const;

  // Answers each request in order with ForwardResponse{step, output [rows, hidden]} in the
  // request's dtype (F32 or BF16).
  // Returns OK when the client closes its side; INVALID_ARGUMENT on a malformed request;
  // CANCELLED when a response cannot be written (the client went away).
  grpc::Status Forward(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<moecluster::v1::ForwardResponse,
                                                moecluster::v1::ForwardRequest>* stream) override;

  // Starts serving the Forward exchange over a frame channel (frame_channel.h) on a thread of
  // its own: "nccl" joins the coordinator's communicator (rank 1) on this worker's GPU,
  // "memory" takes the end a coordinator in this process offered. The channel counts against
  // max_streams while it is open. INVALID_ARGUMENT for an unknown kind or a malformed id,
  // FAILED_PRECONDITION for NCCL on a CPU worker, RESOURCE_EXHAUSTED beyond max_streams.
  grpc::Status OpenChannel(grpc::ServerContext* context,
                           const moecluster::v1::OpenChannelRequest* request,
                           moecluster::v1::OpenChannelResponse* response) override;

  // Aborts every open channel and joins their threads; OpenChannel refuses from then on.
  void StopChannels() ABSL_LOCKS_EXCLUDED(channels_mu_);
  ~ExpertService() override;

  class ForwardIo;

 private:
  // NCCL_UNIQUE_ID_BYTES (nccl.h, not included outside the CUDA plugin).
  static constexpr size_t kNcclUniqueIdBytes = 128;

  // An open channel's serving thread.
  struct Channel {
    std::thread thread;
    bool finished = false;  // guarded by channels_mu_: the thread is about to end
    absl::Mutex mu;
    FrameChannel* channel ABSL_GUARDED_BY(mu) = nullptr;  // while serving
    bool aborted ABSL_GUARDED_BY(mu) = false;
    // Sets the channel being served (null: none); false when already aborted.
    bool Attach(FrameChannel* c);
    void Abort();
  };

  // The exchange over a gRPC stream or a channel: each request decoded, computed, answered.
  absl::Status Serve(ForwardIo* io);
  // RESOURCE_EXHAUSTED: a stream or channel beyond max_streams.
  grpc::Status StreamLimit() const;
  // The channel kinds this worker offers (WorkerInfo.channels).
  std::vector<std::string> ChannelKinds() const;

  // Constant after construction.
  const ModelWeights* weights_;
  const ComputeBackend* backend_;
  const std::string fingerprint_;
  const int threads_;
  ForwardObserver* const observer_;
  const int64_t max_rows_;
  const int max_streams_;
  std::atomic<int> streams_{0};
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> last_request_ns_{0};  // absl::GetCurrentTimeNanos of the last request
  std::atomic<int> in_request_{0};           // requests being computed now

  absl::Mutex channels_mu_;
  std::vector<std::unique_ptr<Channel>> channels_ ABSL_GUARDED_BY(channels_mu_);
  bool channels_stopped_ ABSL_GUARDED_BY(channels_mu_) = false;
};

}  // namespace moe

#endif  // MOE_EXPERT_WORKER_EXPERT_SERVICE_H_
