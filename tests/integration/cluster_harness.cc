#include "tests/integration/cluster_harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "gtest/gtest.h"

namespace moe::testing {

namespace {
int log_counter = 0;

// Logs go to the test's temp dir (TEST_TMPDIR / /tmp), one file per process.
std::string NewLogPath(const std::string& name) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("moe_it_", getpid());
  std::filesystem::create_directories(dir);
  return (dir / absl::StrCat(log_counter++, "_", name, ".log")).string();
}
}  // namespace

std::vector<std::string> ContiguousRanges(int64_t experts, int64_t workers) {
  std::vector<std::string> ranges;
  for (int64_t w = 0; w < workers; ++w) {
    ranges.push_back(absl::StrCat(experts * w / workers, "-", experts * (w + 1) / workers - 1));
  }
  return ranges;
}

int PickFreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

absl::StatusOr<WorkerProcess> StartWorker(const std::string& model_dir, const std::string& range,
                                          const std::string& listen,
                                          const std::vector<std::string>& extra_args) {
  WorkerProcess w;
  w.process = std::make_unique<Subprocess>();
  w.log = NewLogPath("worker");
  std::vector<std::string> args = {"--model",  model_dir, "--experts", range,
                                   "--listen", listen,    "--threads", "1"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  MOE_RETURN_IF_ERROR(w.process->Start(MOE_WORKER_PATH, args, w.log));
  auto address = w.process->WaitForReady(absl::Seconds(60));
  if (!address.ok()) {
    return absl::Status(
        address.status().code(),
        absl::StrCat("worker ", range, ": ", address.status().message(), "\n", ReadLog(w.log)));
  }
  w.address = *address;
  return w;
}

absl::StatusOr<std::unique_ptr<Cluster>> Cluster::Start(
    const std::string& model_dir, const std::vector<std::string>& ranges,
    const std::vector<std::string>& coordinator_args, const std::vector<std::string>& listens,
    const std::vector<std::string>& worker_args) {
  return Launch(
      model_dir, ranges, listens, worker_args,
      [](const std::vector<std::string>& addresses) {
        return addresses.empty()
                   ? std::vector<std::string>{}
                   : std::vector<std::string>{"--workers", absl::StrJoin(addresses, ",")};
      },
      coordinator_args);
}

absl::StatusOr<std::unique_ptr<Cluster>> Cluster::StartWithPlacement(
    const std::string& model_dir, const std::vector<std::string>& ranges,
    const std::function<std::string(const std::vector<std::string>&)>& placement_json,
    const std::vector<std::string>& coordinator_args, const std::vector<std::string>& worker_args) {
  const std::string path = NewLogPath("placement") + ".json";
  return Launch(
      model_dir, ranges, {}, worker_args,
      [&](const std::vector<std::string>& addresses) {
        std::ofstream(path) << placement_json(addresses);
        return std::vector<std::string>{"--placement", path};
      },
      coordinator_args);
}

absl::StatusOr<std::unique_ptr<Cluster>> Cluster::Launch(
    const std::string& model_dir, const std::vector<std::string>& ranges,
    const std::vector<std::string>& listens, const std::vector<std::string>& worker_args,
    const std::function<std::vector<std::string>(const std::vector<std::string>&)>& worker_flags,
    const std::vector<std::string>& coordinator_args) {
  std::unique_ptr<Cluster> c(new Cluster());
  std::vector<std::string> addresses;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const std::string listen =
        i < listens.size() && !listens[i].empty() ? listens[i] : "127.0.0.1:0";
    MOE_ASSIGN_OR_RETURN(WorkerProcess w, StartWorker(model_dir, ranges[i], listen, worker_args));
    addresses.push_back(w.address);
    c->workers_.push_back(std::move(w));
  }
  std::vector<std::string> args = {"--model", model_dir, "--listen", "127.0.0.1:0"};
  const std::vector<std::string> flags = worker_flags(addresses);
  args.insert(args.end(), flags.begin(), flags.end());
  args.insert(args.end(), coordinator_args.begin(), coordinator_args.end());
  c->coordinator_ = std::make_unique<Subprocess>();
  c->coordinator_log_ = NewLogPath("coordinator");
  MOE_RETURN_IF_ERROR(c->coordinator_->Start(MOE_COORDINATOR_PATH, args, c->coordinator_log_));
  auto address = c->coordinator_->WaitForReady(absl::Seconds(60));
  if (!address.ok()) {
    return absl::Status(address.status().code(),
                        absl::StrCat("coordinator: ", address.status().message(), "\n", c->Logs()));
  }
  c->address_ = *address;
  c->client_ = std::make_unique<InferenceClient>(c->address_);
  return c;
}

Cluster::~Cluster() {
  client_.reset();
  if (coordinator_) coordinator_->Stop(SIGTERM);
  // All at once: each drains (up to a second without requests) before it exits.
  for (WorkerProcess& w : workers_) {
    if (w.process && w.process->running()) kill(w.process->pid(), SIGTERM);
  }
  for (WorkerProcess& w : workers_) {
    if (w.process) w.process->Stop(SIGTERM);
  }
}

std::string Cluster::Logs() const {
  std::string out = "--- coordinator log:\n" + ReadLog(coordinator_log_);
  for (const WorkerProcess& w : workers_) {
    absl::StrAppend(&out, "--- worker ", w.address, " log:\n", ReadLog(w.log));
  }
  return out;
}

uint64_t MappedFileBytes(int pid, const std::string& file) {
  const std::string target = std::filesystem::canonical(file).string();
  std::ifstream smaps(absl::StrCat("/proc/", pid, "/smaps"));
  std::string line;
  bool in_file = false;
  uint64_t bytes = 0;
  while (std::getline(smaps, line)) {
    // Mapping header lines start with "start-end perms offset dev inode [path]".
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
        line.find('-') < line.find(' ')) {
      in_file = line.size() >= target.size() &&
                line.compare(line.size() - target.size(), target.size(), target) == 0;
    } else if (in_file && line.rfind("Size:", 0) == 0) {
      std::istringstream ss(line.substr(5));
      uint64_t kb = 0;
      ss >> kb;
      bytes += kb * 1024;
    }
  }
  return bytes;
}

}  // namespace moe::testing
