#include "coordinator/rebalancer.h"

#include "absl/time/clock.h"
#include "coordinator/placement.h"
#include "glog/logging.h"

namespace moe {

Rebalancer::Rebalancer(GrpcTransport* transport, const ExpertLoadCounter* load,
                       const RebalanceOptions& options)
    : transport_(transport), load_(load), options_(options) {
  if (options_.interval <= absl::ZeroDuration()) return;
  thread_ = std::thread([this] {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(&stop_), options_.interval);
        if (stop_) return;
      }
      Check(absl::Now());
    }
  });
}

Rebalancer::~Rebalancer() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

int64_t Rebalancer::generation() const {
  absl::MutexLock lock(&mu_);
  return generation_;
}

bool Rebalancer::Check(absl::Time now) {
  history_.emplace_back(now, load_->Snapshot());
  // Keep the newest snapshot at least `window` old as the window's start.
  while (history_.size() > 2 && history_[1].first <= now - options_.window) history_.pop_front();
  const auto& [start, oldest] = history_.front();
  const auto& newest = history_.back().second;
  std::vector<std::vector<int64_t>> tokens(newest.size());
  uint64_t total = 0;
  for (size_t l = 0; l < newest.size(); ++l) {
    for (size_t e = 0; e < newest[l].size(); ++e) {
      const uint64_t n = newest[l][e] - oldest[l][e];
      tokens[l].push_back(static_cast<int64_t>(n));
      total += n;
    }
  }
  if (total == 0) return false;
  std::vector<ExpertRange> loaded;
  for (const WorkerSnapshot& w : transport_->Workers()) loaded.push_back(w.experts);
  const Placement current = transport_->placement();
  absl::StatusOr<Placement> candidate = BalancedPlacement(tokens, loaded);
  if (!candidate.ok()) return false;
  const double before = MeanImbalance(current, tokens);
  const double after = MeanImbalance(*candidate, tokens);
  if (after <= 0 || before < after * (1 + options_.min_gain)) return false;
  if (absl::Status s = transport_->SetPlacement(*candidate); !s.ok()) {
    LOG(WARNING) << "rebalance not applied: " << s;
    return false;
  }
  int64_t generation;
  {
    absl::MutexLock lock(&mu_);
    generation = ++generation_;
  }
  LOG(INFO) << "rebalanced (placement generation " << generation << "): the busiest worker of a "
            << "layer gets " << before << "x the mean of the last "
            << absl::FormatDuration(now - start) << "'s " << total << " routed tokens, " << after
            << "x with the new placement";
  return true;
}

}  // namespace moe
