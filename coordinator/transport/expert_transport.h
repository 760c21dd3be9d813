// The seam between the coordinator's forward pass and wherever the experts live: in this
// process (InProcessTransport, the reference), in worker processes over gRPC, or on GPUs over
// NCCL. Each token's row goes once to each worker that hosts one of its experts; each worker
// returns one weighted partial sum per token; the transport adds them up. What the transports
// share (placement, plan, gather, combine) is in dispatch.h.
#ifndef MOE_COORDINATOR_TRANSPORT_EXPERT_TRANSPORT_H_
#define MOE_COORDINATOR_TRANSPORT_EXPERT_TRANSPORT_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "coordinator/router.h"

namespace moe {

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

  // Which experts of `layer` a worker could serve now: true when all can (then `live` is
  // untouched), else false with live[e] = 1 for each expert e with a ready worker (resized to
  // the expert count). For routing around lost experts (--on-expert-loss reroute); called on
  // the thread calling Exchange.
  virtual bool LiveExperts(int64_t layer, std::vector<char>* live) {
    (void)layer;
    (void)live;
    return true;
  }
};

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_EXPERT_TRANSPORT_H_
