#include "coordinator/request_batch.h"

#include <utility>

namespace moe {

class RequestBatch::Sink : public GenerationSink {
 public:
  Sink(RequestBatch* batch, size_t index) : batch_(batch), index_(index) {}

  void OnTokens(std::span<const int32_t> tokens, std::string_view text, const TokenRoutes* routes,
                std::span<const TokenLogprobs> logprobs) override {
    Event e;
    e.index = index_;
    e.tokens.assign(tokens.begin(), tokens.end());
    e.text = std::string(text);
    e.logprobs.assign(logprobs.begin(), logprobs.end());
    if (routes != nullptr) e.routes = *routes;
    batch_->Push(std::move(e));
  }
  void OnFinished(const absl::Status& status, const GenerationOutput& output) override {
    Event e;
    e.index = index_;
    e.finished = true;
    e.status = status;
    if (status.ok()) e.output = output;
    batch_->Push(std::move(e));
  }

 private:
  RequestBatch* const batch_;
  const size_t index_;
};

RequestBatch::RequestBatch(Scheduler* scheduler) : scheduler_(scheduler) {}

RequestBatch::~RequestBatch() {
  CancelAll();
  std::vector<Event> drained;
  while (!Take(absl::Seconds(1), &drained)) drained.clear();
}

absl::Status RequestBatch::Submit(std::vector<GenerationRequest> requests) {
  for (size_t i = 0; i < requests.size(); ++i) {
    sinks_.push_back(std::make_unique<Sink>(this, i));
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    {
      absl::MutexLock lock(&mu_);
      ++open_;  // before Submit: OnFinished may come before Submit returns
    }
    absl::StatusOr<uint64_t> id = scheduler_->Submit(std::move(requests[i]), sinks_[i].get());
    if (!id.ok()) {
      {
        absl::MutexLock lock(&mu_);
        --open_;
      }
      CancelAll();
      return id.status();
    }
    ids_.push_back(*id);
  }
  return absl::OkStatus();
}

void RequestBatch::Push(Event event) {
  absl::MutexLock lock(&mu_);
  if (event.finished) --open_;
  events_.push_back(std::move(event));
}

bool RequestBatch::Take(absl::Duration timeout, std::vector<Event>* out) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]()
                   ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty() || open_ == 0; };
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  for (Event& e : events_) out->push_back(std::move(e));
  events_.clear();
  return open_ == 0;
}

void RequestBatch::CancelAll() {
  for (uint64_t id : ids_) scheduler_->Cancel(id);  // finished ids are ignored
}

}  // namespace moe
