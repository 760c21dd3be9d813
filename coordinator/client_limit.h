// A bound on the requests one client (host address) holds open at once, shared by the public
// gRPC and HTTP APIs, so that one client cannot take every generation slot.
#ifndef MOE_COORDINATOR_CLIENT_LIMIT_H_
#define MOE_COORDINATOR_CLIENT_LIMIT_H_

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace moe {

// Thread-safe.
class ClientLimit {
 public:
  // `max_per_client` <= 0: no bound.
  explicit ClientLimit(int max_per_client) : max_(max_per_client) {}

  // Held while a request is open; releases on destruction.
  class Slot {
   public:
    ~Slot() { limit_->Release(client_); }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

   private:
    friend class ClientLimit;
    Slot(ClientLimit* limit, std::string client) : limit_(limit), client_(std::move(client)) {}
    ClientLimit* limit_;
    std::string client_;
  };

  // A slot for `client`, or RESOURCE_EXHAUSTED naming the flag when it holds max_per_client.
  absl::Status Acquire(const std::string& client, std::unique_ptr<Slot>* slot)
      ABSL_LOCKS_EXCLUDED(mu_);

  // "ipv4:1.2.3.4:5678" / "ipv6:[::1]:5678" / "1.2.3.4:5678" -> the address without its port.
  static std::string HostOf(const std::string& peer);

 private:
  void Release(const std::string& client) ABSL_LOCKS_EXCLUDED(mu_);

  const int max_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, int> open_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_COORDINATOR_CLIENT_LIMIT_H_
