// Live rebalancing: from the router's load over a sliding window, a placement that spreads each
// layer's tokens evenly over the workers that loaded its experts (BalancedPlacement), applied
// between two steps when it makes the busiest worker's share smaller by at least min_gain.
// Workers keep serving throughout: they already hold every expert a placement can give them
// (their --experts ranges), so a switch is the coordinator's alone and no request waits for it.
// For models with two experts per token a switch changes no output bit (the partial sums are
// added as rounded products in expert order, kernels::Axpy).
#ifndef MOE_COORDINATOR_REBALANCER_H_
#define MOE_COORDINATOR_REBALANCER_H_

#include <cstdint>
#include <deque>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/expert_load.h"
#include "coordinator/transport/grpc_transport.h"

namespace moe {

struct RebalanceOptions {
  absl::Duration interval = absl::ZeroDuration();  // between checks; zero: off
  absl::Duration window = absl::Seconds(60);       // of recorded load each check balances
  double min_gain = 0.1;  // apply when the busiest share falls by this fraction or more
};

class Rebalancer {
 public:
  // Checks every options.interval on a thread of its own. Both must outlive it.
  Rebalancer(GrpcTransport* transport, const ExpertLoadCounter* load,
             const RebalanceOptions& options);
  ~Rebalancer();

  // One check now (the thread's step; public for tests): records the load, and applies a better
  // placement when there is one. True when it did.
  bool Check(absl::Time now);
  int64_t generation() const;

 private:
  GrpcTransport* const transport_;
  const ExpertLoadCounter* const load_;
  const RebalanceOptions options_;
  std::deque<std::pair<absl::Time, std::vector<std::vector<uint64_t>>>> history_;
  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_REBALANCER_H_
