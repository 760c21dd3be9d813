// ExpertTransport whose workers live in this process: the embedded default and the reference
// every distributed transport must equal. Each in-process worker holds its own slice of the
// experts (as a worker process would) and partial sums are combined in worker order, so a given
// placement gives bit-identical results here and across processes.
#ifndef MOE_COORDINATOR_IN_PROCESS_TRANSPORT_H_
#define MOE_COORDINATOR_IN_PROCESS_TRANSPORT_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/expert_ffn.h"
#include "common/weights.h"
#include "coordinator/expert_transport.h"

namespace moe {

// Not thread-safe: one Exchange at a time (the engine's step loop).
class InProcessTransport : public ExpertTransport {
 public:
  // One worker per placement range, each loading its experts from `store`.
  static absl::StatusOr<std::unique_ptr<InProcessTransport>> Create(
      std::shared_ptr<TensorStore> store, const ModelConfig& config, const Placement& placement);

  absl::Status Exchange(int64_t layer, const Routing& routing, const float* x,
                        float* out) override;

  // Expert bytes held by each worker.
  std::vector<uint64_t> WorkerExpertBytes() const;

 private:
  struct Worker {
    std::unique_ptr<ModelWeights> weights;
    std::unique_ptr<ExpertFfn> ffn;
  };
  InProcessTransport() = default;

  int64_t hidden_ = 0;
  std::vector<int32_t> worker_table_;  // expert -> worker
  std::vector<Worker> workers_;
  DispatchPlan plan_;
  std::vector<float> rows_;     // gathered input rows of one worker
  std::vector<float> partial_;  // that worker's partial sums
};

}  // namespace moe

#endif  // MOE_COORDINATOR_IN_PROCESS_TRANSPORT_H_
