// Dispatch: everything both expert transports (in-process and gRPC, later NCCL) share about
// sending tokens to experts and adding the answers back, so that "the distributed path equals
// the in-process one bit for bit" rests on one implementation:
//   - Placement: which worker hosts which experts (the same slice in every layer);
//   - the choice of one worker per expert among the live ones (first listed wins, so replicas
//     are used in worker order) and the coverage check ("which experts does nobody serve");
//   - DispatchPlan: a routing split by worker, each token's row once per worker with its
//     (expert, weight) pairs in CSR form;
//   - GatherRows / ScatterAddRows: rows to a worker's buffer and its partial sums back.
// Combining is always: zero the output, then for each worker in index order add its partial
// sums in token order. Float addition is not associative; this fixed order is what makes every
// transport give identical bits for the same placement.
#ifndef MOE_COORDINATOR_TRANSPORT_DISPATCH_H_
#define MOE_COORDINATOR_TRANSPORT_DISPATCH_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/expert_ffn.h"
#include "common/expert_range.h"
#include "coordinator/router.h"

namespace moe {

// Worker w hosts experts `workers[w]` of every layer. Ranges may overlap (replicas) or be empty.
struct Placement {
  std::vector<ExpertRange> workers;

  // Contiguous, as even as possible: 3 experts over 2 workers -> [0, 1), [1, 3). With more
  // workers than experts some ranges are empty (those workers host nothing).
  static Placement Contiguous(int64_t expert_count, int64_t worker_count);
};

// A worker as the status API and the metrics show it.
struct WorkerSnapshot {
  std::string address;
  bool ready = false;
  ExpertRange experts;
  std::string message;  // why it is unavailable
};

// table[e] = index of the first range in `hosted` that contains e, or -1 where none does, for
// e in [0, expert_count). Pass an empty range for a worker that must not be chosen (down).
// Reuses `table`'s storage.
void AssignExpertsToWorkers(std::span<const ExpertRange> hosted, int64_t expert_count,
                            std::vector<int32_t>* table);

// The maximal runs of experts in [0, expert_count) that no range of `hosted` contains, in
// increasing order; empty when every expert is covered.
std::vector<ExpertRange> UncoveredExperts(std::span<const ExpertRange> hosted,
                                          int64_t expert_count);

// True when every expert in [0, expert_count) has a ready worker.
bool AllExpertsServed(std::span<const WorkerSnapshot> workers, int64_t expert_count);

// What one worker receives for one layer: the rows of the tokens routed to its experts (each
// token once, in token order) and their (expert, weight) pairs in CSR form.
struct WorkerDispatch {
  std::vector<int32_t> tokens;   // batch row of each dispatched row
  std::vector<int32_t> offsets;  // rows + 1 entries; row r's pairs: [offsets[r], offsets[r+1])
  std::vector<ExpertAssignment> assignments;

  int64_t rows() const { return static_cast<int64_t>(tokens.size()); }
};

// Splits a routing by worker. Buffers are reused across calls (no allocation once warm).
// Not thread-safe.
class DispatchPlan {
 public:
  // worker_of_expert[e]: the worker that serves expert e this step. REQUIRES: every routed
  // expert maps to a worker in [0, worker_count) (AssignExpertsToWorkers without -1 for them).
  void Build(const Routing& routing, std::span<const int32_t> worker_of_expert,
             int64_t worker_count);
  const std::vector<WorkerDispatch>& workers() const { return workers_; }

 private:
  std::vector<WorkerDispatch> workers_;
};

// rows[r] = x[tokens[r]] for each r: x is [*, hidden] f32, `rows` is [tokens.size(), hidden]
// f32 at any byte alignment (a wire buffer).
void GatherRows(const float* x, int64_t hidden, std::span<const int32_t> tokens, void* rows);

// out[tokens[r]] += partial[r] for each r, in increasing r: partial is [tokens.size(), hidden]
// f32 at any byte alignment (a wire buffer), out is [*, hidden].
void ScatterAddRows(const void* partial, int64_t hidden, std::span<const int32_t> tokens,
                    float* out);

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_DISPATCH_H_
