#include "coordinator/scheduler.h"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace moe {

namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Moves the elements of `from` that `pred` selects to the end of `out`, keeping the order of
// both.
template <typename Container, typename Out, typename Pred>
void Extract(Container* from, Out* out, Pred pred) {
  auto keep = from->begin();
  for (auto it = from->begin(); it != from->end(); ++it) {
    if (pred(**it)) {
      out->push_back(std::move(*it));
    } else {
      if (keep != it) *keep = std::move(*it);
      ++keep;
    }
  }
  from->erase(keep, from->end());
}

using Clock = std::chrono::steady_clock;

double SecondsBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace

std::string_view RequestOutcomeName(RequestOutcome outcome) {
  switch (outcome) {
    case RequestOutcome::kStop:
      return "stop";
    case RequestOutcome::kLength:
      return "length";
    case RequestOutcome::kCancelled:
      return "cancelled";
    case RequestOutcome::kError:
      return "error";
  }
  return "error";
}

struct Scheduler::Sequence {
  Sequence(GenerationRequest r, GenerationSink* s, const Tokenizer* tokenizer,
           const ModelConfig& config)
      : request(std::move(r)),
        sink(s),
        decoder(&request, tokenizer, static_cast<int32_t>(config.vocab_size)) {
    if (request.params.trace_routing) {
      routes.layers = config.num_hidden_layers;
      routes.top_k = config.routed_experts_per_token();
      routes.experts.resize(routes.layers * routes.top_k);
      routes.weights.resize(routes.layers * routes.top_k);
    }
  }

  const GenerationRequest request;  // before decoder, which points at it
  GenerationSink* const sink;
  SequenceDecoder decoder;
  SequenceState state;
  uint64_t id = 0;
  // With trace_routing: the routing of this step's row `trace_row`, the one whose logits give
  // the next token. [layers, top_k]
  TokenRoutes routes;
  int64_t trace_row = 0;
  Clock::time_point arrival = Clock::now();  // Submit
  Clock::time_point last_token;              // when the latest token was sampled
  bool admitted = false;                     // moved from waiting_ to running_
  bool cancelled = false;                    // guarded by Scheduler::mu_
};

absl::Status ValidateSchedulerOptions(const SchedulerOptions& options) {
  if (options.max_running < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_running must be >= 1, got ", options.max_running));
  }
  if (options.max_waiting < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_waiting must be >= 0, got ", options.max_waiting));
  }
  if (options.max_step_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_step_tokens must be >= 1, got ", options.max_step_tokens));
  }
  return absl::OkStatus();
}

Scheduler::Scheduler(Engine* engine, const Tokenizer* tokenizer, const SchedulerOptions& options)
    : engine_(engine),
      tokenizer_(tokenizer),
      options_(options),
      config_(engine->config()),
      block_size_(engine->kv_cache().block_size()),
      kv_total_blocks_(engine->kv_cache().num_blocks()) {
  const absl::Status status = ValidateSchedulerOptions(options);
  CHECK(status.ok()) << status;
  inputs_.reserve(options.max_running);
  traced_.reserve(options.max_running);
  ttft_.reserve(options.max_running);
  itl_.reserve(options.max_running);
  running_.reserve(options.max_running);
}

Scheduler::~Scheduler() {
  Stop();
  if (observing_) engine_->RemoveRoutingObserver(this);
  std::vector<SequencePtr> cancelled;
  TakeCancelled(&cancelled);
  for (SequencePtr& s : cancelled) Finish(std::move(s), absl::CancelledError("cancelled"));
  std::deque<SequencePtr> waiting;
  {
    absl::MutexLock lock(&mu_);
    closed_ = true;
    waiting.swap(waiting_);
  }
  const absl::Status status = absl::UnavailableError("the scheduler is shutting down");
  std::vector<SequencePtr> running = std::move(running_);
  for (SequencePtr& s : running) Finish(std::move(s), status);
  for (SequencePtr& s : waiting) Finish(std::move(s), status);
}

absl::StatusOr<uint64_t> Scheduler::Submit(GenerationRequest request, GenerationSink* sink) {
  MOE_RETURN_IF_ERROR(ValidateGenerationRequest(request, config_));
  const int64_t prompt = static_cast<int64_t>(request.prompt.size());
  if (CeilDiv(prompt, block_size_) > kv_total_blocks_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("prompt of ", prompt, " tokens needs more than the whole KV cache (",
                     kv_total_blocks_, " blocks of ", block_size_, " tokens)"));
  }
  auto seq = std::make_unique<Sequence>(std::move(request), sink, tokenizer_, config_);
  absl::MutexLock lock(&mu_);
  if (closed_) return absl::UnavailableError("the scheduler is shutting down");
  if (draining_) {
    return absl::UnavailableError(
        "the coordinator is shutting down (draining in-flight requests); retry on another "
        "replica or later");
  }
  if (static_cast<int64_t>(waiting_.size()) >= options_.max_waiting) {
    return absl::ResourceExhaustedError(absl::StrCat(
        waiting_.size(), " requests are already waiting (max_waiting = ", options_.max_waiting,
        "); retry later"));
  }
  const uint64_t id = next_id_++;
  seq->id = id;
  if (seq->request.deadline != absl::InfiniteFuture()) ++with_deadline_;
  open_.emplace(id, seq.get());
  waiting_.push_back(std::move(seq));
  work_.Signal();
  return id;
}

void Scheduler::Cancel(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = open_.find(id);
  if (it == open_.end()) return;
  it->second->cancelled = true;
  cancel_pending_ = true;
  work_.Signal();
}

bool Scheduler::StepOnce() {
  std::vector<SequencePtr> retired;  // allocates only when something was cancelled or expired
  TakeCancelled(&retired);
  for (SequencePtr& s : retired) Finish(std::move(s), absl::CancelledError("cancelled"));
  const size_t cancelled = retired.size();
  TakeExpired(&retired);
  for (size_t i = cancelled; i < retired.size(); ++i) {
    const size_t tokens = retired[i]->decoder.output().tokens.size();
    Finish(std::move(retired[i]), absl::DeadlineExceededError(absl::StrCat(
                                      "the request's deadline passed ",
                                      tokens == 0 ? "before its first token"
                                                  : absl::StrCat("after ", tokens, " tokens"))));
  }
  if (SequencePtr unfit = Admit()) {
    // Nothing runs, so no blocks will come free for it.
    Finish(std::move(unfit),
           absl::ResourceExhaustedError("the KV cache has too few free blocks for the prompt"));
    return true;
  }
  if (running_.empty()) return !retired.empty();
  preempted_ = PreemptForSpace();
  const size_t first_prefill = BuildBatch();
  const absl::Status status = engine_->Step(inputs_, &logits_);
  traced_.clear();
  if (status.ok()) {
    Emit();
  } else {
    FailStep(status, first_prefill);
  }
  PublishKvUsage();
  return true;
}

void Scheduler::TakeCancelled(std::vector<SequencePtr>* out) {
  absl::MutexLock lock(&mu_);
  if (!cancel_pending_) return;
  cancel_pending_ = false;
  // Sequence::cancelled is guarded by mu_, held here.
  auto cancelled = [](const Sequence& s) { return s.cancelled; };
  Extract(&running_, out, cancelled);
  Extract(&waiting_, out, cancelled);
}

void Scheduler::TakeExpired(std::vector<SequencePtr>* out) {
  absl::MutexLock lock(&mu_);
  if (with_deadline_ == 0) return;
  const absl::Time now = absl::Now();
  auto expired = [now](const Sequence& s) { return s.request.deadline <= now; };
  Extract(&running_, out, expired);
  Extract(&waiting_, out, expired);
}

Scheduler::SequencePtr Scheduler::Admit() {
  int64_t budget = options_.max_step_tokens - static_cast<int64_t>(running_.size());
  int64_t free_blocks = engine_->kv_cache().free_blocks() - BlocksNeeded();
  bool prefilling = false;
  absl::MutexLock lock(&mu_);
  while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < options_.max_running) {
    // The prompt, or for a preempted sequence everything it has so far.
    const int64_t prompt = static_cast<int64_t>(waiting_.front()->decoder.NextInput().size());
    const int64_t blocks = CeilDiv(prompt, block_size_);
    // A prompt longer than the whole budget goes alone, or it would never run.
    const bool alone = !prefilling && prompt > options_.max_step_tokens;
    if ((prompt > budget && !alone) || blocks > free_blocks) break;
    budget -= prompt;
    free_blocks -= blocks;
    prefilling = true;
    waiting_.front()->admitted = true;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    ++running_count_;
  }
  if (!running_.empty() || waiting_.empty()) return nullptr;
  // The first waiting prompt does not fit even the idle cache (blocks held outside).
  SequencePtr unfit = std::move(waiting_.front());
  waiting_.pop_front();
  return unfit;
}

int64_t Scheduler::BlocksNeeded() const {
  int64_t blocks = 0;
  for (const SequencePtr& s : running_) {
    const int64_t held = static_cast<int64_t>(s->state.blocks.blocks.size());
    const int64_t length = s->state.length + static_cast<int64_t>(s->decoder.NextInput().size());
    blocks += std::max<int64_t>(CeilDiv(length, block_size_) - held, 0);
  }
  return blocks;
}

int64_t Scheduler::PreemptForSpace() {
  int64_t preempted = 0;
  while (running_.size() > 1 && BlocksNeeded() > engine_->kv_cache().free_blocks()) {
    SequencePtr s = std::move(running_.back());
    running_.pop_back();
    engine_->Release(&s->state);
    // A prompt admitted this step has nothing to recompute yet; it just waits again.
    if (!s->decoder.prefilling()) {
      s->decoder.Preempt();
      ++preempted;
    }
    absl::MutexLock lock(&mu_);
    s->admitted = false;
    --running_count_;
    waiting_.push_front(std::move(s));
  }
  return preempted;
}

size_t Scheduler::BuildBatch() {
  inputs_.clear();
  traced_.clear();
  size_t first_prefill = running_.size();
  int64_t rows = 0;
  step_prompt_tokens_ = 0;
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence& s = *running_[i];
    const std::span<const int32_t> tokens = s.decoder.NextInput();
    const bool prefill = s.decoder.prefilling();
    if (prefill) {
      first_prefill = std::min(first_prefill, i);
      step_prompt_tokens_ += static_cast<int64_t>(tokens.size());
    }
    inputs_.push_back({&s.state, tokens, prefill && s.decoder.wants_prompt_logits(),
                       s.request.params.experts_per_token});
    rows += static_cast<int64_t>(tokens.size());
    if (s.request.params.trace_routing) {
      s.trace_row = rows - 1;
      traced_.push_back(&s);
    }
  }
  if (!traced_.empty() && !observing_) {
    engine_->AddRoutingObserver(this);
    observing_ = true;
  }
  return first_prefill;
}

void Scheduler::Emit() {
  const int64_t vocab = config_.vocab_size;
  const Clock::time_point now = Clock::now();
  ttft_.clear();
  itl_.clear();
  int64_t generated = 0;
  size_t row = 0;  // the first logits row of running_[j]
  const std::span<const int64_t> degraded = engine_->degraded_rows();
  for (size_t j = 0; j < running_.size(); ++j) {
    Sequence& s = *running_[j];
    s.decoder.AddDegraded(degraded[j]);
    float* logits = &logits_[row * vocab];
    row += inputs_[j].all_logits ? inputs_[j].tokens.size() : 1;
    if (s.decoder.prefilling() && !s.decoder.resuming()) {
      logits = s.decoder.Prefilled(logits);
      if (s.decoder.finished()) continue;  // scoring only (max_tokens = 0)
      ttft_.push_back(SecondsBetween(s.arrival, now));
    } else {
      if (s.decoder.resuming()) logits = s.decoder.Prefilled(logits);
      itl_.push_back(SecondsBetween(s.last_token, now));
    }
    s.last_token = now;
    ++generated;
    const std::string text = s.decoder.Advance(logits);
    const GenerationOutput& out = s.decoder.output();
    const int32_t token = out.tokens.back();
    s.sink->OnTokens({&token, 1}, text, s.request.params.trace_routing ? &s.routes : nullptr,
                     out.logprobs.empty()
                         ? std::span<const TokenLogprobs>()
                         : std::span<const TokenLogprobs>(&out.logprobs.back(), 1));
  }
  if (observer_ != nullptr) {
    observer_->OnStep({step_prompt_tokens_, generated, ttft_, itl_, preempted_});
  }
  std::vector<SequencePtr> finished;  // allocates only when a sequence finished
  Extract(&running_, &finished, [](const Sequence& s) { return s.decoder.finished(); });
  for (SequencePtr& s : finished) Finish(std::move(s), absl::OkStatus());
}

void Scheduler::FailStep(const absl::Status& status, size_t first_prefill) {
  // Any error but RESOURCE_EXHAUSTED fails the whole step. RESOURCE_EXHAUSTED comes before the
  // engine changed anything: fail only the new prompts, or else the youngest sequence (which
  // frees its blocks), and let the others go on.
  size_t first_failed = 0;
  if (absl::IsResourceExhausted(status)) {
    first_failed = first_prefill < running_.size() ? first_prefill : running_.size() - 1;
  }
  std::vector<SequencePtr> failed(std::make_move_iterator(running_.begin() + first_failed),
                                  std::make_move_iterator(running_.end()));
  running_.resize(first_failed);
  for (SequencePtr& s : failed) Finish(std::move(s), status);
}

void Scheduler::Finish(SequencePtr seq, const absl::Status& status) {
  engine_->Release(&seq->state);
  {
    absl::MutexLock lock(&mu_);
    open_.erase(seq->id);
    if (seq->admitted) --running_count_;
    if (seq->request.deadline != absl::InfiniteFuture()) --with_deadline_;
    kv_used_blocks_ = engine_->kv_cache().used_blocks();
  }
  if (observer_ != nullptr) {
    RequestOutcome outcome = RequestOutcome::kError;
    if (status.ok()) {
      outcome = seq->decoder.output().finish == FinishReason::kLength ? RequestOutcome::kLength
                                                                      : RequestOutcome::kStop;
    } else if (absl::IsCancelled(status)) {
      outcome = RequestOutcome::kCancelled;
    }
    observer_->OnRequestFinished(outcome, SecondsBetween(seq->arrival, Clock::now()));
  }
  seq->sink->OnFinished(status, seq->decoder.output());
}

void Scheduler::PublishKvUsage() {
  const int64_t used = engine_->kv_cache().used_blocks();
  absl::MutexLock lock(&mu_);
  kv_used_blocks_ = used;
}

void Scheduler::OnRouting(int64_t layer, const Routing& routing) {
  for (Sequence* s : traced_) {
    const int64_t k = routing.top_k;
    DCHECK_EQ(k, s->routes.top_k);
    const size_t from = static_cast<size_t>(s->trace_row * k);
    std::copy_n(&routing.experts[from], k, &s->routes.experts[layer * k]);
    std::copy_n(&routing.weights[from], k, &s->routes.weights[layer * k]);
  }
}

void Scheduler::Start() {
  if (thread_.joinable()) return;
  {
    absl::MutexLock lock(&mu_);
    stop_ = false;
  }
  thread_ = std::thread(&Scheduler::Loop, this);
}

void Scheduler::Stop() {
  if (!thread_.joinable()) return;
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    work_.Signal();
  }
  thread_.join();
}

bool Scheduler::HasWork() const {
  return !waiting_.empty() || running_count_ > 0 || cancel_pending_;
}

void Scheduler::Loop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      while (!stop_ && !HasWork()) work_.Wait(&mu_);
      if (stop_) return;
    }
    StepOnce();
  }
}

void Scheduler::StopAdmitting() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
}

bool Scheduler::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithDeadline(
      absl::Condition(
          +[](Scheduler* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) { return s->open_.empty(); },
          this),
      deadline);
}

Scheduler::Stats Scheduler::stats() const {
  absl::MutexLock lock(&mu_);
  return {running_count_, static_cast<int64_t>(waiting_.size()), kv_used_blocks_, kv_total_blocks_};
}

}  // namespace moe
