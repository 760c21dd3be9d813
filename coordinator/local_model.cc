#include "coordinator/local_model.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace moe {

absl::StatusOr<std::unique_ptr<LocalModel>> LocalModel::Create(const LocalModelOptions& options) {
  if (options.in_process_workers < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("in-process workers must be >= 1, got ", options.in_process_workers));
  }
  std::unique_ptr<LocalModel> m(new LocalModel());
  MOE_ASSIGN_OR_RETURN(m->checkpoint_, Checkpoint::Open(options.model_dir));
  if (options.load_tokenizer) {
    MOE_ASSIGN_OR_RETURN(m->tokenizer_, m->checkpoint_->LoadTokenizer());
  }
  WeightsOptions shared;
  shared.experts = {};  // experts are loaded by the in-process workers
  shared.quantize = options.quantize;
  MOE_ASSIGN_OR_RETURN(m->weights_, m->checkpoint_->LoadWeights(shared));
  LOG(INFO) << "loaded shared weights of " << options.model_dir << " ("
            << m->config().num_hidden_layers << " layers, " << m->config().num_local_experts
            << " experts, top-" << m->config().num_experts_per_tok << ", "
            << DTypeName(m->weights_->dtype()) << ")";
  if (options.transport_factory) {
    MOE_ASSIGN_OR_RETURN(m->transport_, options.transport_factory(*m->checkpoint_));
  } else {
    const Placement placement =
        Placement::Contiguous(m->config().num_local_experts, options.in_process_workers);
    MOE_ASSIGN_OR_RETURN(m->transport_,
                         InProcessTransport::Create(*m->checkpoint_, placement, options.quantize));
  }
  MOE_ASSIGN_OR_RETURN(m->engine_,
                       Engine::Create(m->weights_.get(), m->transport_.get(), options.engine));
  if (options.engine.experts_per_token > 0 &&
      options.engine.experts_per_token != m->config().num_experts_per_tok) {
    LOG(WARNING) << "routing each token to " << options.engine.experts_per_token << " of its "
                 << m->config().num_local_experts << " experts (--experts-per-token); the model "
                 << "routes to " << m->config().num_experts_per_tok
                 << ": outputs are not the model's";
  }
  // Mapped, or (quantize-on-load) held as a quantized copy.
  LOG(INFO) << (m->weights_->mapped_tensor_bytes() + m->weights_->owned_bytes()) / 1048576.0
            << " MiB of shared weights of " << m->checkpoint_->path();
  return m;
}

}  // namespace moe
