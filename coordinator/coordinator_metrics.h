// The coordinator's Prometheus metrics (names and meanings: docs/metrics.md).
//
// Hot-path events arrive through plain observer interfaces and reach prometheus-cpp at most once
// per engine step: routing counts per step from ExpertLoadCounter and per-layer exchange reports
// from the transport are accumulated in plain arrays and published at the step's end
// (OnStepEnd); token counts and latencies come from the Scheduler once per step (OnStep),
// binned locally and published with one call per histogram; request outcomes once per request.
// Gauges that are cheapest to read when asked (running/waiting requests, KV cache usage, worker up,
// the imbalance window) are computed at scrape time. Label cardinality: layers x experts for the
// expert counters, workers for the dispatch series, all created at start so every series exists (as
// 0) from the first scrape.
#ifndef MOE_COORDINATOR_COORDINATOR_METRICS_H_
#define MOE_COORDINATOR_COORDINATOR_METRICS_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/metrics/metrics.h"
#include "common/model_config.h"
#include "coordinator/scheduler.h"
#include "coordinator/transport/dispatch.h"
#include "coordinator/transport/expert_transport.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"

namespace moe {

// Counts over a sliding time window, per (layer, expert): the basis of
// moe_layer_expert_imbalance_ratio. The window is `buckets` slots of `slot` each; a slot older
// than the window is dropped when time reaches it again. Thread-safe.
class ExpertLoadWindow {
 public:
  using Clock = std::chrono::steady_clock;
  ExpertLoadWindow(int64_t layers, int64_t experts, Clock::duration slot, int buckets);

  void Add(std::span<const uint64_t> counts, Clock::time_point now);  // [layer * experts + e]
  // max / mean tokens per expert of each layer over the window; 0 for a layer with no tokens.
  std::vector<double> ImbalanceRatios(Clock::time_point now) const;

 private:
  int64_t Epoch(Clock::time_point t) const { return t.time_since_epoch() / slot_; }

  const int64_t layers_, experts_;
  const Clock::duration slot_;
  const int buckets_;
  mutable absl::Mutex mu_;
  std::vector<int64_t> epoch_ ABSL_GUARDED_BY(mu_);    // [buckets], slot epoch held, -1 = none
  std::vector<uint64_t> counts_ ABSL_GUARDED_BY(mu_);  // [buckets, layers * experts]
};

class CoordinatorMetrics : public SchedulerObserver, public DispatchObserver {
 public:
  // Read at scrape time, from the HTTP thread; must be thread-safe.
  struct Sources {
    std::function<Scheduler::Stats()> scheduler_stats;
    std::function<std::vector<WorkerSnapshot>()> workers;
  };
  // The worker label of transport index i is the address of sources.workers()[i].
  CoordinatorMetrics(const ModelConfig& config, Sources sources);

  std::shared_ptr<prometheus::Collectable> collectable() { return registry_; }

  // At the end of every engine step, on the stepping thread (ExpertLoadCounter's listener):
  // publishes the step's expert counts, rerouted tokens per layer and everything the other
  // hooks accumulated.
  void OnStepEnd(bool ok, std::span<const uint64_t> expert_counts,
                 std::span<const uint64_t> degraded_per_layer);
  // A Generate call refused before it was queued (bad request, queue full). Any thread.
  void OnRejected();

  // SchedulerObserver (stepping thread; OnRequestFinished also from the scheduler's owner
  // when it shuts down).
  void OnStep(const StepReport& report) override;
  void OnRequestFinished(RequestOutcome outcome, double seconds) override;
  // DispatchObserver (stepping thread).
  void OnDispatch(std::span<const DispatchReport> reports) override;

 private:
  prometheus::Family<prometheus::Gauge>* info_ = nullptr;
  struct WorkerSeries {
    prometheus::Histogram* duration;
    prometheus::Counter* bytes_sent;
    prometheus::Counter* bytes_received;
    prometheus::Counter* rows;
    prometheus::Gauge* up;
    prometheus::Gauge* info;  // moe_worker_info{device, transport} as last seen
    std::string device, transport;
    HistogramBatch batch{DispatchBuckets()};
    double pending_sent = 0, pending_received = 0, pending_rows = 0;
  };
  void Refresh();

  const int64_t layers_, experts_;
  const Sources sources_;
  std::shared_ptr<RefreshingRegistry> registry_;
  ExpertLoadWindow window_;

  std::vector<prometheus::Counter*> expert_tokens_;  // [layer * experts + expert]
  std::vector<prometheus::Gauge*> imbalance_;        // [layer]
  std::vector<prometheus::Counter*> degraded_;       // [layer]
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* preemptions_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* outcome_[4];  // by RequestOutcome
  prometheus::Counter* rejected_;
  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* kv_usage_;
  prometheus::Histogram* ttft_;
  prometheus::Histogram* itl_;
  prometheus::Histogram* duration_;
  std::vector<std::unique_ptr<WorkerSeries>> workers_;  // by transport index
  // Per exchange, the rows of the worker that got the most (stepping thread; published per
  // step): with moe_dispatch_rows_total, how even a step's work is over the workers.
  prometheus::Counter* busiest_rows_;
  double pending_busiest_ = 0;

  // Stepping thread only: this step's observations.
  HistogramBatch ttft_batch_{TimeToFirstTokenBuckets()};
  HistogramBatch itl_batch_{InterTokenLatencyBuckets()};
};

}  // namespace moe

#endif  // MOE_COORDINATOR_COORDINATOR_METRICS_H_
