#include "coordinator/transport/in_process_transport.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace moe {

absl::StatusOr<std::unique_ptr<InProcessTransport>> InProcessTransport::Create(
    const Checkpoint& checkpoint, const Placement& placement, std::optional<DType> quantize) {
  const ModelConfig& config = checkpoint.config();
  MOE_RETURN_IF_ERROR(placement.CheckCoverage(config.num_hidden_layers, config.num_local_experts));
  std::unique_ptr<InProcessTransport> t(new InProcessTransport(
      placement, config.num_hidden_layers, config.num_local_experts, config.hidden_size));
  for (int32_t i = 0; i < placement.worker_count(); ++i) {
    // Each slice loads the experts it serves in any layer.
    const ExpertRange experts = placement.Span(i, config.num_hidden_layers);
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

InProcessTransport::InProcessTransport(const Placement& placement, int64_t layer_count,
                                       int64_t expert_count, int64_t hidden)
    : hidden_(hidden),
      dispatcher_(placement, layer_count, expert_count, hidden, DispatchOptions{}) {}

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
