#include "expert_worker/worker_metrics.h"

#include <string>

namespace moe {

WorkerMetrics::WorkerMetrics(int64_t layers, const ExpertRange& hosted)
    : hosted_(hosted.size()), registry_(std::make_shared<RefreshingRegistry>()) {
  prometheus::Registry& r = registry_->registry();
  AddBuildInfo(&r, "worker");
  auto& rows = prometheus::BuildCounter()
                   .Name("moe_worker_rows_total")
                   .Help(
                       "Rows computed by this worker per layer and hosted expert (one per "
                       "token routed to the expert)")
                   .Register(r);
  rows_.reserve(layers * hosted_);
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t e = hosted.begin; e < hosted.end; ++e) {
      rows_.push_back(&rows.Add({{"layer", std::to_string(l)}, {"expert", std::to_string(e)}}));
    }
  }
  forward_ = &prometheus::BuildHistogram()
                  .Name("moe_worker_forward_duration_seconds")
                  .Help("Seconds to check and compute one Forward message (one layer step)")
                  .Register(r)
                  .Add({}, DispatchBuckets());
}

void WorkerMetrics::OnForward(int64_t layer, std::span<const int64_t> rows_per_expert,
                              double seconds) {
  prometheus::Counter* const* row = &rows_[layer * hosted_];
  for (size_t e = 0; e < rows_per_expert.size(); ++e) {
    if (rows_per_expert[e] != 0) row[e]->Increment(static_cast<double>(rows_per_expert[e]));
  }
  forward_->Observe(seconds);
}

}  // namespace moe
