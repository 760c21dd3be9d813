// The coordinator's metrics against what actually ran: a real scheduler and engine on a
// transformers-generated fixture, the counts checked against the requests and the router.
#include "coordinator/coordinator_metrics.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "coordinator/expert_load.h"
#include "coordinator/local_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/counter.h"
#include "tests/coordinator/test_helpers.h"
#include "tests/testutil/http.h"

namespace moe {
namespace {

using ::moe::testing::HttpGet;

constexpr char kFixture[] = "tests/testdata/models/mixtral_32e_gqa_fp16";

// name{k="v",...} (labels sorted by name) -> value for counters and gauges; histograms as
// name_count / name_sum and name_bucket{le=...} (cumulative), like the text format.
std::map<std::string, double> Scrape(const prometheus::Collectable& source) {
  std::map<std::string, double> out;
  for (const prometheus::MetricFamily& f : source.Collect()) {
    for (const prometheus::ClientMetric& m : f.metric) {
      std::string labels;
      for (const prometheus::ClientMetric::Label& l : m.label) {
        labels += (labels.empty() ? "" : ",") + l.name + "=\"" + l.value + "\"";
      }
      const std::string suffix = labels.empty() ? "" : "{" + labels + "}";
      switch (f.type) {
        case prometheus::MetricType::Counter:
          out[f.name + suffix] = m.counter.value;
          break;
        case prometheus::MetricType::Gauge:
          out[f.name + suffix] = m.gauge.value;
          break;
        case prometheus::MetricType::Histogram: {
          out[f.name + "_count" + suffix] = static_cast<double>(m.histogram.sample_count);
          out[f.name + "_sum" + suffix] = m.histogram.sample_sum;
          for (const auto& b : m.histogram.bucket) {
            const std::string le =
                std::isinf(b.upper_bound) ? "+Inf" : std::to_string(b.upper_bound);
            out[f.name + "_bucket{" + labels + (labels.empty() ? "" : ",") + "le=\"" + le + "\"}"] =
                static_cast<double>(b.cumulative_count);
          }
          break;
        }
        default:
          break;
      }
    }
  }
  return out;
}

double SumWithPrefix(const std::map<std::string, double>& m, const std::string& prefix) {
  double s = 0;
  for (const auto& [k, v] : m) {
    if (k.rfind(prefix, 0) == 0) s += v;
  }
  return s;
}

TEST(HistogramBatchTest, BinsLikeObserveWithInclusiveUpperBounds) {
  const std::vector<double> bounds = {1.0, 2.0};
  auto registry = std::make_shared<prometheus::Registry>();
  auto& family = prometheus::BuildHistogram().Name("h").Help("h").Register(*registry);
  prometheus::Histogram& batched = family.Add({{"k", "batched"}}, bounds);
  prometheus::Histogram& direct = family.Add({{"k", "direct"}}, bounds);
  HistogramBatch batch(bounds);
  for (double v : {0.5, 1.0, 1.5, 2.0, 3.0}) {
    batch.Add(v);
    direct.Observe(v);
  }
  batch.Publish(&batched);
  batch.Publish(&batched);  // nothing pending: no change
  const auto m = Scrape(*registry);
  EXPECT_EQ(m.at("h_bucket{k=\"batched\",le=\"1.000000\"}"), 2);  // 0.5 and 1.0 (le is <=)
  EXPECT_EQ(m.at("h_bucket{k=\"batched\",le=\"2.000000\"}"), 4);
  EXPECT_EQ(m.at("h_bucket{k=\"batched\",le=\"+Inf\"}"), 5);
  EXPECT_EQ(m.at("h_count{k=\"batched\"}"), 5);
  EXPECT_DOUBLE_EQ(m.at("h_sum{k=\"batched\"}"), 8.0);
  for (const char* le : {"1.000000", "2.000000", "+Inf"}) {
    const std::string suffix = std::string(",le=\"") + le + "\"}";
    EXPECT_EQ(m.at("h_bucket{k=\"batched\"" + suffix), m.at("h_bucket{k=\"direct\"" + suffix));
  }
}

TEST(ExpertLoadWindowTest, MaxOverMeanPerLayerOverTheWindow) {
  using Clock = ExpertLoadWindow::Clock;
  const Clock::time_point t0(std::chrono::seconds(1000));
  ExpertLoadWindow window(3, 4, std::chrono::seconds(1), 3);  // a 3 s window
  // layer 0: everything on expert 2; layer 1: even; layer 2: nothing.
  window.Add(std::vector<uint64_t>{0, 0, 8, 0, 2, 2, 2, 2, 0, 0, 0, 0}, t0);
  EXPECT_THAT(window.ImbalanceRatios(t0), ::testing::ElementsAre(4.0, 1.0, 0.0));
  // One second later layer 0 gets an even load: (8+1, 1, 1, 1) -> max 9 / mean 3.
  window.Add(std::vector<uint64_t>{1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0},
             t0 + std::chrono::seconds(1));
  EXPECT_THAT(window.ImbalanceRatios(t0 + std::chrono::seconds(1)),
              ::testing::ElementsAre(3.0, 1.0, 0.0));
  // At t0 + 3 s the first slot has left the window; at t0 + 4 s everything has.
  EXPECT_THAT(window.ImbalanceRatios(t0 + std::chrono::seconds(3)),
              ::testing::ElementsAre(1.0, 0.0, 0.0));
  EXPECT_THAT(window.ImbalanceRatios(t0 + std::chrono::seconds(4)),
              ::testing::ElementsAre(0.0, 0.0, 0.0));
  // A slot reused after wrapping around starts from zero, not from its old counts.
  window.Add(std::vector<uint64_t>{0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0},
             t0 + std::chrono::seconds(3));
  EXPECT_THAT(window.ImbalanceRatios(t0 + std::chrono::seconds(3)),
              ::testing::ElementsAre(2.5, 0.0, 0.0));  // (1,1,1,5): 5 / 2
}

using testing::FailingTransport;

class NullSink : public GenerationSink {
 public:
  void OnTokens(std::span<const int32_t>, std::string_view, const TokenRoutes*,
                std::span<const TokenLogprobs>) override {}
  void OnFinished(const absl::Status& status, const GenerationOutput& output) override {
    this->status = status;
    tokens = static_cast<int64_t>(output.tokens.size());
  }
  absl::Status status;
  int64_t tokens = -1;
};

class CoordinatorMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    LocalModelOptions options;
    options.model_dir = kFixture;
    auto m = LocalModel::Create(options);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    transport_ = std::make_unique<FailingTransport>(model_->transport());
    auto engine = Engine::Create(&model_->weights(), transport_.get(), {});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    const ModelConfig& c = model_->config();
    load_ = std::make_unique<ExpertLoadCounter>(c.num_hidden_layers, c.num_local_experts);
    engine_->AddRoutingObserver(load_.get());
    scheduler_ = std::make_unique<Scheduler>(engine_.get(), model_->tokenizer(),
                                             SchedulerOptions{.max_running = 4});
    Scheduler* scheduler = scheduler_.get();
    const int64_t experts = c.num_local_experts;
    metrics_ = std::make_unique<CoordinatorMetrics>(
        c, CoordinatorMetrics::Sources{
               [scheduler]() { return scheduler->stats(); },
               [experts]() {
                 return std::vector<WorkerSnapshot>{{"in-process", true, {0, experts}, ""}};
               }});
    CoordinatorMetrics* metrics = metrics_.get();
    load_->set_step_listener(
        [metrics](bool ok, std::span<const uint64_t> counts, std::span<const uint64_t> degraded) {
          metrics->OnStepEnd(ok, counts, degraded);
        });
    scheduler_->set_observer(metrics);
  }
  void TearDown() override {
    scheduler_.reset();
    if (engine_) engine_->RemoveRoutingObserver(load_.get());
  }

  GenerationRequest Request(const std::string& text, int64_t max_tokens) {
    return testing::FixedLengthRequest(*model_->tokenizer(), text, max_tokens);
  }
  void RunUntilIdle() {
    while (scheduler_->StepOnce()) {
    }
  }
  // Σ tokens the router sent to experts, from the counter the status API reads.
  double RoutedTotal() {
    double total = 0;
    for (const auto& layer : load_->Snapshot()) {
      total += std::accumulate(layer.begin(), layer.end(), 0.0);
    }
    return total;
  }

  std::unique_ptr<LocalModel> model_;
  std::unique_ptr<FailingTransport> transport_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<ExpertLoadCounter> load_;
  std::unique_ptr<CoordinatorMetrics> metrics_;
  std::unique_ptr<Scheduler> scheduler_;
};

TEST_F(CoordinatorMetricsTest, CountsMatchTheRequestsAndTheRouter) {
  const ModelConfig& c = model_->config();
  const std::vector<GenerationRequest> requests = {Request("We hold these truths", 5),
                                                   Request("Hi", 3),
                                                   Request("Four score and seven years ago", 1)};
  std::vector<NullSink> sinks(requests.size());
  int64_t prompt = 0, generated = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    prompt += static_cast<int64_t>(requests[i].prompt.size());
    generated += requests[i].params.max_tokens;
    ASSERT_TRUE(scheduler_->Submit(requests[i], &sinks[i]).ok());
  }
  RunUntilIdle();
  for (const NullSink& s : sinks) ASSERT_TRUE(s.status.ok()) << s.status;

  const auto m = Scrape(*metrics_->collectable());
  EXPECT_EQ(m.at("moe_prompt_tokens_total"), prompt);
  EXPECT_EQ(m.at("moe_generation_tokens_total"), generated);
  EXPECT_EQ(m.at("moe_requests_total{outcome=\"length\"}"), 3);
  EXPECT_EQ(m.at("moe_requests_total{outcome=\"stop\"}"), 0);
  EXPECT_EQ(m.at("moe_time_to_first_token_seconds_count"), 3);
  EXPECT_EQ(m.at("moe_inter_token_latency_seconds_count"), generated - 3);
  EXPECT_EQ(m.at("moe_request_duration_seconds_count"), 3);
  EXPECT_GT(m.at("moe_request_duration_seconds_sum"), 0);
  // The last token of each request is sampled but never run through the model.
  const double routed =
      static_cast<double>((prompt + generated - 3) * c.num_experts_per_tok * c.num_hidden_layers);
  EXPECT_EQ(SumWithPrefix(m, "moe_expert_tokens_total{"), routed);
  EXPECT_EQ(RoutedTotal(), routed);
  // Per cell, the same as the status API's table.
  const auto table = load_->Snapshot();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int64_t e = 0; e < c.num_local_experts; ++e) {
      EXPECT_EQ(m.at("moe_expert_tokens_total{expert=\"" + std::to_string(e) + "\",layer=\"" +
                     std::to_string(l) + "\"}"),
                static_cast<double>(table[l][e]))
          << "layer " << l << " expert " << e;
    }
  }
  // Scrape-time gauges: idle now; the imbalance of each layer is max/mean of its window.
  EXPECT_EQ(m.at("moe_requests_running"), 0);
  EXPECT_EQ(m.at("moe_requests_waiting"), 0);
  EXPECT_EQ(m.at("moe_kv_cache_usage_ratio"), 0);
  EXPECT_EQ(m.at("moe_worker_up{worker=\"in-process\"}"), 1);
  EXPECT_EQ(m.at("moe_worker_info{device=\"cpu\",transport=\"grpc\",worker=\"in-process\"}"), 1);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const auto& row = table[l];
    const double total = std::accumulate(row.begin(), row.end(), 0.0);
    const double max = static_cast<double>(*std::max_element(row.begin(), row.end()));
    EXPECT_DOUBLE_EQ(m.at("moe_layer_expert_imbalance_ratio{layer=\"" + std::to_string(l) + "\"}"),
                     max * c.num_local_experts / total);
  }
  bool build_info = false;
  for (const auto& [k, v] : m) {
    if (k.rfind("moe_build_info{", 0) == 0) {
      build_info = true;
      EXPECT_EQ(v, 1);
      EXPECT_THAT(k, ::testing::HasSubstr("role=\"coordinator\""));
    }
  }
  EXPECT_TRUE(build_info);
}

TEST_F(CoordinatorMetricsTest, GaugesShowRunningAndWaitingAtScrapeTime) {
  std::vector<NullSink> sinks(6);
  for (NullSink& s : sinks) ASSERT_TRUE(scheduler_->Submit(Request("Liberty", 4), &s).ok());
  auto m = Scrape(*metrics_->collectable());
  EXPECT_EQ(m.at("moe_requests_waiting"), 6);
  EXPECT_EQ(m.at("moe_requests_running"), 0);
  ASSERT_TRUE(scheduler_->StepOnce());  // admits max_running = 4
  m = Scrape(*metrics_->collectable());
  EXPECT_EQ(m.at("moe_requests_running"), 4);
  EXPECT_EQ(m.at("moe_requests_waiting"), 2);
  EXPECT_GT(m.at("moe_kv_cache_usage_ratio"), 0);
  EXPECT_LE(m.at("moe_kv_cache_usage_ratio"), 1);
  RunUntilIdle();
}

TEST_F(CoordinatorMetricsTest, CancelledAndFailedRequestsAndFailedStepsAreNotCounted) {
  const ModelConfig& c = model_->config();
  NullSink cancelled, failed;
  auto id = scheduler_->Submit(Request("To be or not", 4), &cancelled);
  ASSERT_TRUE(id.ok());
  scheduler_->Cancel(*id);
  RunUntilIdle();
  EXPECT_TRUE(absl::IsCancelled(cancelled.status));

  const GenerationRequest r = Request("It was the best of times", 6);
  ASSERT_TRUE(scheduler_->Submit(r, &failed).ok());
  ASSERT_TRUE(scheduler_->StepOnce());  // prefill + first token
  ASSERT_TRUE(scheduler_->StepOnce());  // second token
  transport_->FailAt(2);                // the next step fails at layer 1 of 2
  RunUntilIdle();
  EXPECT_TRUE(absl::IsUnavailable(failed.status)) << failed.status;
  EXPECT_EQ(failed.tokens, 2);

  const auto m = Scrape(*metrics_->collectable());
  EXPECT_EQ(m.at("moe_requests_total{outcome=\"cancelled\"}"), 1);
  EXPECT_EQ(m.at("moe_requests_total{outcome=\"error\"}"), 1);
  EXPECT_EQ(m.at("moe_request_duration_seconds_count"), 2);
  EXPECT_EQ(m.at("moe_generation_tokens_total"), 2);
  const int64_t prompt = static_cast<int64_t>(r.prompt.size());
  EXPECT_EQ(m.at("moe_prompt_tokens_total"), prompt);
  // The failed step routed layer 0 before failing: not counted, so the identity still holds.
  const double routed =
      static_cast<double>((prompt + 2 - 1) * c.num_experts_per_tok * c.num_hidden_layers);
  EXPECT_EQ(SumWithPrefix(m, "moe_expert_tokens_total{"), routed);
  EXPECT_EQ(RoutedTotal(), routed);
}

TEST_F(CoordinatorMetricsTest, DispatchReportsArePublishedPerWorkerAtTheStepEnd) {
  const ModelConfig& c = model_->config();
  // A coordinator with two named workers; reports arrive per layer, publish at the step end.
  CoordinatorMetrics metrics(c,
                             CoordinatorMetrics::Sources{
                                 [] {
                                   return Scheduler::Stats{0, 0, 0, 1};
                                 },
                                 [] {
                                   return std::vector<WorkerSnapshot>{
                                       {"w0:1",
                                        true,
                                        {0, 16},
                                        "",
                                        false,
                                        "cuda:0 (NVIDIA H200, BF16 "
                                        "weights, 1.00 GiB)",
                                        "grpc/bf16"},
                                       {"w1:1", false, {16, 32}, "down", false, "cpu", "grpc/f32"}};
                                 }});
  const DispatchReport layer0[] = {{0, 0.002, 100, 50, 3}, {1, 0.004, 200, 80, 5}};
  const DispatchReport layer1[] = {{0, 0.003, 10, 5, 1}};
  metrics.OnDispatch(layer0);
  metrics.OnDispatch(layer1);
  auto m = Scrape(*metrics.collectable());
  EXPECT_EQ(m.at("moe_dispatch_rows_total{worker=\"w0:1\"}"), 0);  // not yet: step not ended
  std::vector<uint64_t> none(c.num_hidden_layers * c.num_local_experts, 0);
  metrics.OnStepEnd(/*ok=*/false, none, std::vector<uint64_t>(c.num_hidden_layers, 0));
  // (exchanges happened even if the step failed)
  m = Scrape(*metrics.collectable());
  EXPECT_EQ(m.at("moe_dispatch_rows_total{worker=\"w0:1\"}"), 4);
  EXPECT_EQ(m.at("moe_dispatch_rows_total{worker=\"w1:1\"}"), 5);
  // The busiest worker of each exchange: 5 (layer 0), then 1 (layer 1).
  EXPECT_EQ(m.at("moe_dispatch_busiest_worker_rows_total"), 6);
  EXPECT_EQ(m.at("moe_dispatch_bytes_total{direction=\"sent\",worker=\"w0:1\"}"), 110);
  EXPECT_EQ(m.at("moe_dispatch_bytes_total{direction=\"received\",worker=\"w0:1\"}"), 55);
  EXPECT_EQ(m.at("moe_dispatch_bytes_total{direction=\"sent\",worker=\"w1:1\"}"), 200);
  EXPECT_EQ(m.at("moe_dispatch_duration_seconds_count{worker=\"w0:1\"}"), 2);
  EXPECT_DOUBLE_EQ(m.at("moe_dispatch_duration_seconds_sum{worker=\"w0:1\"}"), 0.005);
  EXPECT_EQ(m.at("moe_dispatch_duration_seconds_count{worker=\"w1:1\"}"), 1);
  EXPECT_EQ(m.at("moe_worker_up{worker=\"w0:1\"}"), 1);
  EXPECT_EQ(m.at("moe_worker_up{worker=\"w1:1\"}"), 0);
  EXPECT_EQ(m.at("moe_worker_info{device=\"cuda:0 (NVIDIA H200, BF16 weights, 1.00 GiB)\","
                 "transport=\"grpc/bf16\",worker=\"w0:1\"}"),
            1);
  EXPECT_EQ(m.at("moe_worker_info{device=\"cpu\",transport=\"grpc/f32\",worker=\"w1:1\"}"), 1);
  metrics.OnRejected();
  m = Scrape(*metrics.collectable());
  EXPECT_EQ(m.at("moe_requests_total{outcome=\"rejected\"}"), 1);
  // Label cardinality: layers x experts expert series, one imbalance series per layer.
  int expert_series = 0, imbalance_series = 0;
  for (const auto& [k, v] : m) {
    expert_series += k.rfind("moe_expert_tokens_total{", 0) == 0;
    imbalance_series += k.rfind("moe_layer_expert_imbalance_ratio{", 0) == 0;
  }
  EXPECT_EQ(expert_series, c.num_hidden_layers * c.num_local_experts);
  EXPECT_EQ(imbalance_series, c.num_hidden_layers);
}

TEST(MetricsServerTest, ServesTheTextFormatOnAFreePortAndRefusesABusyOne) {
  auto registry = std::make_shared<RefreshingRegistry>();
  int refreshed = 0;
  auto& g = prometheus::BuildGauge()
                .Name("moe_test_gauge")
                .Help("t")
                .Register(registry->registry())
                .Add({});
  registry->set_refresh([&] { g.Set(++refreshed); });
  auto server = MetricsServer::Start("127.0.0.1:0", {registry});
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_THAT((*server)->address(), ::testing::StartsWith("127.0.0.1:"));
  EXPECT_THAT((*server)->address(), ::testing::Not(::testing::EndsWith(":0")));
  // Two scrapes over HTTP: the text format, refreshed per scrape.
  for (int scrape = 1; scrape <= 2; ++scrape) {
    const std::string body = HttpGet((*server)->address(), "/metrics");
    EXPECT_THAT(body, ::testing::HasSubstr("HTTP/1.1 200"));
    EXPECT_THAT(body, ::testing::HasSubstr("# TYPE moe_test_gauge gauge"));
    EXPECT_THAT(body, ::testing::HasSubstr("moe_test_gauge " + std::to_string(scrape) + "\n"));
  }
  auto busy = MetricsServer::Start((*server)->address(), {registry});
  ASSERT_FALSE(busy.ok());
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(busy.status().message()), ::testing::HasSubstr((*server)->address()));
  auto bad = MetricsServer::Start("no-port", {registry});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moe
