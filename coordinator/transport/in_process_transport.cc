#include "coordinator/transport/in_process_transport.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace moe {

absl::StatusOr<std::unique_ptr<InProcessTransport>> InProcessTransport::Create(
    const Checkpoint& checkpoint, const Placement& placement, std::optional<DType> quantize) {
  const ModelConfig& config = checkpoint.config();
  const std::vector<ExpertRange> missing =
      UncoveredExperts(placement.workers, config.num_local_experts);
  if (!missing.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the placement hosts experts ", missing.front().ToString(), " on no worker"));
  }
  std::unique_ptr<InProcessTransport> t(new InProcessTransport());
  t->hidden_ = config.hidden_size;
  for (const ExpertRange& experts : placement.workers) {
    WeightsOptions options;
    options.load_shared = false;
    options.experts = experts;
    options.quantize = quantize;
    Worker w;
    MOE_ASSIGN_OR_RETURN(w.weights, checkpoint.LoadWeights(options));
    w.ffn = std::make_unique<ExpertFfn>(w.weights.get());
    t->workers_.push_back(std::move(w));
  }
  AssignExpertsToWorkers(placement.workers, config.num_local_experts, &t->worker_of_expert_);
  return t;
}

absl::Status InProcessTransport::Exchange(int64_t layer, const Routing& routing, const float* x,
                                          float* out) {
  plan_.Build(routing, worker_of_expert_, static_cast<int64_t>(workers_.size()));
  std::fill(out, out + routing.tokens * hidden_, 0.0f);
  for (size_t w = 0; w < workers_.size(); ++w) {
    const WorkerDispatch& d = plan_.workers()[w];
    if (d.rows() == 0) continue;
    const size_t floats = static_cast<size_t>(d.rows() * hidden_);
    if (rows_.size() < floats) {
      rows_.resize(floats);
      partial_.resize(floats);
    }
    GatherRows(x, hidden_, d.tokens, rows_.data());
    const ExpertBatch batch{layer, d.rows(), rows_.data(), d.offsets, d.assignments};
    workers_[w].ffn->Forward(batch, partial_.data());
    ScatterAddRows(partial_.data(), hidden_, d.tokens, out);
  }
  return absl::OkStatus();
}

}  // namespace moe
