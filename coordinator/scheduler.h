// Continuous batching: requests join and leave the engine's running batch between steps. Each
// step decodes one token for every running sequence and prefills newly admitted prompts
// alongside, under a per-step token budget; each request streams to its own GenerationSink and
// gets exactly the tokens it would get alone (per-sequence seeded sampling, see SequenceDecoder).
#ifndef MOE_COORDINATOR_SCHEDULER_H_
#define MOE_COORDINATOR_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/tokenizer.h"
#include "coordinator/engine.h"
#include "coordinator/generator.h"

namespace moe {

struct SchedulerOptions {
  int64_t max_running = 16;  // sequences decoding together, >= 1
  int64_t max_waiting = 64;  // queued requests beyond that -> RESOURCE_EXHAUSTED, >= 0
  // Token budget per step, >= 1: decode tokens (one per running sequence, always scheduled)
  // plus prefill tokens of newly admitted prompts. A prompt longer than the whole budget is
  // admitted alone (no other prefill in that step) so that it cannot starve.
  int64_t max_step_tokens = 512;
};

// OK, or INVALID_ARGUMENT naming the first option out of range.
absl::Status ValidateSchedulerOptions(const SchedulerOptions& options);

// Receives a request's output. Called on the thread running the steps (never with the
// scheduler's lock held); must not block for long. May call Submit/Cancel/stats.
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  // New tokens (one per step) and the text that became final (may be empty). `routes`: when the
  // request asked for trace_routing, the routing of the rows that produced `tokens` (valid
  // during the call only); else nullptr. `logprobs`: one per token when the request asked for
  // logprobs, else empty. A scoring-only request (max_tokens = 0) gets no OnTokens.
  virtual void OnTokens(std::span<const int32_t> tokens, std::string_view text,
                        const TokenRoutes* routes, std::span<const TokenLogprobs> logprobs) = 0;
  // Exactly once per accepted request, last: OK with the output (finish reason, all tokens,
  // text), or the error: CANCELLED after Cancel(); the engine's error for a failed step (e.g.
  // UNAVAILABLE naming the expert worker, RESOURCE_EXHAUSTED when the KV cache ran out);
  // UNAVAILABLE when the scheduler is destroyed first. The sink may be destroyed once this
  // returns.
  virtual void OnFinished(const absl::Status& status, const GenerationOutput& output) = 0;
};

// How a request ended, as metrics count it: "stop" (EOS or a stop string), "length"
// (max_tokens), "cancelled", "error" (the step failed or the scheduler shut down).
enum class RequestOutcome { kStop, kLength, kCancelled, kError };
std::string_view RequestOutcomeName(RequestOutcome outcome);

// What the scheduler reports for metrics. Called on the thread running the steps, never with
// the scheduler's lock held; must be cheap (it runs between engine steps).
class SchedulerObserver {
 public:
  struct StepReport {
    int64_t prompt_tokens = 0;     // prompt tokens prefilled by this step
    int64_t generated_tokens = 0;  // tokens sampled by this step (one per running sequence)
    // Seconds since arrival, for the sequences whose first token came in this step.
    std::span<const double> time_to_first_token;
    // Seconds since the sequence's previous token, for the others.
    std::span<const double> inter_token_latency;
    // Running sequences preempted before this step (their KV blocks freed for the others).
    int64_t preempted = 0;
  };
  virtual ~SchedulerObserver() = default;
  // After every successful engine step.
  virtual void OnStep(const StepReport& report) = 0;
  // Once per accepted request, with the seconds from Submit to its end.
  virtual void OnRequestFinished(RequestOutcome outcome, double seconds) = 0;
};

// Thread-safety: Submit, Cancel and stats may be called from any thread. StepOnce is driven by
// one thread at a time: either the caller (never while started) or the internal thread between
// Start() and Stop(); Start, Stop and the destructor are called from one owning thread.
//
// KV cache: a request is admitted only when the free blocks cover its prompt and the next token
// of every running sequence. When running sequences outgrow the cache, the youngest are
// preempted (as vLLM does): their blocks are freed, they wait at the head of the queue, and
// when blocks come free again their prompt and generated tokens are prefilled again and they go
// on where they stopped. No admitted request fails for lack of blocks, unless it alone outgrows
// the whole cache (RESOURCE_EXHAUSTED).
//
// Routing: the first step that runs a trace_routing request adds the scheduler to the engine's
// routing observers; the destructor removes it.
class Scheduler : private RoutingObserver {
 public:
  // `engine` and `tokenizer` must outlive the scheduler; nothing else may drive the engine
  // while the scheduler exists. REQUIRES: ValidateSchedulerOptions(options).ok().
  Scheduler(Engine* engine, const Tokenizer* tokenizer, const SchedulerOptions& options);
  // Stops the thread if started and fails every open request with UNAVAILABLE.
  ~Scheduler() override;

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Validates (ValidateGenerationRequest: INVALID_ARGUMENT naming the parameter), then queues
  // and returns the request's id (> 0). RESOURCE_EXHAUSTED when max_waiting requests already
  // wait or the prompt alone needs more KV blocks than the cache has. `sink` must outlive the
  // request (until its OnFinished returns).
  absl::StatusOr<uint64_t> Submit(GenerationRequest request, GenerationSink* sink);
  // Marks a request cancelled (client gone). At the next step boundary it leaves the batch (or
  // the queue), its KV blocks are freed and its sink gets OnFinished(CANCELLED). Unknown and
  // finished ids are ignored; repeating is harmless.
  void Cancel(uint64_t id);

  // One scheduling step: retire cancelled requests, admit waiting ones under the budget,
  // Engine::Step, sample, stream, retire finished ones. On an engine error the sequences of the
  // step finish with it (see the class comment for RESOURCE_EXHAUSTED) and the scheduler goes
  // on. Returns false when there was nothing to do.
  bool StepOnce();

  // Not owned; set before the first step (before Start()).
  void set_observer(SchedulerObserver* observer) { observer_ = observer; }

  // Runs StepOnce on an internal thread, which sleeps while there is no work. Stop() returns
  // after the current step; open requests stay queued (Start() resumes them).
  void Start();
  void Stop();

  // A snapshot for status and metrics: running and waiting requests, KV blocks used (as of the
  // last step) and in total.
  struct Stats {
    int64_t running, waiting, kv_used_blocks, kv_total_blocks;
  };
  Stats stats() const;

  // Drain: from now on Submit refuses (UNAVAILABLE: shutting down); what is queued or running
  // goes on. Then WaitUntilIdle returns true once every accepted request has finished, or
  // false at `deadline`.
  void StopAdmitting() ABSL_LOCKS_EXCLUDED(mu_);
  bool WaitUntilIdle(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Sequence;
  using SequencePtr = std::unique_ptr<Sequence>;

  void Loop();
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves cancelled requests out of running_ and waiting_ into *out.
  // Moves the sequences past their deadline out of running_ and waiting_.
  void TakeExpired(std::vector<SequencePtr>* out) ABSL_LOCKS_EXCLUDED(mu_);
  void TakeCancelled(std::vector<SequencePtr>* out);
  // Moves waiting requests that fit into running_, in arrival order. Returns the first waiting
  // request if nothing runs and it still does not fit the KV cache (to be failed).
  SequencePtr Admit();
  // Blocks the running sequences' next inputs need beyond those they hold.
  int64_t BlocksNeeded() const;
  // Preempts the youngest running sequences until the rest fit the free blocks (at least one
  // stays). Returns how many were preempted.
  int64_t PreemptForSpace();
  // inputs_, traced_; returns the index in running_ of the first newly admitted sequence.
  size_t BuildBatch();
  void Emit();
  void FailStep(const absl::Status& status, size_t first_prefill);
  // Frees the sequence's KV blocks, forgets its id and calls OnFinished.
  void Finish(SequencePtr seq, const absl::Status& status);
  void PublishKvUsage();
  void OnRouting(int64_t layer, const Routing& routing) override;

  // Constant after construction.
  Engine* const engine_;
  const Tokenizer* const tokenizer_;
  const SchedulerOptions options_;
  const ModelConfig& config_;
  const int64_t block_size_;
  const int64_t kv_total_blocks_;

  // Owned by the stepping thread.
  std::vector<SequencePtr> running_;  // in admission order
  std::vector<StepInput> inputs_;     // this step's, one per running_ entry
  std::vector<Sequence*> traced_;     // running sequences with trace_routing
  std::vector<float> logits_;
  SchedulerObserver* observer_ = nullptr;
  int64_t step_prompt_tokens_ = 0;  // prefilled by the step being built
  int64_t preempted_ = 0;           // by PreemptForSpace before the step being built
  std::vector<double> ttft_, itl_;  // this step's latencies, for observer_
  bool observing_ = false;          // added to the engine's routing observers
  std::thread thread_;              // owned by the thread calling Start/Stop

  mutable absl::Mutex mu_;
  absl::CondVar work_;  // signalled on new work and on stop
  std::deque<SequencePtr> waiting_ ABSL_GUARDED_BY(mu_);
  // Every accepted request until its OnFinished, for Cancel.
  absl::flat_hash_map<uint64_t, Sequence*> open_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool cancel_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;        // destructor running: Submit refuses
  bool draining_ ABSL_GUARDED_BY(mu_) = false;      // StopAdmitting: Submit refuses
  int64_t with_deadline_ ABSL_GUARDED_BY(mu_) = 0;  // open sequences with a deadline
  int64_t running_count_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t kv_used_blocks_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_SCHEDULER_H_
