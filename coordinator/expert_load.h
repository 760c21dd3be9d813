// Tokens routed to each (layer, expert) since start: the data behind the expert-load table and
// the Grafana heatmap. Counted once per layer step from the router's decisions.
#ifndef MOE_COORDINATOR_EXPERT_LOAD_H_
#define MOE_COORDINATOR_EXPERT_LOAD_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "coordinator/engine.h"

namespace moe {

// Thread-safety: OnRouting from the engine's thread; Snapshot from any thread.
class ExpertLoadCounter : public RoutingObserver {
 public:
  ExpertLoadCounter(int64_t layers, int64_t experts)
      : experts_(experts), counts_(new std::atomic<uint64_t>[layers * experts]()),
        layers_(layers) {}

  void OnRouting(int64_t layer, const Routing& routing) override {
    std::atomic<uint64_t>* row = &counts_[layer * experts_];
    for (int32_t e : routing.experts) row[e].fetch_add(1, std::memory_order_relaxed);
  }

  // [layer][expert] token counts.
  std::vector<std::vector<uint64_t>> Snapshot() const {
    std::vector<std::vector<uint64_t>> out(layers_, std::vector<uint64_t>(experts_));
    for (int64_t l = 0; l < layers_; ++l) {
      for (int64_t e = 0; e < experts_; ++e) {
        out[l][e] = counts_[l * experts_ + e].load(std::memory_order_relaxed);
      }
    }
    return out;
  }

 private:
  int64_t experts_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;
  int64_t layers_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_EXPERT_LOAD_H_
