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
  std::unique_ptr<InProcessTransport> t(
      new InProcessTransport(placement, config.num_local_experts, config.hidden_size));
  for (const ExpertRange& experts : placement.workers) {
    WeightsOptions options;
    options.load_shared = false;
    options.experts = experts;
    options.quantize = quantize;
    Worker w;
    w.experts = experts;
    MOE_ASSIGN_OR_RETURN(w.weights, checkpoint.LoadWeights(options));
    w.ffn = std::make_unique<ExpertFfn>(w.weights.get());
    t->workers_.push_back(std::move(w));
  }
  return t;
}

InProcessTransport::InProcessTransport(const Placement& placement, int64_t expert_count,
                                       int64_t hidden)
    : hidden_(hidden), dispatcher_(placement.workers, expert_count, hidden, DispatchOptions{}) {}

absl::Status InProcessTransport::Exchange(int64_t layer, const Routing& routing, const float* x,
                                          float* out) {
  return dispatcher_.Exchange(layer, routing, x, out, &links_);
}

void InProcessTransport::Links::Start(int32_t w, int64_t layer, const DispatchRows& rows,
                                      const float* x) {
  Worker& worker = t_->workers_[w];
  const size_t floats = static_cast<size_t>(rows.rows() * t_->hidden_);
  if (rows_.size() < floats) rows_.resize(floats);
  if (worker.partial.size() < floats) worker.partial.resize(floats);
  GatherRows(x, t_->hidden_, rows.tokens, rows_.data());
  const ExpertBatch batch{layer, rows.rows(), rows_.data(), rows.offsets, rows.assignments};
  worker.ffn->Forward(batch, worker.partial.data());
}

absl::StatusOr<const void*> InProcessTransport::Links::Answer(int32_t w, DispatchReport*) {
  return static_cast<const void*>(t_->workers_[w].partial.data());
}

std::string InProcessTransport::Links::Name(int32_t w) {
  return absl::StrCat("in-process expert slice ", w, " (experts ",
                      t_->workers_[w].experts.ToString(), ")");
}

}  // namespace moe
