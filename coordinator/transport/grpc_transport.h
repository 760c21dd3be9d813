// ExpertTransport over gRPC: one long-lived bidirectional Forward stream per expert worker.
// The dispatch module (dispatch.h) drives each layer exchange: it picks a ready replica per
// segment, and this transport's WorkerLinks encode the rows, hand the request to the worker's
// I/O thread (which writes it and reads the answer; workers run in parallel), wait for it, and
// check the answer's step and shape (the dispatcher checks the values).
//
// Failure handling: a worker that errors, closes its stream, answers garbage or misses its
// deadline is marked unavailable and the rows it owed are re-sent to live replicas within the
// same step; only a step with some routed expert left without a live worker fails, with
// UNAVAILABLE naming the workers. Each worker also has a watch thread: while the worker is
// ready it probes it (GetInfo) every health_check_interval and marks it down after two missed
// probes (a dead or stopped idle replica is noticed within about a second); while it is down
// it reconnects it (GetInfo + fingerprint and expert-range check + new stream). gRPC keepalive
// pings run on every channel.
//
// Threads and locks. Callers: Exchange is called by one thread at a time (the scheduler);
// Workers(), AllExpertsServed() and the setters from any thread. Inside: one I/O thread and one
// watch thread per worker. Lock order: exchange_mu_ before Worker::mu; mu_ is a leaf (never
// held while taking another). Callbacks (health) run with no lock held.
#ifndef MOE_COORDINATOR_TRANSPORT_GRPC_TRANSPORT_H_
#define MOE_COORDINATOR_TRANSPORT_GRPC_TRANSPORT_H_

#include <functional>
#include <memory>
#include <optional>
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
#include "coordinator/transport/nccl_transport.h"
#include "grpcpp/security/credentials.h"

namespace moe {

// How hidden rows and partial sums travel to and from the workers: f32 (exact: bit-identical to
// in-process experts), bf16 (half the bytes, values rounded to nearest even), or auto: bf16 to
// workers on other hosts, f32 to loopback ones.
enum class WireDType { kAuto, kF32, kBF16 };
// "auto" / "f32" / "bf16"; false for anything else.
bool ParseWireDType(std::string_view text, WireDType* out);

struct GrpcTransportOptions {
  std::vector<std::string> worker_addresses;           // HOST:PORT each
  std::string model_fingerprint;                       // what every worker must report
  absl::Duration connect_timeout = absl::Seconds(60);  // startup: wait this long for workers
  // Per-step deadlines (DispatchOptions): the cap, and the adaptive one for workers whose
  // experts have a live replica.
  absl::Duration step_timeout = absl::Seconds(10);
  absl::Duration deadline_floor = absl::Milliseconds(500);
  double deadline_factor = 4.0;
  // A ready worker is probed this often, and marked down after two probes unanswered within
  // health_check_timeout; a down one is reconnected this often.
  absl::Duration reconnect_interval = absl::Milliseconds(200);
  absl::Duration health_check_timeout = absl::Milliseconds(400);
  // What Serving() means with experts lost (the engine does the rerouting).
  ExpertLossPolicy on_expert_loss = ExpertLossPolicy::kFail;
  // The most rows one step can send one worker (--max-step-tokens x top_k): a worker that
  // accepts fewer (WorkerInfo.max_rows) is refused at connect, naming both flags.
  int64_t max_rows_per_step = 512 * 8;
  WireDType wire = WireDType::kAuto;
  // TLS to the workers (ChannelCredentials of common/rpc/tls.h); null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Which experts each worker serves, layer by layer (--placement; workers in
  // worker_addresses order). Each worker must have loaded (--experts) a range holding
  // everything it serves. Unset: each worker serves what it loaded, in every layer.
  std::optional<Placement> placement;
  // Without a placement: tokens[layer][expert] of a recorded load (--placement-from-record) to
  // balance over what the workers loaded (BalancedPlacement). Empty: not used.
  std::vector<std::vector<int64_t>> balance_tokens;
  // Where set, workers that offer its kind of frame channel are reached over one instead of
  // their Forward stream (nccl_transport.h); a worker whose channel cannot be opened falls back
  // to its stream, with a warning.
  std::shared_ptr<ChannelFactory> channels;
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
  bool LiveExperts(int64_t layer, std::vector<char>* live) override
      ABSL_LOCKS_EXCLUDED(exchange_mu_);

  std::vector<WorkerSnapshot> Workers() const;
  // The placement the exchanges follow.
  Placement placement() const;
  // Switches to `placement` between two exchanges (checked against what the workers loaded
  // first: FAILED_PRECONDITION naming the worker otherwise).
  absl::Status SetPlacement(const Placement& placement) ABSL_LOCKS_EXCLUDED(exchange_mu_);
  bool AllExpertsServed() const;
  // ClusterServing() under options.on_expert_loss: all experts served, or with reroute at
  // least top-k.
  bool Serving() const;
  // Called (on an internal thread, or inside Exchange) whenever Serving() may have changed.
  // Set before serving traffic.
  void set_on_health_change(std::function<void(bool all_served)> callback) ABSL_LOCKS_EXCLUDED(mu_);
  // Not owned; set before serving traffic. Reports name workers by their index in
  // options.worker_addresses.
  void set_dispatch_observer(DispatchObserver* observer) ABSL_LOCKS_EXCLUDED(exchange_mu_);

 private:
  struct Worker;
  class Links : public WorkerLinks {
   public:
    explicit Links(GrpcTransport* t) : t_(t) {}
    bool Ready(int32_t w) override;
    void Start(int32_t w, int64_t layer, const DispatchRows& rows, const float* x) override;
    bool Wait(int32_t w, absl::Time deadline) override;
    void Abandon(int32_t w) override;
    absl::StatusOr<const void*> Answer(int32_t w, DispatchReport* report) override;
    void MessageSizes(int32_t w, DispatchReport* report) override;
    void MarkDown(int32_t w, const std::string& why) override { t_->MarkDown(w, why); }
    std::string Name(int32_t w) override;
    std::string DownReason(int32_t w) override;
    bool Draining(int32_t w) override;

   private:
    GrpcTransport* t_;
  };
  GrpcTransport(const ModelConfig& config, const GrpcTransportOptions& options);

  // Asks the worker who it is, checks it serves our model (and, once registered, the same
  // experts as before), and opens its frame channel (where options.channels and the worker
  // agree) or else its Forward stream.
  absl::Status Connect(Worker* w, absl::Duration timeout) ABSL_LOCKS_EXCLUDED(exchange_mu_);
  void MarkDown(int32_t w, const std::string& why);
  // Cancels and finishes w's Forward stream (or aborts its channel) if it is open. REQUIRES: no
  // I/O job running on it.
  static void CloseStream(Worker* w);
  // Opens a frame channel to w with options.channels; the stream stays the data path if not.
  std::unique_ptr<FrameChannel> OpenChannel(Worker* w, absl::Duration timeout);
  // Probes w while it is ready, reconnects it while it is not, until shutdown.
  void WatchLoop(Worker* w) ABSL_LOCKS_EXCLUDED(mu_);
  // One probe: true when w answered GetInfo in time (and then its draining flag is updated).
  bool Probe(Worker* w);
  void IoLoop(Worker* w);
  void NotifyHealth() ABSL_LOCKS_EXCLUDED(mu_);

  // Constant after construction.
  const ModelConfig config_;
  const GrpcTransportOptions options_;
  int64_t max_message_ = 0;           // bytes of one request or answer
  DispatchOptions dispatch_options_;  // constant after Create
  // Set in Create, replaced by SetPlacement; a leaf lock.
  mutable absl::Mutex placement_mu_;
  Placement placement_ ABSL_GUARDED_BY(placement_mu_);
  DispatchObserver* observer_ ABSL_GUARDED_BY(exchange_mu_) = nullptr;
  std::vector<std::unique_ptr<Worker>> workers_;  // the vector; each Worker has its own lock

  // Held for a whole Exchange, and by Connect while it replaces a stream.
  absl::Mutex exchange_mu_;
  uint64_t step_ ABSL_GUARDED_BY(exchange_mu_) = 0;  // of the last request sent
  std::unique_ptr<Dispatcher> dispatcher_ ABSL_GUARDED_BY(exchange_mu_);
  Links links_{this};

  mutable absl::Mutex mu_;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void(bool)> on_health_change_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_GRPC_TRANSPORT_H_
