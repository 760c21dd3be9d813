// moe-coordinator: serves the public Inference API for a model whose experts live in expert
// workers (or in this process). Prints "READY HOST:PORT" on stdout once serving, preceded by
// "HTTP HOST:PORT" with --http-listen and "METRICS HOST:PORT" with --metrics-listen.
#include <sys/resource.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/dtype.h"
#include "common/main_init.h"
#include "common/rpc/rpc_util.h"
#include "common/signals.h"
#include "coordinator/coordinator_server.h"
#include "glog/logging.h"

ABSL_FLAG(std::string, model, "",
          "The model: a Hugging Face directory (config.json, *.safetensors, tokenizer) or a "
          "GGUF file (or a directory holding one, or one file of a split set).");
ABSL_FLAG(std::vector<std::string>, workers, {},
          "Comma-separated expert workers HOST:PORT. Empty: run the experts in this process.");
ABSL_FLAG(int64_t, in_process_workers, 1, "Without --workers: in-process expert slices.");
ABSL_FLAG(std::string, placement, "",
          "A placement file (JSON: docs/placement.md) naming the expert workers and which "
          "experts of each layer each one serves; instead of --workers. Each worker must have "
          "loaded (--experts) what it serves.");
ABSL_FLAG(std::string, placement_from_record, "",
          "With --workers: a CSV of tokens per layer and expert (moe-cli record-experts) to "
          "balance: each layer's experts are spread over the workers that loaded them so that "
          "each worker gets about the same share of the recorded tokens.");
ABSL_FLAG(absl::Duration, rebalance_interval, absl::ZeroDuration(),
          "With workers: every this long (e.g. 30s), balance the router's load of the last "
          "--rebalance-window over the experts the workers loaded, and switch to that placement "
          "between two steps when it lowers the busiest worker's share by --rebalance-min-gain "
          "or more. 0: off (the placement stays as started).");
ABSL_FLAG(absl::Duration, rebalance_window, absl::Seconds(60),
          "The recent load each rebalance balances.");
ABSL_FLAG(double, rebalance_min_gain, 0.1,
          "Rebalance only when the busiest worker's share of the tokens falls by at least this "
          "fraction (0.1: 10 %).");
ABSL_FLAG(moe::QuantizeOption, quantize, {},
          "Quantize a safetensors checkpoint's matrices while loading: q8_0, q4_k or q6_k "
          "(empty: keep the stored types).");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "HOST:PORT to serve on (port 0: any free port).");
ABSL_FLAG(std::string, metrics_listen, "",
          "HOST:PORT for Prometheus metrics at http://HOST:PORT/metrics (e.g. 0.0.0.0:9400; "
          "port 0: any free port). Empty: no metrics endpoint.");
ABSL_FLAG(std::string, http_listen, "",
          "HOST:PORT for the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
          "/v1/models, /tokenize, /detokenize, /tokenizer_info, /health; port 0: any free port). "
          "Empty: no HTTP API.");
ABSL_FLAG(std::string, served_model_name, "",
          "The model name the HTTP API answers to (requests' \"model\"). Default: the last "
          "component of --model.");
ABSL_FLAG(std::string, chat_template, "",
          "A Jinja2 chat template file for /v1/chat/completions, instead of the model's own "
          "(chat_template.jinja, tokenizer_config.json or the GGUF tokenizer.chat_template).");
ABSL_FLAG(std::string, api_token_file, "",
          "A file of bearer tokens (one per line, >= 16 characters; '#' comments): the public "
          "gRPC API (metadata \"authorization: Bearer T\") and the HTTP API (header "
          "\"Authorization: Bearer T\", the OpenAI clients' api_key) then refuse calls without "
          "one (UNAUTHENTICATED / 401); health checks stay open. Empty: no authentication.");
ABSL_FLAG(int64_t, http_max_body_bytes, 8 << 20, "Largest HTTP request body; bigger ones get 413.");
ABSL_FLAG(int64_t, http_threads, 64,
          "HTTP requests handled at once (each waits for its generation); more are queued, and "
          "past 4x this answered 503.");
ABSL_FLAG(int64_t, max_running, 16, "Sequences decoded together (continuous batching).");
ABSL_FLAG(int64_t, max_waiting, 64, "Queued requests beyond this get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_step_tokens, 512, "Token budget per engine step (decode + prefill).");
ABSL_FLAG(int64_t, kv_cache_blocks, 0,
          "KV cache capacity in blocks of 16 tokens. 0: room for --max-running full contexts, "
          "at most --kv-cache-max-gib of memory (at least one full context); running sequences "
          "beyond it are preempted and resumed, never failed.");
ABSL_FLAG(double, kv_cache_max_gib, 4,
          "With --kv-cache-blocks 0: the most memory (GiB, f32 keys and values) the KV cache "
          "takes.");
ABSL_FLAG(absl::Duration, step_timeout, absl::Seconds(10),
          "Longest wait for a worker's answer in one layer exchange when no live replica could "
          "take its rows; then it is marked down and the step fails (UNAVAILABLE).");
ABSL_FLAG(absl::Duration, failover_deadline_floor, absl::Milliseconds(500),
          "A worker whose experts have a live replica gets max(this, "
          "--failover-deadline-factor x its expected answer time) per exchange; then its rows "
          "go to the replica in the same step and it is marked down until it answers again.");
ABSL_FLAG(double, failover_deadline_factor, 4.0,
          "Multiple of the expected answer time (recent answers, scaled by the rows sent) "
          "after which a worker with a live replica is failed over.");
ABSL_FLAG(std::string, on_expert_loss, "fail",
          "When some expert has no ready worker (and no replica): 'fail' ends the steps that "
          "route to it with UNAVAILABLE (exact model or nothing); 'reroute' routes those tokens "
          "to their top-k among the live experts, says so in each response (degraded_tokens) "
          "and in moe_degraded_tokens_total, and keeps health SERVING while at least top-k "
          "experts are live (availability over exactness).");
ABSL_FLAG(int64_t, experts_per_token, 0,
          "Route each token to K experts instead of the model's experts per token (0: the model's; "
          "1 <= K <= the model's), renormalising the router weights over the K: faster, and no "
          "longer the model's outputs (reported at start and in GetModelInfo).");
ABSL_FLAG(std::string, wire_dtype, "auto",
          "How hidden rows and partial sums travel to and from the workers: f32 (exact, "
          "bit-identical to in-process experts), bf16 (half the bytes; values rounded to "
          "nearest even), or auto: bf16 to workers on other hosts, f32 to loopback ones.");
ABSL_FLAG(std::string, nccl_device, "",
          "cuda or cuda:N: reach GPU expert workers (those started with --device cuda in a "
          "build with NCCL) over NCCL instead of gRPC, one two-rank communicator per worker "
          "with the coordinator's rank on this GPU; CPU workers stay on gRPC. Rows go in bf16 "
          "unless --wire-dtype f32. Empty: every worker over gRPC.");
ABSL_FLAG(absl::Duration, health_check_timeout, absl::Milliseconds(400),
          "Each ready worker is probed every 200ms; two probes unanswered within this mark it "
          "down (its traffic goes to replicas) until it reconnects.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate (chain) of the coordinator: with --tls-key its public gRPC API and "
          "its HTTP API (HTTPS) serve TLS, and it is the client certificate shown to TLS "
          "workers.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert.");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA certificate(s) that sign the workers' certificates: the worker channels then "
          "use mTLS (needs --tls-cert and --tls-key).");
ABSL_FLAG(int32_t, max_streams_per_client, 64,
          "Generation requests (gRPC Generate streams and HTTP completions together) one client "
          "host (its IP address) may hold open at once; more get RESOURCE_EXHAUSTED / 429, so "
          "one client cannot take every slot. 0: no bound.");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "On SIGTERM/SIGINT: health turns NOT_SERVING and new requests get UNAVAILABLE at "
          "once; requests already accepted get this long to finish, then the rest are "
          "cancelled and the process exits 0. Keep Kubernetes' terminationGracePeriodSeconds "
          "above it.");
ABSL_FLAG(absl::Duration, worker_connect_timeout, absl::Seconds(60),
          "How long to wait at start for every worker to answer.");

namespace {

// Raises the soft limit on open descriptors to the hard one.
void RaiseFileLimit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }
}

}  // namespace

int main(int argc, char** argv) {
  moe::BlockTerminationSignals();
  moe::InitMain(
      argc, argv, __FILE__,
      "moe-coordinator --model DIR --workers HOST:PORT[,HOST:PORT...] [--listen HOST:PORT]\n"
      "Serves moecluster.v1.Inference; experts run in the workers (or in-process without "
      "--workers). OpenAI-compatible HTTP API with --http-listen. Prometheus metrics with "
      "--metrics-listen. Flag names take dashes or "
      "underscores.");

  RaiseFileLimit();  // every HTTP connection is a descriptor
  moe::CoordinatorOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.workers = absl::GetFlag(FLAGS_workers);
  options.in_process_workers = absl::GetFlag(FLAGS_in_process_workers);
  options.quantize = absl::GetFlag(FLAGS_quantize).type;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.http_listen = absl::GetFlag(FLAGS_http_listen);
  options.served_model_name = absl::GetFlag(FLAGS_served_model_name);
  options.chat_template_file = absl::GetFlag(FLAGS_chat_template);
  options.api_token_file = absl::GetFlag(FLAGS_api_token_file);
  if (absl::GetFlag(FLAGS_http_max_body_bytes) < 1 || absl::GetFlag(FLAGS_http_threads) < 1 ||
      absl::GetFlag(FLAGS_http_threads) > 4096) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --http-max-body-bytes must be >= 1 and --http-threads "
                 "in [1, 4096]\n");
    return 1;
  }
  options.http.max_body_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_http_max_body_bytes));
  options.http.handler_threads = static_cast<int>(absl::GetFlag(FLAGS_http_threads));
  options.http.max_queued = 4 * static_cast<size_t>(options.http.handler_threads);
  options.scheduler.max_running = absl::GetFlag(FLAGS_max_running);
  options.scheduler.max_waiting = absl::GetFlag(FLAGS_max_waiting);
  options.scheduler.max_step_tokens = absl::GetFlag(FLAGS_max_step_tokens);
  options.engine.kv_cache.num_blocks = absl::GetFlag(FLAGS_kv_cache_blocks);
  options.engine.kv_cache.auto_sequences = options.scheduler.max_running;
  if (!(absl::GetFlag(FLAGS_kv_cache_max_gib) > 0) || absl::GetFlag(FLAGS_kv_cache_blocks) < 0 ||
      options.scheduler.max_running < 1) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --kv-cache-max-gib must be > 0, --kv-cache-blocks >= 0 "
                 "and --max-running >= 1\n");
    return 1;
  }
  options.engine.kv_cache.auto_max_bytes =
      static_cast<int64_t>(absl::GetFlag(FLAGS_kv_cache_max_gib) * double{1 << 30});
  options.step_timeout = absl::GetFlag(FLAGS_step_timeout);
  options.failover_deadline_floor = absl::GetFlag(FLAGS_failover_deadline_floor);
  options.failover_deadline_factor = absl::GetFlag(FLAGS_failover_deadline_factor);
  options.health_check_timeout = absl::GetFlag(FLAGS_health_check_timeout);
  options.worker_connect_timeout = absl::GetFlag(FLAGS_worker_connect_timeout);
  options.max_streams_per_client = absl::GetFlag(FLAGS_max_streams_per_client);
  if (options.max_streams_per_client < 0) {
    std::fprintf(stderr, "moe-coordinator: error: --max-streams-per-client must be >= 0\n");
    return 1;
  }
  if (!moe::ParseExpertLossPolicy(absl::GetFlag(FLAGS_on_expert_loss),
                                  &options.engine.on_expert_loss)) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --on-expert-loss must be fail or reroute, not '%s'\n",
                 absl::GetFlag(FLAGS_on_expert_loss).c_str());
    return 1;
  }
  options.engine.experts_per_token = absl::GetFlag(FLAGS_experts_per_token);
  options.nccl_device = absl::GetFlag(FLAGS_nccl_device);
  options.placement_file = absl::GetFlag(FLAGS_placement);
  options.rebalance.interval = absl::GetFlag(FLAGS_rebalance_interval);
  options.rebalance.window = absl::GetFlag(FLAGS_rebalance_window);
  options.rebalance.min_gain = absl::GetFlag(FLAGS_rebalance_min_gain);
  if (options.rebalance.interval < absl::ZeroDuration() ||
      options.rebalance.window <= absl::ZeroDuration() || options.rebalance.min_gain < 0) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --rebalance-interval must be >= 0, --rebalance-window "
                 "> 0 and --rebalance-min-gain >= 0\n");
    return 1;
  }
  options.placement_record = absl::GetFlag(FLAGS_placement_from_record);
  if (!options.placement_file.empty() &&
      (!options.workers.empty() || !options.placement_record.empty())) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --placement names the workers and what they serve: "
                 "give it without --workers and --placement-from-record\n");
    return 1;
  }
  if (!options.placement_record.empty() && options.workers.empty()) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --placement-from-record balances over the experts the "
                 "--workers loaded: give --workers too\n");
    return 1;
  }
  if (!options.nccl_device.empty() && options.workers.empty() && options.placement_file.empty()) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --nccl-device reaches expert workers over NCCL: give "
                 "--workers too (without workers the experts run in this process)\n");
    return 1;
  }
  if (!moe::ParseWireDType(absl::GetFlag(FLAGS_wire_dtype), &options.wire_dtype)) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --wire-dtype must be auto, f32 or bf16, not '%s'\n",
                 absl::GetFlag(FLAGS_wire_dtype).c_str());
    return 1;
  }
  if (options.failover_deadline_floor <= absl::ZeroDuration() ||
      options.failover_deadline_factor < 1 ||
      options.health_check_timeout <= absl::ZeroDuration() ||
      options.step_timeout <= absl::ZeroDuration()) {
    std::fprintf(stderr,
                 "moe-coordinator: error: --step-timeout, --failover-deadline-floor and "
                 "--health-check-timeout must be > 0 and --failover-deadline-factor >= 1\n");
    return 1;
  }
  if (options.model_dir.empty()) {
    std::fprintf(stderr, "moe-coordinator: error: --model is required (see --help)\n");
    return 1;
  }
  const char* advice =
      options.api_token_file.empty()
          ? "anyone who reaches it may call the API: require a token with --api-token-file, or "
            "bind 127.0.0.1 / restrict the network"
          : "tokens travel in the clear: keep it on a trusted network";
  options.tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                 absl::GetFlag(FLAGS_tls_ca)};
  if (options.tls.cert.empty()) moe::WarnIfExposed(options.listen, "listen", advice);
  if (options.tls.cert.empty()) moe::WarnIfExposed(options.http_listen, "http-listen", advice);
  auto server = moe::CoordinatorServer::Create(options);
  if (!server.ok()) {
    std::fprintf(stderr, "moe-coordinator: error: %s\n",
                 std::string(server.status().message()).c_str());
    return 1;
  }
  if (!(*server)->http_address().empty()) {
    std::cout << "HTTP " << (*server)->http_address() << std::endl;
  }
  if (!(*server)->metrics_address().empty()) {
    std::cout << "METRICS " << (*server)->metrics_address() << std::endl;
  }
  std::cout << "READY " << (*server)->address() << std::endl;
  const int sig = moe::WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": shutting down";
  (*server)->Drain(absl::GetFlag(FLAGS_drain_timeout));
  (*server)->Shutdown();
  return 0;
}
