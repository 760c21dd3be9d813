// Prometheus plumbing shared by the coordinator and the expert workers: the /metrics HTTP
// endpoint, moe_build_info, a registry that refreshes scrape-time gauges, and a histogram batch
// that bins a step's observations in a plain array and publishes them with one call.
//
// Hot-path rule: per-token or per-row events are accumulated in plain arrays by their owner and
// published into prometheus-cpp objects once per engine step (or per worker message).
#ifndef MOE_COMMON_METRICS_METRICS_H_
#define MOE_COMMON_METRICS_METRICS_H_

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"
#include "prometheus/exposer.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace moe {

// Bucket boundaries (seconds) of the latency histograms.
const std::vector<double>& TimeToFirstTokenBuckets();   // 5 ms .. 120 s
const std::vector<double>& InterTokenLatencyBuckets();  // 1 ms .. 10 s
const std::vector<double>& RequestDurationBuckets();    // 50 ms .. 30 min
const std::vector<double>& DispatchBuckets();           // 50 us .. 10 s (one layer exchange)

// A registry whose Collect() first runs `refresh` (on the HTTP thread, once per scrape): for
// gauges that are cheapest to read when asked, such as queue lengths and worker health.
class RefreshingRegistry : public prometheus::Collectable {
 public:
  prometheus::Registry& registry() { return registry_; }
  // Set before the registry is exposed. Must be thread-safe with respect to its sources.
  void set_refresh(std::function<void()> refresh) { refresh_ = std::move(refresh); }
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  prometheus::Registry registry_;
  std::function<void()> refresh_;
};

// moe_build_info{version, revision, role} = 1.
void AddBuildInfo(prometheus::Registry* registry, std::string_view role);

// The /metrics endpoint (text exposition format 0.0.4) on HOST:PORT.
class MetricsServer {
 public:
  // Binds `listen` (HOST:PORT, validated by the caller; port 0 picks a free port) and serves
  // every collectable at /metrics. UNAVAILABLE when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& listen, std::vector<std::shared_ptr<prometheus::Collectable>> sources);
  ~MetricsServer();

  // HOST:PORT actually bound.
  const std::string& address() const { return address_; }

 private:
  MetricsServer() = default;
  std::vector<std::shared_ptr<prometheus::Collectable>> sources_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string address_;
};

// Observations of one step binned into a plain array; Publish() hands them to the histogram in
// one call and resets. Not thread-safe (one per producer).
class HistogramBatch {
 public:
  explicit HistogramBatch(const std::vector<double>& bounds)
      : bounds_(bounds), counts_(bounds.size() + 1, 0.0) {}
  void Add(double value);
  void Publish(prometheus::Histogram* histogram);

 private:
  const std::vector<double>& bounds_;
  std::vector<double> counts_;  // [bounds + 1], the last is +Inf
  double sum_ = 0;
  int64_t n_ = 0;
};

}  // namespace moe

#endif  // MOE_COMMON_METRICS_METRICS_H_
