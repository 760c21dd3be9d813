#include "coordinator/scheduler.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "coordinator/local_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/test_helpers.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

constexpr char kFixture[] = "tests/testdata/models/mixtral_32e_gqa_fp16";

// Records everything a request receives. Thread-safe; `on_tokens` (if set) runs on the
// scheduler's thread after each OnTokens, with the token count so far.
class RecordingSink : public GenerationSink {
 public:
  explicit RecordingSink(absl::BlockingCounter* all_done = nullptr) : all_done_(all_done) {}

  void OnTokens(std::span<const int32_t> tokens, std::string_view text, const TokenRoutes* routes,
                std::span<const TokenLogprobs> logprobs) override {
    size_t count;
    {
      absl::MutexLock lock(&mu_);
      tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
      logprobs_.insert(logprobs_.end(), logprobs.begin(), logprobs.end());
      streamed_ += text;
      if (routes != nullptr) routes_.push_back(*routes);
      count = tokens_.size();
    }
    if (on_tokens) on_tokens(count);
  }
  void OnFinished(const absl::Status& status, const GenerationOutput& output) override {
    {
      absl::MutexLock lock(&mu_);
      status_ = status;
      output_ = output;
      ++finished_;
    }
    done_.Notify();  // a second call would crash here: exactly once
    if (all_done_ != nullptr) all_done_->DecrementCount();
  }

  void Wait() { done_.WaitForNotification(); }
  bool done() const { return done_.HasBeenNotified(); }
  absl::Status status() const {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  GenerationOutput output() const {
    absl::MutexLock lock(&mu_);
    return output_;
  }
  std::vector<int32_t> tokens() const {
    absl::MutexLock lock(&mu_);
    return tokens_;
  }
  std::string streamed() const {
    absl::MutexLock lock(&mu_);
    return streamed_;
  }
  std::vector<TokenRoutes> routes() const {
    absl::MutexLock lock(&mu_);
    return routes_;
  }
  std::vector<TokenLogprobs> logprobs() const {
    absl::MutexLock lock(&mu_);
    return logprobs_;
  }

  std::function<void(size_t tokens_so_far)> on_tokens;

 private:
  absl::BlockingCounter* all_done_;
  mutable absl::Mutex mu_;
  std::vector<int32_t> tokens_ ABSL_GUARDED_BY(mu_);
  std::string streamed_ ABSL_GUARDED_BY(mu_);
  std::vector<TokenRoutes> routes_ ABSL_GUARDED_BY(mu_);
  std::vector<TokenLogprobs> logprobs_ ABSL_GUARDED_BY(mu_);
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  GenerationOutput output_ ABSL_GUARDED_BY(mu_);
  int finished_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Notification done_;
};

// Counts the rows (tokens) of every engine step.
class StepRowCounter : public RoutingObserver {
 public:
  void OnRouting(int64_t layer, const Routing& routing) override {
    if (layer == 0) rows.push_back(routing.tokens);
  }
  std::vector<int64_t> rows;
};

using testing::FailingTransport;

struct Solo {
  GenerationOutput output;
  std::string streamed;
};

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override { Load({}); }
  void Load(const KvCacheOptions& kv) {
    LocalModelOptions options;
    options.model_dir = kFixture;
    options.engine.kv_cache = kv;
    auto m = LocalModel::Create(options);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    engine_ = model_->engine();
  }
  const Tokenizer* tokenizer() { return model_->tokenizer(); }

  GenerationRequest Request(const std::string& text, int64_t max_tokens) {
    return testing::FixedLengthRequest(*tokenizer(), text, max_tokens);
  }
  // What the request gets alone.
  Solo RunSolo(const GenerationRequest& r) {
    Solo solo;
    auto out = Generate(engine_, tokenizer(), {&r, 1},
                        [&](size_t, int32_t, std::string_view d) { solo.streamed += d; });
    EXPECT_TRUE(out.ok()) << out.status();
    if (out.ok()) solo.output = (*out)[0];
    return solo;
  }
  static void ExpectSameAsSolo(const RecordingSink& sink, const Solo& solo,
                               const std::string& what) {
    EXPECT_TRUE(sink.status().ok()) << what << ": " << sink.status();
    EXPECT_EQ(sink.output().tokens, solo.output.tokens) << what;
    EXPECT_EQ(sink.tokens(), solo.output.tokens) << what;
    EXPECT_EQ(sink.output().text, solo.output.text) << what;
    EXPECT_EQ(sink.streamed(), solo.streamed) << what;
    EXPECT_EQ(sink.output().finish, solo.output.finish) << what;
  }
  static void RunUntilIdle(Scheduler* s) {
    while (s->StepOnce()) {
    }
  }

  // Eight requests with different prompts, lengths and sampling; one ends on a stop string.
  std::vector<GenerationRequest> MixedRequests() {
    const char* texts[] = {"We hold these truths",
                           "Congress shall make no law",
                           "Hi",
                           "Four score and seven years ago our fathers",
                           "When in the course of human events",
                           "Liberty",
                           "To be or not",
                           "It was the best of times, it was the worst of times"};
    std::vector<GenerationRequest> requests;
    for (int i = 0; i < 8; ++i) {
      requests.push_back(Request(texts[i], 4 + 3 * i));
      if (i % 2 == 1) {
        requests.back().params.sampling = {.temperature = 0.7f + 0.1f * i,
                                           .top_k = 20 * i,
                                           .top_p = 0.9f,
                                           .repetition_penalty = 1.1f,
                                           .seed = static_cast<uint64_t>(100 + i)};
      }
    }
    // A stop string taken from request 4's own greedy text.
    const std::string text = RunSolo(requests[4]).output.text;
    EXPECT_GE(text.size(), 10u);
    requests[4].params.stop = {text.substr(5, 3), "never appears"};
    return requests;
  }

  std::unique_ptr<LocalModel> model_;
  Engine* engine_ = nullptr;
};

TEST_F(SchedulerTest, RequestsJoinAndLeaveTheBatchAndGetTheirSoloTokens) {
  const std::vector<GenerationRequest> requests = MixedRequests();
  std::vector<Solo> solo;
  for (const GenerationRequest& r : requests) solo.push_back(RunSolo(r));
  EXPECT_EQ(solo[4].output.finish, FinishReason::kStop);

  Scheduler scheduler(engine_, tokenizer(), {.max_running = 3});
  std::vector<RecordingSink> sinks(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(scheduler.Submit(requests[i], &sinks[i]).ok());
  }
  EXPECT_EQ(scheduler.stats().waiting, 8);
  int64_t steps_with_full_batch = 0;
  while (scheduler.StepOnce()) {
    const Scheduler::Stats stats = scheduler.stats();
    EXPECT_LE(stats.running, 3);
    if (stats.running == 3) ++steps_with_full_batch;
  }
  EXPECT_GT(steps_with_full_batch, 5);  // the batch was refilled as requests left
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(sinks[i].done());
    ExpectSameAsSolo(sinks[i], solo[i], "request " + std::to_string(i));
  }
  const Scheduler::Stats stats = scheduler.stats();
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.waiting, 0);
  EXPECT_EQ(stats.kv_used_blocks, 0);
  EXPECT_EQ(stats.kv_total_blocks, engine_->kv_cache().num_blocks());
}

TEST_F(SchedulerTest, LogprobsStreamWithTheirTokensAndScoringAloneSamplesNothing) {
  // A scoring-only request (max_tokens = 0, all prompt logits) batched with a generating one
  // that streams logprobs: rows of both are laid out right and the generator gets its solo
  // tokens.
  GenerationRequest gen = Request("We hold these truths", 6);
  gen.params.logprobs = 2;
  GenerationRequest score = Request("Four score and seven years ago", 0);
  score.params.max_tokens = 0;
  score.params.prompt_logprobs = 1;
  const Solo solo = RunSolo(gen);
  const Solo scored = RunSolo(score);
  Scheduler scheduler(engine_, tokenizer(), {});
  RecordingSink gen_sink, score_sink;
  ASSERT_TRUE(scheduler.Submit(score, &score_sink).ok());
  ASSERT_TRUE(scheduler.Submit(gen, &gen_sink).ok());
  RunUntilIdle(&scheduler);
  ExpectSameAsSolo(gen_sink, solo, "generating request");
  const std::vector<TokenLogprobs> streamed = gen_sink.logprobs();
  ASSERT_EQ(streamed.size(), solo.output.tokens.size());
  ASSERT_EQ(gen_sink.output().logprobs.size(), streamed.size());
  for (size_t i = 0; i < streamed.size(); ++i) {
    EXPECT_EQ(streamed[i].token, solo.output.tokens[i]) << i;
    EXPECT_EQ(streamed[i].logprob, gen_sink.output().logprobs[i].logprob) << i;
    EXPECT_NEAR(streamed[i].logprob, solo.output.logprobs[i].logprob, 1e-4) << i;
    ASSERT_EQ(streamed[i].top.size(), 2u);
    EXPECT_EQ(streamed[i].top[0].token, streamed[i].token) << "greedy picks the most likely";
    EXPECT_LE(streamed[i].logprob, 0.0f);
  }
  ASSERT_TRUE(score_sink.status().ok()) << score_sink.status();
  EXPECT_TRUE(score_sink.tokens().empty());
  EXPECT_EQ(score_sink.output().finish, FinishReason::kLength);
  ASSERT_EQ(score_sink.output().prompt_logprobs.size(), score.prompt.size() - 1);
  for (size_t i = 0; i + 1 < score.prompt.size(); ++i) {
    EXPECT_EQ(score_sink.output().prompt_logprobs[i].token, score.prompt[i + 1]);
    EXPECT_NEAR(score_sink.output().prompt_logprobs[i].logprob,
                scored.output.prompt_logprobs[i].logprob, 1e-4)
        << i;
  }
  EXPECT_EQ(scheduler.stats().kv_used_blocks, 0);
}

TEST_F(SchedulerTest, RequestSubmittedMidDecodeJoinsAndEqualsSolo) {
  const GenerationRequest a = Request("We hold these truths", 20);
  GenerationRequest b = Request("Congress shall make no law", 16);
  b.params.sampling = {.temperature = 1.0f, .seed = 3};
  const GenerationRequest c = Request("Four score and seven", 10);
  const Solo solo_a = RunSolo(a), solo_b = RunSolo(b), solo_c = RunSolo(c);

  Scheduler scheduler(engine_, tokenizer(), {});
  RecordingSink sink_a, sink_b, sink_c;
  ASSERT_TRUE(scheduler.Submit(a, &sink_a).ok());
  ASSERT_TRUE(scheduler.Submit(b, &sink_b).ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(scheduler.StepOnce());
  EXPECT_EQ(sink_a.tokens().size(), 5u);
  ASSERT_TRUE(scheduler.Submit(c, &sink_c).ok());
  ASSERT_TRUE(scheduler.StepOnce());  // c's prefill alongside a's and b's decodes
  EXPECT_EQ(sink_a.tokens().size(), 6u);
  EXPECT_EQ(sink_c.tokens().size(), 1u);
  RunUntilIdle(&scheduler);
  ExpectSameAsSolo(sink_a, solo_a, "a");
  ExpectSameAsSolo(sink_b, solo_b, "b");
  ExpectSameAsSolo(sink_c, solo_c, "c");
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

TEST_F(SchedulerTest, FullQueueAndInvalidRequestsAreRefused) {
  Scheduler scheduler(engine_, tokenizer(), {.max_running = 1, .max_waiting = 2});
  RecordingSink ok1, ok2, refused;
  ASSERT_TRUE(scheduler.Submit(Request("one", 3), &ok1).ok());
  ASSERT_TRUE(scheduler.Submit(Request("two", 3), &ok2).ok());
  auto full = scheduler.Submit(Request("three", 3), &refused);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.status().message(), HasSubstr("max_waiting = 2"));

  GenerationRequest bad = Request("x", 3);
  bad.params.sampling.temperature = -1;
  auto invalid = scheduler.Submit(bad, &refused);
  EXPECT_EQ(invalid.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(invalid.status().message(), HasSubstr("temperature"));
  bad = Request("x", 0);
  invalid = scheduler.Submit(bad, &refused);
  EXPECT_EQ(invalid.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(invalid.status().message(), HasSubstr("max_tokens"));

  RunUntilIdle(&scheduler);
  EXPECT_TRUE(ok1.status().ok());
  EXPECT_TRUE(ok2.status().ok());
  EXPECT_FALSE(refused.done());  // refused requests never reach their sink

  EXPECT_THAT(ValidateSchedulerOptions({.max_running = 0}).message(), HasSubstr("max_running"));
  EXPECT_THAT(ValidateSchedulerOptions({.max_step_tokens = 0}).message(),
              HasSubstr("max_step_tokens"));
}

TEST_F(SchedulerTest, CancelFreesTheBlocksAndLeavesOthersAlone) {
  Load({.block_size = 64});  // each sequence here fits one block
  const GenerationRequest a = Request("We hold these truths", 30);
  const Solo solo_a = RunSolo(a);
  Scheduler scheduler(engine_, tokenizer(), {.max_running = 2});
  RecordingSink sink_a, sink_b, sink_c;
  ASSERT_TRUE(scheduler.Submit(a, &sink_a).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(scheduler.StepOnce());
  const int64_t before = scheduler.stats().kv_used_blocks;
  EXPECT_EQ(before, 1);

  auto b = scheduler.Submit(Request("Congress shall make no law", 30), &sink_b);
  auto c = scheduler.Submit(Request("Liberty", 30), &sink_c);  // waits: max_running = 2
  ASSERT_TRUE(b.ok() && c.ok());
  // The client goes away after b's third token (from inside the sink, as a handler might).
  sink_b.on_tokens = [&](size_t n) {
    if (n == 3) scheduler.Cancel(*b);
  };
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(scheduler.StepOnce());
  EXPECT_EQ(scheduler.stats().kv_used_blocks, 2);
  EXPECT_FALSE(sink_b.done());
  scheduler.Cancel(*c);
  scheduler.Cancel(*c);     // repeating is harmless
  scheduler.Cancel(12345);  // unknown ids are ignored
  ASSERT_TRUE(scheduler.StepOnce());
  ASSERT_TRUE(sink_b.done());
  ASSERT_TRUE(sink_c.done());
  EXPECT_EQ(sink_b.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(sink_b.tokens().size(), 3u);
  EXPECT_EQ(sink_c.status().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(sink_c.tokens().empty());
  EXPECT_EQ(scheduler.stats().kv_used_blocks, before);
  EXPECT_EQ(scheduler.stats().running, 1);
  EXPECT_EQ(scheduler.stats().waiting, 0);
  RunUntilIdle(&scheduler);
  scheduler.Cancel(*b);  // finished: ignored
  ExpectSameAsSolo(sink_a, solo_a, "a");
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

TEST_F(SchedulerTest, StepsStayWithinTheTokenBudgetExceptALoneLongPrompt) {
  StepRowCounter counter;
  engine_->AddRoutingObserver(&counter);
  Scheduler scheduler(engine_, tokenizer(), {.max_running = 8, .max_step_tokens = 16});
  std::vector<RecordingSink> sinks(6);
  for (int i = 0; i < 5; ++i) {
    GenerationRequest r;
    r.prompt.assign(10, 100 + i);  // 10 tokens
    r.params.max_tokens = 6;
    ASSERT_TRUE(scheduler.Submit(r, &sinks[i]).ok());
  }
  GenerationRequest long_prompt;
  long_prompt.prompt.assign(40, 7);
  long_prompt.params.max_tokens = 3;
  ASSERT_TRUE(scheduler.Submit(long_prompt, &sinks[5]).ok());
  RunUntilIdle(&scheduler);
  int over_budget = 0;
  for (int64_t rows : counter.rows) {
    if (rows <= 16) continue;
    ++over_budget;
    EXPECT_GE(rows, 40);      // the long prompt ...
    EXPECT_LT(rows, 40 + 8);  // ... plus at most the decodes, no other prefill
  }
  EXPECT_EQ(over_budget, 1);
  // One 10-token prefill per step at most: at least five steps before the long prompt ran.
  EXPECT_GE(counter.rows.size(), 5u + 3u);
  for (const RecordingSink& s : sinks) EXPECT_TRUE(s.status().ok()) << s.status();
}

// Forwards to another transport with some experts "lost": LiveExperts reports them, and an
// Exchange that routes a token to one fails as the dispatcher would. LoseAt(n, experts): the
// n-th Exchange from now loses them and fails (a worker dying mid-exchange).
class LossyTransport : public ExpertTransport {
 public:
  LossyTransport(ExpertTransport* inner, int64_t experts) : inner_(inner), live_(experts, 1) {}
  absl::Status Exchange(int64_t layer, const Routing& routing, const float* x,
                        float* out) override {
    ++exchanges;
    if (lose_in_ > 0 && --lose_in_ == 0) {
      for (int32_t e : pending_) live_[e] = 0;
      return absl::UnavailableError("expert worker y failed");
    }
    for (int32_t e : routing.experts) {
      if (!live_[e]) return absl::UnavailableError(absl::StrCat("expert ", e, " is lost"));
    }
    return inner_->Exchange(layer, routing, x, out);
  }
  bool LiveExperts(int64_t, std::vector<char>* live) override {
    if (std::find(live_.begin(), live_.end(), 0) == live_.end()) return true;
    *live = live_;
    return false;
  }
  void Lose(const std::vector<int32_t>& experts) {
    for (int32_t e : experts) live_[e] = 0;
  }
  void LoseAt(int n, std::vector<int32_t> experts) {
    lose_in_ = n;
    pending_ = std::move(experts);
  }
  int exchanges = 0;

 private:
  ExpertTransport* inner_;
  std::vector<char> live_;
  int lose_in_ = 0;
  std::vector<int32_t> pending_;
};

TEST_F(SchedulerTest, RerouteRoutesAroundLostExpertsAndCountsTheRows) {
  const int64_t experts = model_->config().num_local_experts;
  LossyTransport transport(model_->transport(), experts);
  EngineOptions options;
  options.on_expert_loss = ExpertLossPolicy::kReroute;
  auto engine = Engine::Create(&model_->weights(), &transport, options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const std::vector<int32_t> prompt =
      tokenizer()->Encode("We hold these truths to be self-evident");
  const int64_t rows = static_cast<int64_t>(prompt.size());
  std::vector<float> logits, exact;

  // Nothing lost: the exact model, nothing counted.
  SequenceState a;
  StepInput in{&a, prompt, false};
  ASSERT_TRUE((*engine)->Step({&in, 1}, &exact).ok());
  EXPECT_EQ((*engine)->degraded_rows()[0], 0);
  (*engine)->Release(&a);

  // Half the experts lost: every routed expert is live (the transport would refuse others),
  // some rows are counted, the logits differ from the exact model's.
  std::vector<int32_t> half;
  for (int32_t e = 0; e < experts; e += 2) half.push_back(e);
  transport.Lose(half);
  SequenceState b;
  in = {&b, prompt, false};
  ASSERT_TRUE((*engine)->Step({&in, 1}, &logits).ok());
  EXPECT_GT((*engine)->degraded_rows()[0], 0);
  EXPECT_LE((*engine)->degraded_rows()[0], rows);
  EXPECT_NE(logits, exact);
  (*engine)->Release(&b);

  // A worker dies in the middle of a step: the layer is routed around it and retried.
  LossyTransport midway(model_->transport(), experts);
  auto engine2 = Engine::Create(&model_->weights(), &midway, options);
  ASSERT_TRUE(engine2.ok());
  midway.LoseAt(2, half);
  SequenceState c;
  in = {&c, prompt, false};
  ASSERT_TRUE((*engine2)->Step({&in, 1}, &logits).ok());
  EXPECT_GT((*engine2)->degraded_rows()[0], 0);
  EXPECT_EQ(midway.exchanges, model_->config().num_hidden_layers + 1);  // one retry
  (*engine2)->Release(&c);

  // Fewer live experts than top-k: nothing to route to.
  std::vector<int32_t> all_but_one;
  for (int32_t e = 0; e < experts; ++e) {
    if (e != 1) all_but_one.push_back(e);
  }
  transport.Lose(all_but_one);
  SequenceState d;
  in = {&d, prompt, false};
  const absl::Status s = (*engine)->Step({&in, 1}, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("only 1 of " + std::to_string(experts) + " experts"));
  EXPECT_EQ(d.length, 0);
}

TEST_F(SchedulerTest, FailPolicyNeverReroutes) {
  LossyTransport transport(model_->transport(), model_->config().num_local_experts);
  auto engine = Engine::Create(&model_->weights(), &transport, {});
  ASSERT_TRUE(engine.ok());
  transport.Lose({0, 1, 2, 3});
  const std::vector<int32_t> prompt =
      tokenizer()->Encode("We hold these truths to be self-evident");
  SequenceState a;
  StepInput in{&a, prompt, false};
  std::vector<float> logits;
  const absl::Status s = (*engine)->Step({&in, 1}, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("is lost"));
}

// A worker that takes 1 ms per exchange (2 ms per step of the 2-layer fixture).
class SlowTransport : public ExpertTransport {
 public:
  explicit SlowTransport(ExpertTransport* inner) : inner_(inner) {}
  absl::Status Exchange(int64_t layer, const Routing& routing, const float* x,
                        float* out) override {
    absl::SleepFor(absl::Milliseconds(1));
    return inner_->Exchange(layer, routing, x, out);
  }

 private:
  ExpertTransport* inner_;
};

TEST_F(SchedulerTest, DeadlineEndsQueuedAndRunningRequestsAndFreesTheirBlocks) {
  SlowTransport slow(model_->transport());
  auto engine = Engine::Create(&model_->weights(), &slow, {});
  ASSERT_TRUE(engine.ok());
  Scheduler scheduler(engine->get(), tokenizer(), {.max_running = 1});
  RecordingSink running, queued, unbounded;
  // 200 tokens take at least 400 ms; the deadline comes after 100 ms.
  GenerationRequest r = Request("We hold these truths", 200);
  r.deadline = absl::Now() + absl::Milliseconds(100);
  ASSERT_TRUE(scheduler.Submit(r, &running).ok());
  GenerationRequest q = Request("Four score", 8);
  q.deadline = absl::Now() + absl::Milliseconds(50);  // waits behind `running` (max_running 1)
  ASSERT_TRUE(scheduler.Submit(q, &queued).ok());
  while (!running.done()) ASSERT_TRUE(scheduler.StepOnce());
  EXPECT_EQ(running.status().code(), absl::StatusCode::kDeadlineExceeded) << running.status();
  EXPECT_THAT(running.status().message(), HasSubstr("deadline passed after"));
  EXPECT_GT(running.tokens().size(), 0u);
  EXPECT_LT(running.tokens().size(), 200u);
  ASSERT_TRUE(queued.done());
  EXPECT_EQ(queued.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(queued.status().message(), HasSubstr("before its first token"));
  EXPECT_EQ((*engine)->kv_cache().used_blocks(), 0);
  // Requests without a deadline are untouched.
  ASSERT_TRUE(scheduler.Submit(Request("Liberty", 4), &unbounded).ok());
  while (!unbounded.done()) ASSERT_TRUE(scheduler.StepOnce());
  EXPECT_TRUE(unbounded.status().ok()) << unbounded.status();
}

TEST_F(SchedulerTest, TransportFailureFailsTheStepAndTheSchedulerGoesOn) {
  FailingTransport transport(model_->transport());
  auto engine = Engine::Create(&model_->weights(), &transport, {});
  ASSERT_TRUE(engine.ok()) << engine.status();
  engine_ = engine->get();
  const GenerationRequest waiting = Request("Liberty", 8);
  const GenerationRequest later = Request("Four score and seven", 8);
  const Solo solo_waiting = RunSolo(waiting), solo_later = RunSolo(later);

  Scheduler scheduler(engine_, tokenizer(), {.max_running = 2});
  RecordingSink a, b, c, d;
  ASSERT_TRUE(scheduler.Submit(Request("We hold these truths", 20), &a).ok());
  ASSERT_TRUE(scheduler.Submit(Request("Congress shall", 20), &b).ok());
  ASSERT_TRUE(scheduler.Submit(waiting, &c).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(scheduler.StepOnce());
  transport.FailAt(2);  // the second layer of the next step
  ASSERT_TRUE(scheduler.StepOnce());
  for (RecordingSink* s : {&a, &b}) {
    ASSERT_TRUE(s->done());
    EXPECT_EQ(s->status().code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(s->status().message(), HasSubstr("expert worker x failed"));
    EXPECT_EQ(s->tokens().size(), 3u);
  }
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
  EXPECT_EQ(scheduler.stats().running, 0);
  EXPECT_FALSE(c.done());
  ASSERT_TRUE(scheduler.Submit(later, &d).ok());
  RunUntilIdle(&scheduler);
  ExpectSameAsSolo(c, solo_waiting, "waiting");
  ExpectSameAsSolo(d, solo_later, "later");
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

// Counts what the scheduler reports.
class CountingObserver : public SchedulerObserver {
 public:
  void OnStep(const StepReport& report) override { preempted += report.preempted; }
  void OnRequestFinished(RequestOutcome, double) override {}
  int64_t preempted = 0;
};

TEST_F(SchedulerTest, KvPressurePreemptsAndEveryRequestStillGetsItsSoloOutput) {
  // 16 blocks of 4 tokens; six requests of ~25 tokens each need ~42 blocks together, and each
  // fits alone. The youngest are preempted and resume by prefilling their tokens again; every
  // request completes with exactly the tokens it gets alone (sampled ones too: same seed, same
  // logits).
  Load({.block_size = 4, .num_blocks = 16});
  const char* texts[] = {
      "We hold these truths", "Congress shall make no law", "Hi there",
      "Four score and seven", "When in the course",         "Liberty and justice"};
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 6; ++i) {
    requests.push_back(Request(texts[i], 18 + i));
    if (i % 2 == 1) {
      requests.back().params.sampling = {.temperature = 0.8f, .seed = static_cast<uint64_t>(i)};
    }
  }
  requests[2].params.logprobs = 2;
  std::vector<Solo> solo;
  for (const GenerationRequest& r : requests) solo.push_back(RunSolo(r));
  Scheduler scheduler(engine_, tokenizer(), {});
  CountingObserver observer;
  scheduler.set_observer(&observer);
  std::vector<RecordingSink> sinks(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(scheduler.Submit(requests[i], &sinks[i]).ok());
  }
  RunUntilIdle(&scheduler);
  for (size_t i = 0; i < requests.size(); ++i) {
    ExpectSameAsSolo(sinks[i], solo[i], "request " + std::to_string(i));
  }
  ASSERT_EQ(sinks[2].output().logprobs.size(), solo[2].output.logprobs.size());
  for (size_t t = 0; t < solo[2].output.logprobs.size(); ++t) {
    EXPECT_EQ(sinks[2].output().logprobs[t].logprob, solo[2].output.logprobs[t].logprob) << t;
  }
  EXPECT_GT(observer.preempted, 0);
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

TEST_F(SchedulerTest, OnlyASequenceOutgrowingTheWholeCacheFails) {
  Load({.block_size = 4, .num_blocks = 8});
  const GenerationRequest a = Request("We hold these truths", 12);
  const Solo solo_a = RunSolo(a);
  Scheduler scheduler(engine_, tokenizer(), {});
  RecordingSink sink_a, sink_b, too_long;
  GenerationRequest huge;
  huge.prompt.assign(40, 5);
  auto refused = scheduler.Submit(huge, &too_long);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(scheduler.Submit(a, &sink_a).ok());
  ASSERT_TRUE(scheduler.Submit(Request("Congress shall make no law", 30), &sink_b).ok());
  RunUntilIdle(&scheduler);
  EXPECT_EQ(sink_b.status().code(), absl::StatusCode::kResourceExhausted);
  ExpectSameAsSolo(sink_a, solo_a, "a");
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

TEST_F(SchedulerTest, ThreadedSubmitsFromManyThreads) {
  const std::vector<GenerationRequest> requests = MixedRequests();
  std::vector<Solo> solo;
  for (const GenerationRequest& r : requests) solo.push_back(RunSolo(r));
  Scheduler scheduler(engine_, tokenizer(), {.max_running = 3});
  scheduler.Start();
  absl::BlockingCounter all_done(static_cast<int>(requests.size()));
  std::vector<std::unique_ptr<RecordingSink>> sinks;
  for (size_t i = 0; i < requests.size(); ++i) {
    sinks.push_back(std::make_unique<RecordingSink>(&all_done));
  }
  std::vector<std::thread> clients;
  for (size_t t = 0; t < 4; ++t) {
    clients.emplace_back([&, t] {
      for (size_t i = t; i < requests.size(); i += 4) {
        EXPECT_TRUE(scheduler.Submit(requests[i], sinks[i].get()).ok());
        (void)scheduler.stats();
      }
    });
  }
  for (std::thread& c : clients) c.join();
  all_done.Wait();
  scheduler.Stop();
  for (size_t i = 0; i < requests.size(); ++i) {
    ExpectSameAsSolo(*sinks[i], solo[i], "request " + std::to_string(i));
  }
  EXPECT_EQ(scheduler.stats().running, 0);
  EXPECT_EQ(scheduler.stats().kv_used_blocks, 0);
}

TEST_F(SchedulerTest, DestructionFinishesRequestsInFlight) {
  std::vector<RecordingSink> sinks(3);
  absl::Notification started;
  sinks[0].on_tokens = [&](size_t n) {
    if (n == 2) started.Notify();
  };
  {
    Scheduler scheduler(engine_, tokenizer(), {.max_running = 2});
    scheduler.Start();
    for (RecordingSink& s : sinks) {
      ASSERT_TRUE(scheduler.Submit(Request("We hold these truths", 200), &s).ok());
    }
    started.WaitForNotification();
  }
  for (const RecordingSink& s : sinks) {
    ASSERT_TRUE(s.done());
    EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(s.status().message(), HasSubstr("shutting down"));
  }
  EXPECT_TRUE(sinks[2].tokens().empty());  // never admitted
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

TEST_F(SchedulerTest, TraceRoutingReportsEachTokensExperts) {
  GenerationRequest traced = Request("We hold these truths", 6);
  traced.params.trace_routing = true;
  const Solo solo = RunSolo(traced);
  // The first token's routing is that of the prompt's last row.
  class LastRow : public RoutingObserver {
   public:
    void OnRouting(int64_t, const Routing& routing) override {
      const int64_t k = routing.top_k;
      experts.insert(experts.end(), routing.experts.end() - k, routing.experts.end());
    }
    std::vector<int32_t> experts;  // [layers, top_k]
  } last_row;
  engine_->AddRoutingObserver(&last_row);
  SequenceState seq;
  const StepInput prefill{&seq, traced.prompt, false};
  std::vector<float> logits;
  ASSERT_TRUE(engine_->Step({&prefill, 1}, &logits).ok());
  engine_->Release(&seq);
  // Alone, then batched with another prompt prefilling and decoding alongside: the routes of
  // the row that produced each token must not change.
  std::vector<std::vector<TokenRoutes>> runs;
  for (bool batched : {false, true}) {
    Load({});  // a fresh engine: a scheduler that traced stays among its engine's observers
    Scheduler scheduler(engine_, tokenizer(), {});
    RecordingSink sink, other;
    if (batched) {
      ASSERT_TRUE(scheduler.Submit(Request("Congress shall make no law at all", 8), &other).ok());
      ASSERT_TRUE(scheduler.StepOnce());
    }
    ASSERT_TRUE(scheduler.Submit(traced, &sink).ok());
    RunUntilIdle(&scheduler);
    ExpectSameAsSolo(sink, solo, batched ? "batched" : "alone");
    EXPECT_TRUE(other.routes().empty());  // not asked for
    runs.push_back(sink.routes());
  }
  const ModelConfig& c = model_->config();
  ASSERT_EQ(runs[0].size(), solo.output.tokens.size());
  EXPECT_EQ(runs[0][0].experts, last_row.experts);
  for (size_t t = 0; t < runs[0].size(); ++t) {
    const TokenRoutes& r = runs[0][t];
    ASSERT_EQ(r.layers, c.num_hidden_layers);
    ASSERT_EQ(r.top_k, c.num_experts_per_tok);
    ASSERT_EQ(r.experts.size(), static_cast<size_t>(r.layers * r.top_k));
    for (int64_t l = 0; l < r.layers; ++l) {
      float sum = 0;
      for (int64_t k = 0; k < r.top_k; ++k) {
        const size_t i = l * r.top_k + k;
        EXPECT_GE(r.experts[i], 0);
        EXPECT_LT(r.experts[i], c.num_local_experts);
        sum += r.weights[i];
      }
      EXPECT_NEAR(sum, 1.0f, 1e-5f) << "token " << t << " layer " << l;
      EXPECT_NE(r.experts[l * r.top_k], r.experts[l * r.top_k + 1]);
    }
    EXPECT_EQ(r.experts, runs[1][t].experts) << "token " << t;
    for (size_t i = 0; i < r.weights.size(); ++i) {
      EXPECT_NEAR(r.weights[i], runs[1][t].weights[i], 1e-5f) << "token " << t;
    }
  }
}

}  // namespace
}  // namespace moe
