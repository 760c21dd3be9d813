// ExpertTransport over gRPC: one long-lived bidirectional Forward stream per expert worker.
// Each layer exchange runs in four named steps:
//   Plan    choose one ready worker per expert (replicas: the first listed) and split the
//           routing by worker (dispatch.h);
//   Send    encode each worker's rows and hand the request to that worker's I/O thread, which
//           writes it and reads the answer (workers run in parallel);
//   Await   wait for every answer under one step deadline; cancel the streams of late workers;
//   Combine check each answer (step echoed, F32 [rows, hidden]) and add the partial sums in
//           worker order, as InProcessTransport does, so a placement gives identical bits.
//
// Failure handling: a worker that errors, closes its stream, answers garbage or misses the step
// deadline is marked unavailable and the step fails with UNAVAILABLE naming it; later steps
// that need its experts fail fast (or use a replica) until a background thread reconnects it
// (GetInfo + fingerprint check + new stream).
//
// Threads and locks. Callers: Exchange is called by one thread at a time (the scheduler);
// Workers(), AllExpertsServed() and the setters from any thread. Inside: one I/O thread per
// worker and one reconnect thread. Lock order: exchange_mu_ before Worker::mu; mu_ is a leaf
// (never held while taking another). Callbacks (health) run with no lock held.
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
#include "coordinator/transport/dispatch.h"
#include "coordinator/transport/expert_transport.h"

namespace moe {

struct GrpcTransportOptions {
  std::vector<std::string> worker_addresses;           // HOST:PORT each
  std::string model_fingerprint;                       // what every worker must report
  absl::Duration connect_timeout = absl::Seconds(60);  // startup: wait this long for workers
  absl::Duration step_timeout = absl::Seconds(10);     // per layer step, all workers
  absl::Duration reconnect_interval = absl::Milliseconds(200);
};

class GrpcTransport : public ExpertTransport {
 public:
  // Connects to every worker (waiting up to connect_timeout), checks each worker's fingerprint
  // and shape against `config`, and that every expert is hosted by some worker. Otherwise
  // FAILED_PRECONDITION naming the worker or the missing experts (or UNAVAILABLE naming a
  // worker that never answered).
  static absl::StatusOr<std::unique_ptr<GrpcTransport>> Create(const ModelConfig& config,
                                                               const GrpcTransportOptions& options);
  ~GrpcTransport() override;

  absl::Status Exchange(int64_t layer, const Routing& routing, const float* x, float* out) override
      ABSL_LOCKS_EXCLUDED(exchange_mu_);

  // The workers in options.worker_addresses order.
  std::vector<WorkerSnapshot> Workers() const;
  bool AllExpertsServed() const;
  // Called (on an internal thread, or inside Exchange) whenever AllExpertsServed() may have
  // changed. Set before serving traffic.
  void set_on_health_change(std::function<void(bool all_served)> callback) ABSL_LOCKS_EXCLUDED(mu_);
  // Not owned; set before serving traffic. Reports name workers by their index in
  // options.worker_addresses.
  void set_dispatch_observer(DispatchObserver* observer) ABSL_LOCKS_EXCLUDED(exchange_mu_);

 private:
  struct Worker;
  GrpcTransport(const ModelConfig& config, const GrpcTransportOptions& options);

  // The four steps of Exchange.
  absl::Status Plan(const Routing& routing) ABSL_EXCLUSIVE_LOCKS_REQUIRED(exchange_mu_);
  void Send(int64_t layer, const float* x) ABSL_EXCLUSIVE_LOCKS_REQUIRED(exchange_mu_);
  void Await() ABSL_EXCLUSIVE_LOCKS_REQUIRED(exchange_mu_);
  absl::Status Combine(int64_t layer, int64_t tokens, float* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(exchange_mu_);

  // Asks the worker who it is, checks it serves our model, and opens its Forward stream.
  absl::Status Connect(Worker* w, absl::Duration timeout) ABSL_LOCKS_EXCLUDED(exchange_mu_);
  void MarkDown(Worker* w, const std::string& why);
  // Cancels and finishes w's Forward stream if it is open. REQUIRES: no I/O job running on it.
  static void CloseStream(Worker* w);
  void ReconnectLoop() ABSL_LOCKS_EXCLUDED(mu_);
  static void IoLoop(Worker* w);
  void NotifyHealth() ABSL_LOCKS_EXCLUDED(mu_);

  // Constant after construction.
  const ModelConfig config_;
  const GrpcTransportOptions options_;
  std::vector<std::unique_ptr<Worker>> workers_;  // the vector; each Worker has its own lock
  std::thread reconnect_thread_;

  // Held for a whole Exchange, and by Connect while it replaces a stream.
  absl::Mutex exchange_mu_;
  uint64_t step_ ABSL_GUARDED_BY(exchange_mu_) = 0;
  std::vector<ExpertRange> live_ ABSL_GUARDED_BY(exchange_mu_);  // ready workers' experts
  std::vector<int32_t> worker_of_expert_ ABSL_GUARDED_BY(exchange_mu_);
  DispatchPlan plan_ ABSL_GUARDED_BY(exchange_mu_);
  std::vector<Worker*> active_ ABSL_GUARDED_BY(exchange_mu_);  // workers with rows this step
  std::vector<DispatchReport> reports_ ABSL_GUARDED_BY(exchange_mu_);
  DispatchObserver* dispatch_observer_ ABSL_GUARDED_BY(exchange_mu_) = nullptr;

  mutable absl::Mutex mu_;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void(bool)> on_health_change_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_GRPC_TRANSPORT_H_
