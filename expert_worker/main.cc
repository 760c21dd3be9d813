// moe-expert-worker: serves experts A..B of every layer of a checkpoint to a coordinator.
//   moe-expert-worker --model DIR --experts A-B [--listen HOST:PORT] [--threads N]
// Prints "READY <host:port>" on stdout once serving (after "METRICS <host:port>" with
// --metrics-listen); SIGINT/SIGTERM shut it down (exit 0);
// errors print "moe-expert-worker: error: <message>" on stderr (exit 1).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "common/main_init.h"
#include "common/rpc/rpc_util.h"
#include "common/signals.h"
#include "expert_worker/worker_server.h"
#include "glog/logging.h"

ABSL_FLAG(std::string, model, "",
          "The model: a Hugging Face directory (config.json, *.safetensors) or a GGUF file (or a "
          "directory holding one, or one file of a split set).");
ABSL_FLAG(moe::QuantizeOption, quantize, {},
          "Quantize a safetensors checkpoint's expert matrices while loading: q8_0, q4_k or q6_k "
          "(empty: keep the stored types).");
ABSL_FLAG(std::string, experts, "all",
          "Experts to host, the same ids in every layer: A-B is the INCLUSIVE range A..B "
          "(0-3 = experts 0, 1, 2, 3), A a single expert, all every expert.");
ABSL_FLAG(std::string, listen, "127.0.0.1:50061",
          "HOST:PORT to serve on; port 0 picks a free port (the READY line shows it). Loopback "
          "by default: give 0.0.0.0:PORT for a coordinator on another host.");
ABSL_FLAG(std::string, metrics_listen, "",
          "HOST:PORT for Prometheus metrics at http://HOST:PORT/metrics (e.g. 0.0.0.0:9401; "
          "port 0: any free port, shown by a METRICS line before READY). Empty: none.");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(10),
          "On SIGTERM/SIGINT: report draining (the coordinator moves this worker's rows to live "
          "replicas), exit once no request came for 1s, or after this long at most.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate (chain) of this worker: with --tls-key and --tls-ca the worker "
          "serves TLS and accepts only clients whose certificate --tls-ca signed (mTLS).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert.");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA certificate(s) that must have signed the coordinator's client certificate.");
ABSL_FLAG(int64_t, max_forward_rows, 0,
          "Rows one expert request may carry; sizes the gRPC message cap (rows x (hidden x 4 + "
          "top_k x 8 + 8) bytes + 64 KiB), so bigger messages are refused before they are "
          "allocated. 0: (max(context, 4096) + 1024) x top_k, what a coordinator step sends "
          "(a whole prompt plus a decode batch). The coordinator checks at start that its "
          "steps fit.");
ABSL_FLAG(int32_t, max_streams, 8,
          "Forward streams served at once (each holds a thread); more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(std::string, device, "cpu",
          "Where the expert FFNs run: cpu, or cuda / cuda:N (GPU N; needs a build with "
          "-DMOE_ENABLE_CUDA=ON). On cuda the hosted experts are uploaded once at start (BF16 and "
          "F16 as stored, F32 rounded to BF16; quantized models run on cpu only).");
ABSL_FLAG(int32_t, threads, 0,
          "OpenMP threads per Forward stream; 0 = OpenMP default (OMP_NUM_THREADS or all cores).");

namespace {

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "moe-expert-worker: error: %s\n", std::string(status.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // Before any thread starts (gRPC, OpenMP): SIGINT/SIGTERM are then taken synchronously below.
  moe::BlockTerminationSignals();

  const std::vector<std::string> args = moe::InitMain(
      argc, argv, __FILE__,
      "serves a slice of a Mixtral checkpoint's experts to a coordinator.\n"
      "  moe-expert-worker --model DIR --experts A-B [--listen HOST:PORT] [--threads N]\n"
      "  [--metrics-listen HOST:PORT] [--device cpu|cuda[:N]]\n"
      "--experts A-B is inclusive: --experts 0-15 hosts experts 0..15 (16 experts) of every "
      "layer.\nPrints \"READY <host:port>\" on stdout once serving. Flag names take dashes or "
      "underscores.");
  if (!args.empty()) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("unexpected argument \"", args[0], "\" (run with --help for all flags)")));
  }

  absl::StatusOr<moe::ExpertRange> range = moe::ParseExpertRange(absl::GetFlag(FLAGS_experts));
  if (!range.ok()) return Fail(range.status());
  absl::StatusOr<moe::DeviceSpec> device = moe::ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return Fail(device.status());
  moe::WorkerOptions options;
  options.device = *device;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.experts = *range;
  options.quantize = absl::GetFlag(FLAGS_quantize).type;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.threads = absl::GetFlag(FLAGS_threads);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.max_forward_rows = absl::GetFlag(FLAGS_max_forward_rows);
  options.max_streams = absl::GetFlag(FLAGS_max_streams);
  options.tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                 absl::GetFlag(FLAGS_tls_ca)};
  if (!options.tls.enabled()) {
    moe::WarnIfExposed(options.listen, "listen",
                       "anyone who reaches it can send it work: turn on mTLS with --tls-cert, "
                       "--tls-key and --tls-ca, or restrict the network to the coordinator (e.g. "
                       "a Kubernetes NetworkPolicy)");
  }
  absl::StatusOr<std::unique_ptr<moe::WorkerServer>> server = moe::WorkerServer::Create(options);
  if (!server.ok()) return Fail(server.status());
  moe::WorkerServer& worker = **server;

  LOG(INFO) << "serving " << options.model_dir << ": experts "
            << worker.experts().InclusiveSpelling() << " of " << worker.config().num_local_experts
            << " in each of " << worker.config().num_hidden_layers << " layers, "
            << worker.resident_expert_bytes() / double{1 << 20} << " MiB of experts ("
            << moe::DTypeName(worker.weights_dtype()) << ") on " << worker.device()
            << ", fingerprint " << worker.fingerprint() << ", on " << worker.address();
  if (!worker.metrics_address().empty()) {
    std::printf("METRICS %s\n", worker.metrics_address().c_str());
  }
  std::printf("READY %s\n", worker.address().c_str());
  std::fflush(stdout);

  const int signal_number = moe::WaitForTerminationSignal();
  LOG(INFO) << "signal " << signal_number << ": draining";
  worker.Drain(absl::GetFlag(FLAGS_drain_timeout));
  worker.Shutdown();
  worker.Wait();
  return 0;
}
