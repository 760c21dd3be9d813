// Runs a server binary as a child process for multi-process tests: waits for its
// "READY HOST:PORT" line on stdout (no sleeps), kills it on destruction (and, through
// PR_SET_PDEATHSIG, if the test process dies first).
#ifndef MOE_TESTS_TESTUTIL_SUBPROCESS_H_
#define MOE_TESTS_TESTUTIL_SUBPROCESS_H_

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moe::testing {

class Subprocess {
 public:
  Subprocess() = default;
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  // Starts `binary` with `args`; stderr goes to `log_path` (or is inherited when empty).
  absl::Status Start(const std::string& binary, const std::vector<std::string>& args,
                     const std::string& log_path = "");
  // Reads stdout until a line "READY <address>"; returns the address. DEADLINE_EXCEEDED if the
  // line does not come in time, or the exit status if the process ends first.
  absl::StatusOr<std::string> WaitForReady(absl::Duration timeout);
  // The value of a "KEY VALUE" line printed before READY (e.g. "HTTP"), "" when none was.
  std::string Announced(const std::string& key) const;
  // Sends `signal` and waits for the exit; returns the exit code (128 + signal if killed).
  int Stop(int signal);
  // Waits for the process to exit on its own; returns the exit code, or -1 on timeout.
  int WaitForExit(absl::Duration timeout);
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  // Resident set size in bytes (from /proc), 0 if not running.
  uint64_t RssBytes() const;

 private:
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string buffered_;
  std::map<std::string, std::string> announced_;
  int exit_code_ = -1;
};

// The file at `path` as a string ("" when unreadable): for printing a child's log on failure.
std::string ReadLog(const std::string& path);

}  // namespace moe::testing

#endif  // MOE_TESTS_TESTUTIL_SUBPROCESS_H_
