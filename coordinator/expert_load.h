// Tokens routed to each (layer, expert): the data behind the expert-load table of the status API
// and the Grafana heatmap. The router's decisions are counted in a plain array during a step
// and published once at its end (no per-token atomics or metric calls on the hot path).
#ifndef MOE_COORDINATOR_EXPERT_LOAD_H_
#define MOE_COORDINATOR_EXPERT_LOAD_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "coordinator/engine.h"

namespace moe {

// Thread-safety: OnRouting/OnStepEnd from the engine's thread; Snapshot from any thread.
class ExpertLoadCounter : public RoutingObserver {
 public:
  // Called at the end of every step with that step's counts, [layer * experts + expert], and
  // its rerouted tokens per layer (OnDegraded) (all zero for a failed step, whose tokens are
  // not counted), on the engine's thread.
  using StepListener = std::function<void(bool ok, std::span<const uint64_t> step_counts,
                                          std::span<const uint64_t> degraded_per_layer)>;

  ExpertLoadCounter(int64_t layers, int64_t experts)
      : experts_(experts),
        layers_(layers),
        step_(layers * experts, 0),
        degraded_(layers, 0),
        totals_(new std::atomic<uint64_t>[layers * experts]()) {}

  // Set before the engine runs.
  void set_step_listener(StepListener listener) { listener_ = std::move(listener); }

  void OnRouting(int64_t layer, const Routing& routing) override {
    uint64_t* row = &step_[layer * experts_];
    for (int32_t e : routing.experts) {
      if (e >= 0) ++row[e];  // -1: an unused slot (Routing)
    }
  }

  void OnDegraded(int64_t layer, int64_t tokens) override {
    degraded_[layer] += static_cast<uint64_t>(tokens);
  }

  void OnStepEnd(bool ok) override {
    if (!ok) {
      std::fill(step_.begin(), step_.end(), 0);
      std::fill(degraded_.begin(), degraded_.end(), 0);
    }
    for (size_t i = 0; i < step_.size(); ++i) {
      if (step_[i] != 0) totals_[i].fetch_add(step_[i], std::memory_order_relaxed);
    }
    if (listener_) listener_(ok, step_, degraded_);
    std::fill(step_.begin(), step_.end(), 0);
    std::fill(degraded_.begin(), degraded_.end(), 0);
  }

  // [layer][expert] token counts of the completed steps since start.
  std::vector<std::vector<uint64_t>> Snapshot() const {
    std::vector<std::vector<uint64_t>> out(layers_, std::vector<uint64_t>(experts_));
    for (int64_t l = 0; l < layers_; ++l) {
      for (int64_t e = 0; e < experts_; ++e) {
        out[l][e] = totals_[l * experts_ + e].load(std::memory_order_relaxed);
      }
    }
    return out;
  }

 private:
  const int64_t experts_;
  const int64_t layers_;
  std::vector<uint64_t> step_;      // this step's counts, engine thread only
  std::vector<uint64_t> degraded_;  // this step's rerouted tokens per layer, engine thread only
  std::unique_ptr<std::atomic<uint64_t>[]> totals_;
  StepListener listener_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_EXPERT_LOAD_H_
