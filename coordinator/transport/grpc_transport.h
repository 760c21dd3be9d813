// ExpertTransport over gRPC: one long-lived bidirectional Forward stream per expert worker.
// Each layer step fans the dispatch out to all workers in parallel (one I/O thread per worker),
// waits for every answer under a step deadline, and adds the partial sums in worker order —
// the same order as InProcessTransport, so a given placement gives bit-identical results.
//
// Failure handling: a worker that errors, closes its stream or misses the step deadline is
// marked unavailable and the step fails with UNAVAILABLE naming it; later steps that need its
// experts fail fast until a background thread reconnects it (GetInfo + fingerprint check + new
// stream). Replicas (workers with overlapping expert ranges) are allowed: each step uses the
// first ready worker hosting each expert.
#ifndef MOE_COORDINATOR_TRANSPORT_GRPC_TRANSPORT_H_
#define MOE_COORDINATOR_TRANSPORT_GRPC_TRANSPORT_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/model_config.h"
#include "coordinator/expert_transport.h"

namespace moe {

struct GrpcTransportOptions {
  std::vector<std::string> worker_addresses;       // HOST:PORT each
  std::string model_fingerprint;                   // what every worker must report
  absl::Duration connect_timeout = absl::Seconds(60);  // startup: wait this long for workers
  absl::Duration step_timeout = absl::Seconds(10);     // per layer step, all workers
  absl::Duration reconnect_interval = absl::Milliseconds(200);
};

// A worker as the status API shows it.
struct WorkerSnapshot {
  std::string address;
  bool ready = false;
  int64_t expert_begin = 0;
  int64_t expert_end = 0;
  std::string message;  // why it is unavailable
};

// Thread-safety: Exchange is called by one thread at a time (the scheduler); Workers() and
// AllExpertsServed() may be called from any thread.
class GrpcTransport : public ExpertTransport {
 public:
  // Connects to every worker (waiting up to connect_timeout), checks each worker's fingerprint
  // and shape against `config`, and that every expert is hosted by some worker. Otherwise
  // FAILED_PRECONDITION naming the worker or the missing experts (or UNAVAILABLE naming a
  // worker that never answered).
  static absl::StatusOr<std::unique_ptr<GrpcTransport>> Create(const ModelConfig& config,
                                                               const GrpcTransportOptions& options);
  ~GrpcTransport() override;

  absl::Status Exchange(int64_t layer, const Routing& routing, const float* x,
                        float* out) override;

  std::vector<WorkerSnapshot> Workers() const;
  bool AllExpertsServed() const;
  // Called (on an internal thread, or inside Exchange) whenever AllExpertsServed() may have
  // changed. Set before serving traffic.
  void set_on_health_change(std::function<void(bool all_served)> callback);
  // Not owned; set before serving traffic. Reports name workers by their index in
  // options.worker_addresses.
  void set_dispatch_observer(DispatchObserver* observer) { dispatch_observer_ = observer; }

 private:
  struct Worker;
  GrpcTransport(const ModelConfig& config, const GrpcTransportOptions& options);
  absl::Status Connect(Worker* w, absl::Duration timeout);
  void MarkDown(Worker* w, const std::string& why);
  // Cancels and finishes w's Forward stream if it is open. REQUIRES: no I/O job running on it.
  void CloseStream(Worker* w);
  void ReconnectLoop();
  void IoLoop(Worker* w);
  absl::Status ChooseWorkers();  // fills worker_of_expert_ from the ready workers
  void NotifyHealth();

  // Constant after construction.
  ModelConfig config_;
  GrpcTransportOptions options_;
  std::vector<std::unique_ptr<Worker>> workers_;

  // Serializes Exchange against stream replacement by the reconnect thread.
  absl::Mutex exchange_mu_;
  uint64_t step_ ABSL_GUARDED_BY(exchange_mu_) = 0;
  DispatchPlan plan_ ABSL_GUARDED_BY(exchange_mu_);
  std::vector<int32_t> worker_of_expert_ ABSL_GUARDED_BY(exchange_mu_);
  std::vector<Worker*> active_ ABSL_GUARDED_BY(exchange_mu_);  // workers with rows this step
  std::vector<DispatchReport> reports_ ABSL_GUARDED_BY(exchange_mu_);
  DispatchObserver* dispatch_observer_ = nullptr;

  // Guards every Worker's state/snapshot fields and the I/O hand-off.
  mutable absl::Mutex mu_;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void(bool)> on_health_change_ ABSL_GUARDED_BY(mu_);
  std::thread reconnect_thread_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_GRPC_TRANSPORT_H_
