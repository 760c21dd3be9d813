#include "common/metrics/metrics.h"

#include <algorithm>
#include <exception>

#include "absl/strings/str_cat.h"
#include "moe_revision.h"  // generated at build time: MOE_REVISION
#include "prometheus/gauge.h"

#ifndef MOE_VERSION
#define MOE_VERSION "unknown"
#endif

namespace moe {

const std::vector<double>& TimeToFirstTokenBuckets() {
  static const std::vector<double> b = {0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                                        0.3,   0.5,  0.75,  1,    1.5,   2,   3,    5,
                                        7.5,   10,   15,    20,   30,    60,  120};
  return b;
}

const std::vector<double>& InterTokenLatencyBuckets() {
  static const std::vector<double> b = {0.001, 0.0025, 0.005, 0.01,  0.015, 0.02, 0.025,
                                        0.03,  0.04,   0.05,  0.075, 0.1,   0.15, 0.2,
                                        0.3,   0.5,    0.75,  1,     2.5,   5,    10};
  return b;
}

const std::vector<double>& RequestDurationBuckets() {
  static const std::vector<double> b = {0.05, 0.1, 0.25, 0.5, 1,   2.5, 5,   10,   15,  20,
                                        30,   45,  60,   90,  120, 300, 600, 1200, 1800};
  return b;
}

const std::vector<double>& DispatchBuckets() {
  static const std::vector<double> b = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                        0.005,   0.01,   0.025,   0.05,   0.1,   0.25,
                                        0.5,     1,      2.5,     5,      10};
  return b;
}

std::vector<prometheus::MetricFamily> RefreshingRegistry::Collect() const {
  if (refresh_) refresh_();
  return registry_.Collect();
}

void AddBuildInfo(prometheus::Registry* registry, std::string_view role) {
  prometheus::BuildGauge()
      .Name("moe_build_info")
      .Help("moe-cluster build: version, git revision and process role; always 1")
      .Register(*registry)
      .Add({{"version", MOE_VERSION}, {"revision", MOE_REVISION}, {"role", std::string(role)}})
      .Set(1);
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& listen, std::vector<std::shared_ptr<prometheus::Collectable>> sources) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--metrics-listen must be HOST:PORT (e.g. 0.0.0.0:9400), got \"", listen, "\""));
  }
  std::string host = listen.substr(0, colon);
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  try {
    // civetweb takes "HOST:PORT"; IPv6 hosts come bracketed ("[::]:9400") as users write them.
    server->exposer_ = std::make_unique<prometheus::Exposer>(listen, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen,
                                               ": the port is in use or the address is not local "
                                               "(civetweb: ",
                                               e.what(), ")"));
  }
  const std::vector<int> ports = server->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen));
  }
  server->address_ = absl::StrCat(host, ":", ports.front());
  server->sources_ = std::move(sources);
  for (const auto& source : server->sources_) server->exposer_->RegisterCollectable(source);
  return server;
}

MetricsServer::~MetricsServer() = default;

void HistogramBatch::Add(double value) {
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  counts_[bucket] += 1;
  sum_ += value;
  ++n_;
}

void HistogramBatch::Publish(prometheus::Histogram* histogram) {
  if (n_ == 0) return;
  histogram->ObserveMultiple(counts_, sum_);
  std::fill(counts_.begin(), counts_.end(), 0.0);
  sum_ = 0;
  n_ = 0;
}

}  // namespace moe
