// The coordinator process wired together: the model's shared weights and engine, the transport
// to the expert workers (gRPC, or in-process), the continuous-batching scheduler, and a gRPC
// server with the Inference API, grpc.health.v1.Health and server reflection.
#ifndef MOE_COORDINATOR_COORDINATOR_SERVER_H_
#define MOE_COORDINATOR_COORDINATOR_SERVER_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/metrics/metrics.h"
#include "common/rpc/tls.h"
#include "coordinator/client_limit.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/expert_load.h"
#include "coordinator/http_server.h"
#include "coordinator/inference_service.h"
#include "coordinator/local_model.h"
#include "coordinator/openai_api.h"
#include "coordinator/rebalancer.h"
#include "coordinator/scheduler.h"
#include "coordinator/transport/grpc_transport.h"
#include "grpcpp/grpcpp.h"

namespace moe {

struct CoordinatorOptions {
  std::string model_dir;
  // Expert workers (HOST:PORT). Empty: the experts run in this process (in_process_workers
  // slices), the reference the distributed path must equal.
  std::vector<std::string> workers;
  int64_t in_process_workers = 1;
  std::optional<DType> quantize;  // quantize-on-load of the coordinator's (and in-process) weights
  std::string listen = "127.0.0.1:50051";  // port 0 picks a free port
  std::string metrics_listen;              // Prometheus /metrics HOST:PORT; empty: none
  // The OpenAI-compatible HTTP API (openai_api.h) on HOST:PORT; empty: none.
  std::string http_listen;
  HttpServerOptions http;
  std::string served_model_name;   // the API's model name; empty: the model path's basename
  std::string chat_template_file;  // overrides the model's chat template
  // Bearer tokens the public APIs require (ApiTokens file); empty: open.
  std::string api_token_file;
  absl::Duration worker_connect_timeout = absl::Seconds(60);
  // --tls-cert/--tls-key: the coordinator's certificate, for its public gRPC API and as its
  // client certificate to the workers; --tls-ca: the CA that signs the workers' certificates
  // (then worker channels are mTLS).
  TlsFiles tls;
  // Generate streams one client host may hold open at once (0: no bound).
  int max_streams_per_client = 64;
  absl::Duration step_timeout = absl::Seconds(10);
  absl::Duration failover_deadline_floor = absl::Milliseconds(500);
  double failover_deadline_factor = 4.0;
  absl::Duration health_check_timeout = absl::Milliseconds(400);
  // --wire-dtype: f32 or bf16 rows to the workers; auto = bf16 to non-loopback workers.
  WireDType wire_dtype = WireDType::kAuto;
  // --nccl-device cuda:N: GPU workers (those offering NCCL) are reached over NCCL, with the
  // coordinator's rank on this device; "": every worker over gRPC.
  std::string nccl_device;
  // --placement FILE: the workers and which experts of each layer each serves (instead of
  // `workers`); --placement-from-record FILE: with `workers`, a placement balancing a recorded
  // load over what they loaded.
  std::string placement_file;
  std::string placement_record;
  // --rebalance-*: live rebalancing over a window of the router's load (interval 0: off).
  RebalanceOptions rebalance;
  SchedulerOptions scheduler;
  EngineOptions engine;
};

class CoordinatorServer {
 public:
  // Loads the model's non-expert weights, connects to and validates every worker (refusing to
  // start, with a message naming what is wrong or missing), starts serving.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Create(
      const CoordinatorOptions& options);
  ~CoordinatorServer();

  // The address actually bound (with the real port when listen asked for port 0).
  const std::string& address() const { return address_; }
  // Where /metrics is served (HOST:PORT), empty without metrics_listen.
  std::string metrics_address() const { return metrics_server_ ? metrics_server_->address() : ""; }
  // Where the OpenAI-compatible API is served (HOST:PORT), empty without http_listen.
  std::string http_address() const { return http_server_ ? http_server_->address() : ""; }
  const LocalModel& model() const { return *model_; }
  // Graceful stop, step one: health turns NOT_SERVING (gRPC and /health), new requests get
  // UNAVAILABLE (503 over HTTP), and the requests already accepted run to their end or until
  // `timeout`. Returns true when all finished in time. Then call Shutdown.
  bool Drain(absl::Duration timeout);
  // Stops accepting calls, gives open calls a second to write their last message, then
  // cancels and fails what is left and stops the scheduler. Idempotent.
  void Shutdown();
  void Wait();

 private:
  CoordinatorServer() = default;
  absl::Status Start(const CoordinatorOptions& options);
  absl::Status StartHttp(const CoordinatorOptions& options);
  // grpc.health.v1 status, overall and of the Inference service.
  void SetHealth(bool serving);

  std::unique_ptr<ClientLimit> client_limit_;  // shared by both public APIs
  std::unique_ptr<LocalModel> model_;
  GrpcTransport* grpc_transport_ = nullptr;  // owned by model_; null when in-process
  std::unique_ptr<ExpertLoadCounter> expert_load_;
  std::unique_ptr<Rebalancer> rebalancer_;       // after expert_load_ and model_: it reads both
  std::unique_ptr<CoordinatorMetrics> metrics_;  // before scheduler_: it reports into it
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<InferenceService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::optional<ApiTokens> api_tokens_;
  std::unique_ptr<ChatTemplate> chat_template_;
  std::unique_ptr<OpenAiApi> openai_;
  std::unique_ptr<HttpServer> http_server_;        // after openai_: its handlers call it
  std::unique_ptr<MetricsServer> metrics_server_;  // last: scrapes read everything above
  std::string address_;
  bool shut_down_ = false;
  std::atomic<bool> draining_{false};
};

}  // namespace moe

#endif  // MOE_COORDINATOR_COORDINATOR_SERVER_H_
