// An expert worker: loads a range of experts of every layer of a checkpoint
// (and nothing else: no embeddings, attention or router) and serves them over gRPC as
// moecluster.v1.ExpertWorker, plus the standard gRPC health service (grpc.health.v1.Health,
// SERVING once started) and server reflection. Plaintext (insecure) transport: run it on a
// private network (a Kubernetes pod network), as the coordinator's clients expect.
#ifndef MOE_EXPERT_WORKER_WORKER_SERVER_H_
#define MOE_EXPERT_WORKER_WORKER_SERVER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/compute_backend.h"
#include "common/expert_range.h"
#include "common/metrics/metrics.h"
#include "common/rpc/tls.h"
#include "common/weights.h"
#include "expert_worker/expert_service.h"
#include "expert_worker/worker_metrics.h"
#include "grpcpp/grpcpp.h"

namespace moe {

// --max-forward-rows 0: room for what a coordinator step sends with default flags — a whole
// context's prompt (or 4096 tokens) plus 1024 decoding sequences, each row once per expert.
int64_t DefaultMaxForwardRows(const ModelConfig& config);

struct WorkerOptions {
  // Checkpoint: a Hugging Face directory (config.json + *.safetensors) or a GGUF file.
  std::string model_dir;
  // Hosted experts of every layer (ParseExpertRange; kToLast = to the model's last expert).
  ExpertRange experts = ExpertRange::All();
  // Quantize-on-load of the hosted experts (WeightsOptions::quantize): nullopt keeps the types.
  std::optional<DType> quantize;
  // HOST:PORT to bind; port 0 picks a free port (see WorkerServer::port()).
  std::string listen = "127.0.0.1:0";
  // OpenMP threads per Forward stream; 0 = the OpenMP default (OMP_NUM_THREADS or all cores).
  int threads = 0;
  // Prometheus /metrics HOST:PORT (port 0 picks a free port); empty: no metrics endpoint.
  std::string metrics_listen;
  // Rows one Forward request may carry (sizes the message cap); the coordinator checks at
  // connect that its steps fit. 0: DefaultMaxForwardRows.
  int64_t max_forward_rows = 0;
  // Forward streams served at once (each holds a thread while open); more are refused with
  // RESOURCE_EXHAUSTED.
  int max_streams = 8;
  // Where the expert FFNs run (--device cpu|cuda[:N]).
  DeviceSpec device;
  // mTLS: this worker's certificate and key, and the CA a coordinator's client certificate
  // must be signed by (all three, or none for plaintext).
  TlsFiles tls;
};

// Thread-safety: all methods may be called from any thread; Shutdown may race with Wait.
class WorkerServer {
 public:
  // Loads the config, opens the checkpoint, maps and validates only the hosted experts'
  // tensors, computes the model fingerprint and starts serving. Errors: INVALID_ARGUMENT for
  // bad options (range, listen address, threads), NOT_FOUND / INVALID_ARGUMENT from the
  // checkpoint naming the file or tensor, UNAVAILABLE when `listen` cannot be bound.
  static absl::StatusOr<std::unique_ptr<WorkerServer>> Create(const WorkerOptions& options);
  // Shuts down (if not yet) and waits.
  ~WorkerServer();
  WorkerServer(const WorkerServer&) = delete;
  WorkerServer& operator=(const WorkerServer&) = delete;

  // The bound port (the chosen one when listen had port 0).
  int port() const { return port_; }
  // listen's host with the bound port, e.g. "127.0.0.1:41235".
  std::string address() const { return address_; }
  // Where /metrics is served (HOST:PORT), empty without metrics_listen.
  std::string metrics_address() const { return metrics_server_ ? metrics_server_->address() : ""; }
  const std::string& fingerprint() const { return fingerprint_; }
  const ExpertRange& experts() const { return weights_->hosted_experts(); }
  const ModelConfig& config() const { return weights_->config(); }
  // Bytes of checkpoint tensors this process mapped. Only expert tensors are ever mapped, so
  // this is the hosted experts' bytes (for the fused gate_up_proj/down_proj layout, whole fused
  // tensors: the pages of experts not hosted are mapped but never touched).
  uint64_t mapped_expert_bytes() const { return weights_->mapped_tensor_bytes(); }
  // Bytes of the hosted experts' matrices as held (mapped, or quantized on load).
  uint64_t resident_expert_bytes() const { return weights_->expert_bytes(); }
  DType weights_dtype() const { return weights_->dtype(); }
  // Where the experts run: "cpu" or the GPU (ComputeBackend::Describe).
  std::string device() const { return backend_->Describe(); }

  // Graceful stop, step one: GetInfo and the health service say draining / NOT_SERVING, so a
  // coordinator with replicas of these experts sends its rows elsewhere; returns once no
  // Forward request arrived for a second, or no coordinator stream is open (true), or at
  // `timeout` (false). Then Shutdown.
  bool Drain(absl::Duration timeout);
  // Marks the health service NOT_SERVING, stops accepting calls, lets in-flight calls finish
  // for up to one second and then cancels them (a coordinator's Forward stream is long-lived
  // and would otherwise hold shutdown forever). Idempotent.
  void Shutdown();
  // Blocks until the server has shut down (after Shutdown, from any thread).
  void Wait();

 private:
  WorkerServer() = default;

  // Constant after Create.
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<ComputeBackend> backend_;
  std::string fingerprint_;
  std::unique_ptr<WorkerMetrics> metrics_;  // null without metrics_listen
  std::unique_ptr<ExpertService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsServer> metrics_server_;
  int port_ = 0;
  std::string address_;

  absl::Mutex mu_;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace moe

#endif  // MOE_EXPERT_WORKER_WORKER_SERVER_H_
