// Dispatch: everything the expert transports (in-process and gRPC, later NCCL) share about
// sending tokens to experts and adding the answers back, so that "the distributed path equals
// the in-process one bit for bit" and "a failed worker's rows go to a replica" rest on one
// implementation:
//   - Placement: which worker serves which experts of each layer (the same in every layer, or
//     layer by layer); workers may overlap (replicas);
//   - Segmentation: the placement cut at every range boundary. A segment is the unit of replica
//     choice and of combining: all its rows of a step go to one worker, and each token's
//     partial sums are added in segment order;
//   - DispatchPlan: a routing split by segment, each token's row once per segment with its
//     (expert, weight) pairs in CSR form;
//   - Dispatcher: one layer exchange over a transport's WorkerLinks: choose a live replica per
//     segment (spreading rows over replicas), send, wait under an adaptive deadline, check the
//     answers (untrusted: finite and bounded), re-send a failed worker's segments to live
//     replicas in the same step, and combine.
// Why segments: float addition is not associative (and the kernels fuse multiply-adds), so the
// bits of a sum depend on how it is grouped. Grouping by segment, never by worker, makes the
// result independent of which replica served which segment, and every expert's rows of a step
// reach one worker in token order, so even kernels whose rounding depends on the batch size
// see the same batches. Results are therefore identical for every placement with the same
// boundaries, whatever replicas were chosen or failed over to.
#ifndef MOE_COORDINATOR_TRANSPORT_DISPATCH_H_
#define MOE_COORDINATOR_TRANSPORT_DISPATCH_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/expert_ffn.h"
#include "common/expert_range.h"
#include "coordinator/router.h"
#include "coordinator/transport/expert_transport.h"

namespace moe {

// Worker w serves experts `workers[w]` of every layer, unless `layers` is set: then in layer l
// it serves the experts in layers[l][w] (ranges, increasing and disjoint). Workers may overlap
// (replicas) or serve nothing.
struct Placement {
  std::vector<ExpertRange> workers;
  std::vector<std::vector<std::vector<ExpertRange>>> layers;  // [layer][worker]: empty = uniform

  // Contiguous, as even as possible: 3 experts over 2 workers -> [0, 1), [1, 3). With more
  // workers than experts some ranges are empty (those workers host nothing).
  static Placement Contiguous(int64_t expert_count, int64_t worker_count);

  int64_t worker_count() const { return static_cast<int64_t>(workers.size()); }
  // What worker w serves in `layer`.
  std::vector<ExpertRange> Served(int64_t layer, int32_t w) const;
  // The smallest range holding every expert w serves in any of `layer_count` layers: what it
  // must have loaded. For a uniform placement, workers[w].
  ExpertRange Span(int32_t w, int64_t layer_count) const;
  // OK, or INVALID_ARGUMENT naming the first layer and experts no worker serves (or a range
  // outside [0, expert_count), or a layers table of the wrong shape).
  absl::Status CheckCoverage(int64_t layer_count, int64_t expert_count) const;
};

// A worker as the status API and the metrics show it.
struct WorkerSnapshot {
  std::string address;
  bool ready = false;
  ExpertRange experts;
  std::string message;             // why it is unavailable
  bool draining = false;           // ready, but shutting down: used only where no replica is live
  std::string device = "cpu";      // where its experts run (the worker's --device)
  std::string transport = "grpc";  // how rows reach it: grpc or in-process
  // Under a per-layer placement, what it serves in each layer (else `experts` in every layer).
  std::vector<std::vector<ExpertRange>> layers = {};
};

// The maximal runs of experts e with mask[e] set, in increasing order.
std::vector<ExpertRange> RangesOf(std::span<const char> mask);

// The maximal runs of experts in [0, expert_count) that no range of `hosted` contains, in
// increasing order; empty when every expert is covered.
std::vector<ExpertRange> UncoveredExperts(std::span<const ExpertRange> hosted,
                                          int64_t expert_count);

// True when every expert in [0, expert_count) has a ready worker (in every layer).
bool AllExpertsServed(std::span<const WorkerSnapshot> workers, int64_t expert_count);

// How many experts in [0, expert_count) have a ready worker (in the layer with the fewest).
int64_t LiveExpertCount(std::span<const WorkerSnapshot> workers, int64_t expert_count);

// What happens to a token routed to an expert that no ready worker hosts.
enum class ExpertLossPolicy {
  kFail,     // the step fails (UNAVAILABLE naming the workers)
  kReroute,  // the token takes its top-k among the live experts and is counted as degraded
};
// "fail" / "reroute"; false for anything else.
bool ParseExpertLossPolicy(std::string_view text, ExpertLossPolicy* policy);

// Whether the coordinator can serve: every expert served, or with kReroute at least top_k.
bool ClusterServing(std::span<const WorkerSnapshot> workers, int64_t expert_count, int64_t top_k,
                    ExpertLossPolicy policy);

// [0, expert_count) cut at every boundary of every range in `hosted` (clipped to the model), so
// that each range is a union of segments and all experts of a segment have the same hosts.
struct Segmentation {
  std::vector<ExpertRange> segments;        // increasing, covering [0, expert_count)
  std::vector<int32_t> segment_of_expert;   // [expert_count]
  std::vector<std::vector<int32_t>> hosts;  // [segments]: workers, in worker order

  static Segmentation Of(std::span<const ExpertRange> hosted, int64_t expert_count);
  // The same for workers serving several ranges each: served[w] (clipped to the model).
  static Segmentation Of(std::span<const std::vector<ExpertRange>> served, int64_t expert_count);
};

// Rows for one segment or one worker for one layer: the rows of the tokens routed there (in
// token order) and their (expert, weight) pairs in CSR form.
struct DispatchRows {
  std::vector<int32_t> tokens;   // batch row of each dispatched row
  std::vector<int32_t> offsets;  // rows + 1 entries; row r's pairs: [offsets[r], offsets[r+1])
  std::vector<ExpertAssignment> assignments;

  int64_t rows() const { return static_cast<int64_t>(tokens.size()); }
  void Clear();
  // Appends `other`'s rows (offsets rebased).
  void Append(const DispatchRows& other);
};

// Splits a routing by segment. Buffers are reused across calls (no allocation once warm).
// Not thread-safe.
class DispatchPlan {
 public:
  // segment_of_expert[e]: e's segment in [0, segment_count) for every routed expert e.
  void Build(const Routing& routing, std::span<const int32_t> segment_of_expert,
             int64_t segment_count);
  const std::vector<DispatchRows>& segments() const { return segments_; }

 private:
  std::vector<DispatchRows> segments_;
};

// rows[r] = x[tokens[r]] for each r: x is [*, hidden] f32, `rows` is [tokens.size(), hidden]
// f32 at any byte alignment (a wire buffer).
void GatherRows(const float* x, int64_t hidden, std::span<const int32_t> tokens, void* rows);

// out[tokens[r]] += partial[r] for each r, in increasing r: partial is [tokens.size(), hidden]
// f32 at any byte alignment (a wire buffer), out is [*, hidden].
void ScatterAddRows(const void* partial, int64_t hidden, std::span<const int32_t> tokens,
                    float* out);

// Bigger than any honest hidden-state value (fp16 checkpoints keep them below 65504), far below
// what a broken or hostile worker could send.
constexpr float kMaxPartialSum = 1e8f;

// Copies `values` floats from `src` (any alignment) to `dst`, refusing a NaN, an infinity or a
// magnitude above kMaxPartialSum: such a value would flow into the residual stream and the next
// layer's routing (and get an honest worker blamed for it there). `hidden` names the row.
absl::Status CopyPartialSums(const void* src, int64_t values, int64_t hidden, float* dst);

// A transport's side of an exchange: how the Dispatcher reaches worker w (its index in the
// placement). Called from the one thread running Dispatcher::Exchange.
class WorkerLinks {
 public:
  virtual ~WorkerLinks() = default;
  // Whether w may be given rows now.
  virtual bool Ready(int32_t w) = 0;
  // Hands w these rows of x for `layer`; may return before the answer is in.
  virtual void Start(int32_t w, int64_t layer, const DispatchRows& rows, const float* x) = 0;
  // Waits until w's answer is in or `deadline` passes; false on the deadline (the request
  // stays outstanding: Wait again or Abandon).
  virtual bool Wait(int32_t w, absl::Time deadline) = 0;
  // Gives up on w's outstanding request (cancels it) and waits until it has ended.
  virtual void Abandon(int32_t w) = 0;
  // After Wait returned true: [rows, hidden] f32 partial sums at any alignment (valid until
  // the next Start on w), or why w failed. `report->seconds` gets its timing.
  virtual absl::StatusOr<const void*> Answer(int32_t w, DispatchReport* report) = 0;
  // The serialized sizes of w's last request and answer, for the metrics (asked only when an
  // observer is set: computing them walks the messages). Default: none.
  virtual void MessageSizes(int32_t w, DispatchReport* report) {
    (void)w;
    (void)report;
  }
  // w failed: take it out of service (the transport brings it back when it can).
  virtual void MarkDown(int32_t w, const std::string& why) = 0;
  // "expert worker HOST (experts [a, b))", for messages.
  virtual std::string Name(int32_t w) = 0;
  // Why w is not ready ("" if it is).
  virtual std::string DownReason(int32_t w) = 0;
  // w is shutting down: given rows only where no other live host is left.
  virtual bool Draining(int32_t w) {
    (void)w;
    return false;
  }
};

struct DispatchOptions {
  // A worker none of whose segments could go elsewhere is waited for this long per step.
  absl::Duration step_timeout = absl::Seconds(10);
  // A worker whose segments all have another live host is given
  //   clamp(deadline_factor * expected, deadline_floor, step_timeout)
  // where `expected` scales the recent answer time by this request's rows; then its rows go to
  // the replicas and it is marked down (a hung worker costs about the floor, not step_timeout).
  absl::Duration deadline_floor = absl::Milliseconds(500);
  double deadline_factor = 4.0;
};

// Runs layer exchanges for one placement. Not thread-safe: one Exchange at a time.
class Dispatcher {
 public:
  // `placement` over `layer_count` layers of `expert_count` experts (a uniform one is cut once,
  // a per-layer one per layer).
  Dispatcher(const Placement& placement, int64_t layer_count, int64_t expert_count, int64_t hidden,
             const DispatchOptions& options);

  // out[t] = sum over token t's (expert, weight) of weight * FFN_expert(x[t]), see
  // ExpertTransport::Exchange. UNAVAILABLE naming the failed or down workers when some routed
  // expert has no live worker left.
  absl::Status Exchange(int64_t layer, const Routing& routing, const float* x, float* out,
                        WorkerLinks* links);

  // ExpertTransport::LiveExperts for these links.
  bool LiveExperts(int64_t layer, WorkerLinks* links, std::vector<char>* live) const;

  // The segments of `layer`.
  const Segmentation& segmentation(int64_t layer) const {
    return segmentations_[segmentations_.size() == 1 ? 0 : layer];
  }
  // Not owned; may be null.
  void set_observer(DispatchObserver* observer) { observer_ = observer; }
  // Workers marked down by Exchange (for tests and metrics).
  int64_t failovers() const { return failovers_; }

 private:
  // Chooses a worker for each segment in pending_ among the live hosts, spreading rows.
  absl::Status Choose(WorkerLinks* links);
  absl::Duration SoftDeadline(int64_t rows) const;
  // Waits for w's answer to the request started at `start` under its deadline; false when w
  // missed it (then it is abandoned and failed).
  bool Await(int32_t w, int64_t layer, absl::Time start, WorkerLinks* links);
  // Checks w's answer and copies each of its segments into partials_, or fails w.
  void Store(int32_t w, int64_t layer, WorkerLinks* links);
  bool Replaceable(int32_t w) const;
  void Fail(int32_t w, int64_t layer, const std::string& why, WorkerLinks* links);

  const std::vector<Segmentation> segmentations_;  // one (uniform) or one per layer
  const Segmentation* seg_ = nullptr;              // the current exchange's layer's
  const int64_t hidden_;
  const DispatchOptions options_;
  DispatchObserver* observer_ = nullptr;
  uint64_t exchanges_ = 0;
  int64_t failovers_ = 0;
  // Recent answers: exponentially weighted seconds and rows.
  double recent_seconds_ = 0;
  double recent_rows_ = 0;

  // Per-exchange scratch, reused.
  DispatchPlan plan_;
  std::vector<int64_t> segment_start_;          // [segments + 1] rows before segment s
  std::vector<float> partials_;                 // [all rows, hidden], by segment
  std::vector<int32_t> pending_;                // segments without an answer yet
  std::vector<char> excluded_;                  // [workers] not ready or failed this step
  std::vector<char> draining_;                  // [workers] shutting down
  std::vector<std::vector<int32_t>> assigned_;  // [workers] segments sent this round
  std::vector<int64_t> load_;                   // [workers] rows sent this round
  std::vector<DispatchRows> worker_rows_;       // [workers]
  std::vector<int32_t> started_;
  std::vector<DispatchReport> reports_;
  absl::Status failure_;  // the first failure of this exchange
};

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_DISPATCH_H_
