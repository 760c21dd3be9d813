// A model's coordinator side wired together: config, tokenizer, shared weights, the transport
// to the experts (in-process workers by default) and the engine. What `moe-cli generate
// --model`, `moe-bench` and `moe-coordinator` run.
#ifndef MOE_COORDINATOR_LOCAL_MODEL_H_
#define MOE_COORDINATOR_LOCAL_MODEL_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "common/checkpoint.h"
#include "common/tokenizer.h"
#include "common/weights.h"
#include "coordinator/engine.h"
#include "coordinator/transport/in_process_transport.h"

namespace moe {

// Builds the transport to the experts once the checkpoint is open (e.g. a GrpcTransport to
// remote workers). Unset: in-process workers.
using TransportFactory =
    std::function<absl::StatusOr<std::unique_ptr<ExpertTransport>>(const Checkpoint& checkpoint)>;

struct LocalModelOptions {
  std::string model_dir;  // Hugging Face directory (config.json, *.safetensors) or a GGUF file
  int64_t in_process_workers = 1;      // expert slices (contiguous placement), >= 1
  TransportFactory transport_factory;  // overrides in_process_workers when set
  bool load_tokenizer = true;          // false for benchmarks on checkpoints without one
  // Quantize-on-load of a safetensors checkpoint's matrices (WeightsOptions::quantize).
  std::optional<DType> quantize;
  EngineOptions engine;
};

class LocalModel {
 public:
  // Errors name the file or tensor at fault (missing config.json, bad tensor, no tokenizer).
  static absl::StatusOr<std::unique_ptr<LocalModel>> Create(const LocalModelOptions& options);

  Engine* engine() { return engine_.get(); }
  const ModelConfig& config() const { return checkpoint_->config(); }
  const ModelWeights& weights() const { return *weights_; }
  // nullptr when loaded with load_tokenizer = false.
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  ExpertTransport* transport() { return transport_.get(); }
  const Checkpoint& checkpoint() const { return *checkpoint_; }

 private:
  LocalModel() = default;
  std::shared_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<ExpertTransport> transport_;
  std::unique_ptr<Engine> engine_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_LOCAL_MODEL_H_
