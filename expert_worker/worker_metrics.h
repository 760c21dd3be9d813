// An expert worker's Prometheus metrics: moe_build_info, moe_worker_rows_total{layer,expert}
// for the hosted experts, moe_worker_forward_duration_seconds. Published once per Forward
// message (one layer step), never per row.
#ifndef MOE_EXPERT_WORKER_WORKER_METRICS_H_
#define MOE_EXPERT_WORKER_WORKER_METRICS_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/expert_range.h"
#include "common/metrics/metrics.h"
#include "expert_worker/expert_service.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"

namespace moe {

// Thread-safety: OnForward may be called from every Forward stream at once.
class WorkerMetrics : public ForwardObserver {
 public:
  // Series for every layer x expert of `hosted` (a resolved range).
  WorkerMetrics(int64_t layers, const ExpertRange& hosted);

  std::shared_ptr<prometheus::Collectable> collectable() { return registry_; }
  void OnForward(int64_t layer, std::span<const int64_t> rows_per_expert, double seconds) override;

 private:
  const int64_t hosted_;
  std::shared_ptr<RefreshingRegistry> registry_;
  std::vector<prometheus::Counter*> rows_;  // [layer * hosted + (expert - hosted.begin)]
  prometheus::Histogram* forward_;
};

}  // namespace moe

#endif  // MOE_EXPERT_WORKER_WORKER_METRICS_H_
