// The seam between the coordinator's forward pass and wherever the experts live: in this
// process (InProcessTransport, the reference), in worker processes over gRPC, or on GPUs over
// NCCL. Each token's row goes once to each worker that hosts one of its experts; each worker
// returns one weighted partial sum per token; the transport adds them up.
#ifndef MOE_COORDINATOR_EXPERT_TRANSPORT_H_
#define MOE_COORDINATOR_EXPERT_TRANSPORT_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "common/expert_ffn.h"
#include "coordinator/router.h"

namespace moe {

// Which worker hosts which experts: worker w hosts [ranges[w].first, ranges[w].second) of
// every layer.
struct Placement {
  std::vector<std::pair<int64_t, int64_t>> ranges;

  // Contiguous, as even as possible: 3 experts over 2 workers -> [0, 2), [2, 3).
  static Placement Contiguous(int64_t expert_count, int64_t worker_count);
  // The worker hosting `expert`, or -1.
  int64_t WorkerOf(int64_t expert) const;
  // expert id -> worker index for experts [0, expert_count); -1 where none hosts it.
  std::vector<int32_t> WorkerTable(int64_t expert_count) const;
};

// What one worker receives for one layer: the rows of the tokens routed to its experts (each
// token once) and their (expert, weight) pairs in CSR form.
struct WorkerDispatch {
  std::vector<int32_t> tokens;  // batch row of each dispatched row
  std::vector<int32_t> offsets;  // rows + 1 entries
  std::vector<ExpertAssignment> assignments;

  int64_t rows() const { return static_cast<int64_t>(tokens.size()); }
};

// Splits a routing by worker. Buffers are reused across calls (no allocation once warm).
class DispatchPlan {
 public:
  // worker_of_expert[e]: the worker that serves expert e this step (REQUIRES: every routed
  // expert maps to a worker in [0, worker_count)).
  void Build(const Routing& routing, std::span<const int32_t> worker_of_expert,
             int64_t worker_count);
  const std::vector<WorkerDispatch>& workers() const { return workers_; }

 private:
  std::vector<WorkerDispatch> workers_;
};

// One worker's part of one layer exchange, for metrics.
struct DispatchReport {
  int32_t worker = 0;          // index in the transport's worker list
  double seconds = 0;          // request written -> answer read
  int64_t bytes_sent = 0;      // serialized request
  int64_t bytes_received = 0;  // serialized answer
  int64_t assignments = 0;     // (token, expert) pairs sent
};

// Told about every layer exchange (metrics). Called on the thread calling Exchange, after all
// answers are in, with the workers that answered; must be cheap.
class DispatchObserver {
 public:
  virtual ~DispatchObserver() = default;
  virtual void OnDispatch(std::span<const DispatchReport> reports) = 0;
};

class ExpertTransport {
 public:
  virtual ~ExpertTransport() = default;

  // out[t] = sum over token t's routed (expert, weight) of weight * FFN_expert(x[t]) at `layer`.
  // x: [routing.tokens, hidden] (post-attention-normed hidden states); out: [routing.tokens,
  // hidden], overwritten. Errors (a worker unreachable or answering garbage) are returned,
  // never thrown; the caller fails the step.
  virtual absl::Status Exchange(int64_t layer, const Routing& routing, const float* x,
                                float* out) = 0;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_EXPERT_TRANSPORT_H_
