// Starts real moe-expert-worker and moe-coordinator processes on loopback for integration tests.
#ifndef MOE_TESTS_INTEGRATION_CLUSTER_HARNESS_H_
#define MOE_TESTS_INTEGRATION_CLUSTER_HARNESS_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tests/testutil/subprocess.h"
#include "tools/client/inference_client.h"

namespace moe::testing {

// "a-b" (inclusive) ranges of a contiguous split of `experts` over `workers`.
std::vector<std::string> ContiguousRanges(int64_t experts, int64_t workers);

// A port that was free a moment ago (for restarting a worker at the same address).
int PickFreePort();

struct WorkerProcess {
  std::unique_ptr<Subprocess> process;
  std::string address;
  std::string log;
};

// Starts a worker; `listen` defaults to a free port.
absl::StatusOr<WorkerProcess> StartWorker(const std::string& model_dir, const std::string& range,
                                          const std::string& listen = "127.0.0.1:0",
                                          const std::vector<std::string>& extra_args = {});

class Cluster {
 public:
  // Workers for `ranges` (worker i listens on listens[i] when given, else a free port), then
  // a coordinator over them with `coordinator_args` appended (and `worker_args` to each worker).
  // The client is plaintext (a TLS coordinator needs its own).
  static absl::StatusOr<std::unique_ptr<Cluster>> Start(
      const std::string& model_dir, const std::vector<std::string>& ranges,
      const std::vector<std::string>& coordinator_args = {},
      const std::vector<std::string>& listens = {},
      const std::vector<std::string>& worker_args = {});
  // The same with the coordinator given `--placement FILE` instead of --workers: the file is
  // placement_json(the workers' addresses).
  static absl::StatusOr<std::unique_ptr<Cluster>> StartWithPlacement(
      const std::string& model_dir, const std::vector<std::string>& ranges,
      const std::function<std::string(const std::vector<std::string>&)>& placement_json,
      const std::vector<std::string>& coordinator_args = {},
      const std::vector<std::string>& worker_args = {});
  ~Cluster();

  InferenceClient& client() { return *client_; }
  const std::string& address() const { return address_; }
  // The OpenAI HTTP API's HOST:PORT when coordinator_args had --http-listen, else "".
  std::string http_address() const { return coordinator_->Announced("HTTP"); }
  std::vector<WorkerProcess>& workers() { return workers_; }
  Subprocess& coordinator() { return *coordinator_; }
  // The coordinator's and workers' logs, for failure messages.
  std::string Logs() const;

 private:
  // Starts the workers, then the coordinator with worker_flags(addresses) and coordinator_args.
  static absl::StatusOr<std::unique_ptr<Cluster>> Launch(
      const std::string& model_dir, const std::vector<std::string>& ranges,
      const std::vector<std::string>& listens, const std::vector<std::string>& worker_args,
      const std::function<std::vector<std::string>(const std::vector<std::string>&)>& worker_flags,
      const std::vector<std::string>& coordinator_args);
  std::vector<WorkerProcess> workers_;
  std::unique_ptr<Subprocess> coordinator_;
  std::string coordinator_log_;
  std::string address_;
  std::unique_ptr<InferenceClient> client_;
};

// Bytes of `file` mapped into process `pid` (sum of its mappings' sizes, from /proc/pid/smaps).
uint64_t MappedFileBytes(int pid, const std::string& file);

}  // namespace moe::testing

#endif  // MOE_TESTS_INTEGRATION_CLUSTER_HARNESS_H_
