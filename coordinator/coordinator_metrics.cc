#include "coordinator/coordinator_metrics.h"

#include <algorithm>
#include <string>

#include "glog/logging.h"

namespace moe {

ExpertLoadWindow::ExpertLoadWindow(int64_t layers, int64_t experts, Clock::duration slot,
                                   int buckets)
    : layers_(layers),
      experts_(experts),
      slot_(slot),
      buckets_(buckets),
      epoch_(buckets, -1),
      counts_(buckets * layers * experts, 0) {}

void ExpertLoadWindow::Add(std::span<const uint64_t> counts, Clock::time_point now) {
  const int64_t epoch = Epoch(now);
  const int64_t cells = layers_ * experts_;
  DCHECK_EQ(static_cast<int64_t>(counts.size()), cells);
  absl::MutexLock lock(&mu_);
  const int64_t slot = epoch % buckets_;
  uint64_t* dst = &counts_[slot * cells];
  if (epoch_[slot] != epoch) {
    std::fill(dst, dst + cells, 0);
    epoch_[slot] = epoch;
  }
  for (int64_t i = 0; i < cells; ++i) dst[i] += counts[i];
}

std::vector<double> ExpertLoadWindow::ImbalanceRatios(Clock::time_point now) const {
  const int64_t epoch = Epoch(now);
  const int64_t cells = layers_ * experts_;
  std::vector<uint64_t> sum(cells, 0);
  {
    absl::MutexLock lock(&mu_);
    for (int b = 0; b < buckets_; ++b) {
      if (epoch_[b] < 0 || epoch_[b] <= epoch - buckets_) continue;  // empty or too old
      const uint64_t* src = &counts_[b * cells];
      for (int64_t i = 0; i < cells; ++i) sum[i] += src[i];
    }
  }
  std::vector<double> ratios(layers_, 0.0);
  for (int64_t l = 0; l < layers_; ++l) {
    const uint64_t* row = &sum[l * experts_];
    uint64_t total = 0, max = 0;
    for (int64_t e = 0; e < experts_; ++e) {
      total += row[e];
      max = std::max(max, row[e]);
    }
    if (total > 0) ratios[l] = static_cast<double>(max) * experts_ / static_cast<double>(total);
  }
  return ratios;
}

CoordinatorMetrics::CoordinatorMetrics(const ModelConfig& config, Sources sources)
    : layers_(config.num_hidden_layers),
      experts_(config.num_local_experts),
      sources_(std::move(sources)),
      registry_(std::make_shared<RefreshingRegistry>()),
      window_(layers_, experts_, std::chrono::seconds(5), 12) {
  prometheus::Registry& r = registry_->registry();
  AddBuildInfo(&r, "coordinator");

  auto& tokens = prometheus::BuildCounter()
                     .Name("moe_expert_tokens_total")
                     .Help(
                         "Token-to-expert assignments made by the router, per layer and expert "
                         "(each token counts top_k times per layer; completed steps only)")
                     .Register(r);
  expert_tokens_.reserve(layers_ * experts_);
  for (int64_t l = 0; l < layers_; ++l) {
    for (int64_t e = 0; e < experts_; ++e) {
      expert_tokens_.push_back(
          &tokens.Add({{"layer", std::to_string(l)}, {"expert", std::to_string(e)}}));
    }
  }
  auto& imbalance = prometheus::BuildGauge()
                        .Name("moe_layer_expert_imbalance_ratio")
                        .Help(
                            "Max over mean tokens per expert of the layer over the last 60 s "
                            "(1 = perfectly balanced, experts = one expert takes everything; "
                            "0 = no tokens in the window)")
                        .Register(r);
  auto& degraded = prometheus::BuildCounter()
                       .Name("moe_degraded_tokens_total")
                       .Help(
                           "Tokens routed around experts that had no ready worker, per layer "
                           "(--on-expert-loss reroute; completed steps only)")
                       .Register(r);
  for (int64_t l = 0; l < layers_; ++l) {
    imbalance_.push_back(&imbalance.Add({{"layer", std::to_string(l)}}));
    degraded_.push_back(&degraded.Add({{"layer", std::to_string(l)}}));
  }

  prompt_tokens_ = &prometheus::BuildCounter()
                        .Name("moe_prompt_tokens_total")
                        .Help("Prompt tokens prefilled")
                        .Register(r)
                        .Add({});
  preemptions_ = &prometheus::BuildCounter()
                      .Name("moe_preemptions_total")
                      .Help(
                          "Running sequences preempted when the KV cache ran out (their blocks "
                          "freed; they resume later by prefilling their tokens again)")
                      .Register(r)
                      .Add({});
  generation_tokens_ = &prometheus::BuildCounter()
                            .Name("moe_generation_tokens_total")
                            .Help("Tokens generated (sampled)")
                            .Register(r)
                            .Add({});
  auto& requests = prometheus::BuildCounter()
                       .Name("moe_requests_total")
                       .Help(
                           "Generate requests by outcome: stop (EOS or a stop string), length "
                           "(max_tokens), cancelled, error (a failed step or shutdown), "
                           "rejected (invalid or queue full; never queued)")
                       .Register(r);
  for (RequestOutcome o : {RequestOutcome::kStop, RequestOutcome::kLength,
                           RequestOutcome::kCancelled, RequestOutcome::kError}) {
    outcome_[static_cast<int>(o)] =
        &requests.Add({{"outcome", std::string(RequestOutcomeName(o))}});
  }
  rejected_ = &requests.Add({{"outcome", "rejected"}});
  running_ = &prometheus::BuildGauge()
                  .Name("moe_requests_running")
                  .Help("Requests in the running batch")
                  .Register(r)
                  .Add({});
  waiting_ = &prometheus::BuildGauge()
                  .Name("moe_requests_waiting")
                  .Help("Requests queued for admission")
                  .Register(r)
                  .Add({});
  kv_usage_ = &prometheus::BuildGauge()
                   .Name("moe_kv_cache_usage_ratio")
                   .Help("Fraction of the KV cache's blocks in use (0..1)")
                   .Register(r)
                   .Add({});
  ttft_ = &prometheus::BuildHistogram()
               .Name("moe_time_to_first_token_seconds")
               .Help("Seconds from a request's arrival to its first token (queueing included)")
               .Register(r)
               .Add({}, TimeToFirstTokenBuckets());
  itl_ = &prometheus::BuildHistogram()
              .Name("moe_inter_token_latency_seconds")
              .Help("Seconds between consecutive tokens of a request")
              .Register(r)
              .Add({}, InterTokenLatencyBuckets());
  duration_ = &prometheus::BuildHistogram()
                   .Name("moe_request_duration_seconds")
                   .Help("Seconds from a request's arrival to its end, any outcome but rejected")
                   .Register(r)
                   .Add({}, RequestDurationBuckets());

  auto& dispatch = prometheus::BuildHistogram()
                       .Name("moe_dispatch_duration_seconds")
                       .Help(
                           "Seconds of one layer's expert exchange with a worker (request "
                           "written to answer read)")
                       .Register(r);
  auto& bytes = prometheus::BuildCounter()
                    .Name("moe_dispatch_bytes_total")
                    .Help("Bytes of expert exchanges with a worker (serialized messages)")
                    .Register(r);
  auto& rows = prometheus::BuildCounter()
                   .Name("moe_dispatch_rows_total")
                   .Help(
                       "Token-to-expert assignments sent to a worker (equals the sum of its "
                       "moe_worker_rows_total)")
                   .Register(r);
  busiest_rows_ = &prometheus::BuildCounter()
                       .Name("moe_dispatch_busiest_worker_rows_total")
                       .Help(
                           "Summed over layer exchanges: the assignments of the worker that got "
                           "the most in that exchange. Divided by the increase of "
                           "sum(moe_dispatch_rows_total) / workers, the busiest worker's share of "
                           "a step's expert work (1 = even)")
                       .Register(r)
                       .Add({});
  auto& up = prometheus::BuildGauge()
                 .Name("moe_worker_up")
                 .Help("1 while the expert worker is connected and serving, else 0")
                 .Register(r);
  info_ = &prometheus::BuildGauge()
               .Name("moe_worker_info")
               .Help(
                   "1 per worker, labelled with where its experts run (device) and how rows "
                   "reach it (transport)")
               .Register(r);
  for (const WorkerSnapshot& w : sources_.workers()) {
    auto series = std::make_unique<WorkerSeries>();
    series->device = w.device;
    series->transport = w.transport;
    series->info =
        &info_->Add({{"worker", w.address}, {"device", w.device}, {"transport", w.transport}});
    series->info->Set(1);
    series->duration = &dispatch.Add({{"worker", w.address}}, DispatchBuckets());
    series->bytes_sent = &bytes.Add({{"worker", w.address}, {"direction", "sent"}});
    series->bytes_received = &bytes.Add({{"worker", w.address}, {"direction", "received"}});
    series->rows = &rows.Add({{"worker", w.address}});
    series->up = &up.Add({{"worker", w.address}});
    series->up->Set(w.ready ? 1 : 0);
    workers_.push_back(std::move(series));
  }
  registry_->set_refresh([this]() { Refresh(); });
}

void CoordinatorMetrics::Refresh() {
  const Scheduler::Stats stats = sources_.scheduler_stats();
  running_->Set(static_cast<double>(stats.running));
  waiting_->Set(static_cast<double>(stats.waiting));
  kv_usage_->Set(stats.kv_total_blocks > 0
                     ? static_cast<double>(stats.kv_used_blocks) / stats.kv_total_blocks
                     : 0.0);
  const std::vector<WorkerSnapshot> workers = sources_.workers();
  for (size_t i = 0; i < workers.size() && i < workers_.size(); ++i) {
    WorkerSeries& s = *workers_[i];
    s.up->Set(workers[i].ready ? 1 : 0);
    if (workers[i].device != s.device || workers[i].transport != s.transport) {
      // Restarted with another --device (or --wire-dtype): the series follows it.
      info_->Remove(s.info);
      s.device = workers[i].device;
      s.transport = workers[i].transport;
      s.info = &info_->Add(
          {{"worker", workers[i].address}, {"device", s.device}, {"transport", s.transport}});
      s.info->Set(1);
    }
  }
  const std::vector<double> ratios = window_.ImbalanceRatios(ExpertLoadWindow::Clock::now());
  for (int64_t l = 0; l < layers_; ++l) imbalance_[l]->Set(ratios[l]);
}

void CoordinatorMetrics::OnStepEnd(bool ok, std::span<const uint64_t> expert_counts,
                                   std::span<const uint64_t> degraded_per_layer) {
  if (ok) {
    for (size_t l = 0; l < degraded_per_layer.size() && l < degraded_.size(); ++l) {
      if (degraded_per_layer[l] != 0) {
        degraded_[l]->Increment(static_cast<double>(degraded_per_layer[l]));
      }
    }
    for (size_t i = 0; i < expert_counts.size(); ++i) {
      if (expert_counts[i] != 0)
        expert_tokens_[i]->Increment(static_cast<double>(expert_counts[i]));
    }
    window_.Add(expert_counts, ExpertLoadWindow::Clock::now());
  }
  // Dispatches happened whether or not the step completed.
  for (auto& w : workers_) {
    w->batch.Publish(w->duration);
    if (w->pending_sent > 0) w->bytes_sent->Increment(w->pending_sent);
    if (w->pending_received > 0) w->bytes_received->Increment(w->pending_received);
    if (w->pending_rows > 0) w->rows->Increment(w->pending_rows);
    w->pending_sent = w->pending_received = w->pending_rows = 0;
  }
  if (pending_busiest_ > 0) busiest_rows_->Increment(pending_busiest_);
  pending_busiest_ = 0;
}

void CoordinatorMetrics::OnRejected() { rejected_->Increment(); }

void CoordinatorMetrics::OnStep(const StepReport& report) {
  if (report.prompt_tokens > 0)
    prompt_tokens_->Increment(static_cast<double>(report.prompt_tokens));
  if (report.preempted > 0) preemptions_->Increment(static_cast<double>(report.preempted));
  if (report.generated_tokens > 0) {
    generation_tokens_->Increment(static_cast<double>(report.generated_tokens));
  }
  for (double s : report.time_to_first_token) ttft_batch_.Add(s);
  for (double s : report.inter_token_latency) itl_batch_.Add(s);
  ttft_batch_.Publish(ttft_);
  itl_batch_.Publish(itl_);
}

void CoordinatorMetrics::OnRequestFinished(RequestOutcome outcome, double seconds) {
  outcome_[static_cast<int>(outcome)]->Increment();
  duration_->Observe(seconds);
}

void CoordinatorMetrics::OnDispatch(std::span<const DispatchReport> reports) {
  int64_t busiest = 0;
  for (const DispatchReport& d : reports) busiest = std::max(busiest, d.assignments);
  pending_busiest_ += static_cast<double>(busiest);
  for (const DispatchReport& d : reports) {
    if (d.worker < 0 || static_cast<size_t>(d.worker) >= workers_.size()) continue;
    WorkerSeries& w = *workers_[d.worker];
    w.batch.Add(d.seconds);
    w.pending_sent += static_cast<double>(d.bytes_sent);
    w.pending_received += static_cast<double>(d.bytes_received);
    w.pending_rows += static_cast<double>(d.assignments);
  }
}

}  // namespace moe
