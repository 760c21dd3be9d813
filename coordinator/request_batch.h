// Requests submitted to the Scheduler together (one RPC or HTTP request: a prompt, or n
// completions of several prompts) whose output one thread reads: the scheduler's thread only
// queues events, the reading thread converts them for its client.
#ifndef MOE_COORDINATOR_REQUEST_BATCH_H_
#define MOE_COORDINATOR_REQUEST_BATCH_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/generator.h"
#include "coordinator/scheduler.h"

namespace moe {

class RequestBatch {
 public:
  // What one request produced: new tokens (with their text, logprobs and routes as asked), or
  // its end (finished: status and, when OK, the whole output).
  struct Event {
    size_t index = 0;  // of the request in Submit's list
    std::vector<int32_t> tokens;
    std::string text;
    std::vector<TokenLogprobs> logprobs;
    std::optional<TokenRoutes> routes;
    bool finished = false;
    absl::Status status;
    GenerationOutput output;
  };

  // `scheduler` must outlive the batch.
  explicit RequestBatch(Scheduler* scheduler);
  // Cancels what is still open and waits until the scheduler is done with it.
  ~RequestBatch();
  RequestBatch(const RequestBatch&) = delete;
  RequestBatch& operator=(const RequestBatch&) = delete;

  // Submits every request (once per batch). On the first refusal the ones already queued are
  // cancelled and the refusal is returned (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...).
  absl::Status Submit(std::vector<GenerationRequest> requests);
  // Waits up to `timeout` for events and appends them to *out, in the order they happened.
  // Returns true once every request has finished and all events were taken.
  bool Take(absl::Duration timeout, std::vector<Event>* out);
  // The client is gone: every open request ends (CANCELLED) at the next step boundary.
  void CancelAll();
  size_t size() const { return sinks_.size(); }

 private:
  class Sink;
  void Push(Event event);

  Scheduler* const scheduler_;
  std::vector<std::unique_ptr<Sink>> sinks_;
  std::vector<uint64_t> ids_;
  absl::Mutex mu_;
  std::vector<Event> events_ ABSL_GUARDED_BY(mu_);
  size_t open_ ABSL_GUARDED_BY(mu_) = 0;  // submitted and not finished
};

}  // namespace moe

#endif  // MOE_COORDINATOR_REQUEST_BATCH_H_
