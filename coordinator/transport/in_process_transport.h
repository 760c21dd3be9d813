// ExpertTransport whose workers live in this process: the embedded default and the reference
// every distributed transport must equal. Each in-process worker holds its own slice of the
// experts (as a worker process would) and the dispatch module drives the exchange exactly as it
// does over gRPC (segments, replica choice, combine order), so placements with the same range
// boundaries give bit-identical results here and across processes.
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
    ExpertRange experts;
    std::unique_ptr<ModelWeights> weights;
    std::unique_ptr<ExpertFfn> ffn;
    std::vector<float> partial;  // [rows, hidden] its last answer
  };
  // The workers as the dispatcher sees them: computed on Start, never down.
  class Links : public WorkerLinks {
   public:
    explicit Links(InProcessTransport* t) : t_(t) {}
    bool Ready(int32_t) override { return true; }
    void Start(int32_t w, int64_t layer, const DispatchRows& rows, const float* x) override;
    bool Wait(int32_t, absl::Time) override { return true; }
    void Abandon(int32_t) override {}
    absl::StatusOr<const void*> Answer(int32_t w, DispatchReport* report) override;
    void MarkDown(int32_t, const std::string&) override {}
    std::string Name(int32_t w) override;
    std::string DownReason(int32_t) override { return ""; }

   private:
    InProcessTransport* t_;
    std::vector<float> rows_;  // [rows, hidden] gathered input rows of one worker
  };
  InProcessTransport(const Placement& placement, int64_t layer_count, int64_t expert_count,
                     int64_t hidden);

  // Constant after Create.
  int64_t hidden_ = 0;
  std::vector<Worker> workers_;
  Dispatcher dispatcher_;
  Links links_{this};
};

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_IN_PROCESS_TRANSPORT_H_
