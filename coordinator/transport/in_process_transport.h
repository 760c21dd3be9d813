// ExpertTransport whose workers live in this process: the embedded default and the reference
// every distributed transport must equal. Each in-process worker holds its own slice of the
// experts (as a worker process would) and partial sums are combined by the dispatch module in
// worker order, so a given placement gives bit-identical results here and across processes.
#ifndef MOE_COORDINATOR_TRANSPORT_IN_PROCESS_TRANSPORT_H_
#define MOE_COORDINATOR_TRANSPORT_IN_PROCESS_TRANSPORT_H_

#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/checkpoint.h"
#include "common/expert_ffn.h"
#include "common/weights.h"
#include "coordinator/transport/dispatch.h"
#include "coordinator/transport/expert_transport.h"

namespace moe {

// Not thread-safe: one Exchange at a time (the engine's step loop).
class InProcessTransport : public ExpertTransport {
 public:
  // One worker per placement range, each loading its experts from `checkpoint` (which must
  // outlive the transport). INVALID_ARGUMENT when some expert has no worker or a range is
  // outside the model.
  // `quantize`: quantize-on-load of the experts (WeightsOptions::quantize).
  static absl::StatusOr<std::unique_ptr<InProcessTransport>> Create(
      const Checkpoint& checkpoint, const Placement& placement,
      std::optional<DType> quantize = std::nullopt);

  absl::Status Exchange(int64_t layer, const Routing& routing, const float* x, float* out) override;

 private:
  struct Worker {
    std::unique_ptr<ModelWeights> weights;
    std::unique_ptr<ExpertFfn> ffn;
  };
  InProcessTransport() = default;

  // Constant after Create.
  int64_t hidden_ = 0;
  std::vector<int32_t> worker_of_expert_;
  std::vector<Worker> workers_;

  // Per-exchange scratch, grown to the largest step seen.
  DispatchPlan plan_;
  std::vector<float> rows_;     // [rows, hidden] gathered input rows of one worker
  std::vector<float> partial_;  // [rows, hidden] that worker's partial sums
};

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_IN_PROCESS_TRANSPORT_H_
