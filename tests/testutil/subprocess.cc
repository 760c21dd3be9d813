#include "tests/testutil/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace moe::testing {

Subprocess::~Subprocess() {
  if (pid_ > 0) Stop(SIGKILL);
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

absl::Status Subprocess::Start(const std::string& binary, const std::vector<std::string>& args,
                               const std::string& log_path) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
  std::vector<std::string> argv_storage = {binary};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    // Children start with default signal handling, whatever the test runner blocked.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    dup2(out[1], STDOUT_FILENO);
    if (!log_path.empty()) {
      const int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (log >= 0) dup2(log, STDERR_FILENO);
    }
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  close(out[1]);
  pid_ = pid;
  stdout_fd_ = out[0];
  return absl::OkStatus();
}

absl::StatusOr<std::string> Subprocess::WaitForReady(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const size_t newline = buffered_.find('\n');
    if (newline != std::string::npos) {
      const std::string line = buffered_.substr(0, newline);
      buffered_.erase(0, newline + 1);
      if (line.rfind("READY ", 0) == 0) return line.substr(6);
      if (const size_t space = line.find(' '); space != std::string::npos) {
        announced_[line.substr(0, space)] = line.substr(space + 1);
      }
      continue;
    }
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return absl::DeadlineExceededError("no READY line in time");
    pollfd p{stdout_fd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(ms)) <= 0) continue;
    char buf[4096];
    const ssize_t n = read(stdout_fd_, buf, sizeof(buf));
    if (n <= 0) {
      const int code = WaitForExit(absl::Seconds(10));
      return absl::FailedPreconditionError(
          absl::StrCat("process exited with code ", code, " before it was ready"));
    }
    buffered_.append(buf, n);
  }
}

std::string Subprocess::Announced(const std::string& key) const {
  auto it = announced_.find(key);
  return it == announced_.end() ? "" : it->second;
}

int Subprocess::WaitForExit(absl::Duration timeout) {
  if (pid_ <= 0) return exit_code_;
  // A pidfd becomes readable when the process exits: wait on it instead of polling waitpid.
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
  if (pidfd >= 0) {
    pollfd p{pidfd, POLLIN, 0};
    poll(&p, 1, static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(timeout))));
    close(pidfd);
  }
  int status = 0;
  const pid_t r = waitpid(pid_, &status, pidfd >= 0 ? WNOHANG : 0);
  if (r != pid_) return -1;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  pid_ = -1;
  return exit_code_;
}

int Subprocess::Stop(int signal) {
  if (pid_ <= 0) return exit_code_;
  kill(pid_, signal);
  int code = WaitForExit(absl::Seconds(20));
  if (code == -1) {
    kill(pid_, SIGKILL);
    code = WaitForExit(absl::Seconds(10));
  }
  return code;
}

uint64_t Subprocess::RssBytes() const {
  if (pid_ <= 0) return 0;
  std::ifstream status(absl::StrCat("/proc/", pid_, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

std::string ReadLog(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace moe::testing
