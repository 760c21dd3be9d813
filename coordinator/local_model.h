// A whole model in this process: config, tokenizer, shared weights, in-process expert workers
// and the engine, wired together. What `moe-cli generate --model` and `moe-bench` run.
#ifndef MOE_COORDINATOR_LOCAL_MODEL_H_
#define MOE_COORDINATOR_LOCAL_MODEL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/safetensors.h"
#include "common/tokenizer.h"
#include "common/weights.h"
#include "coordinator/engine.h"
#include "coordinator/in_process_transport.h"

namespace moe {

struct LocalModelOptions {
  std::string model_dir;           // Hugging Face layout: config.json, *.safetensors, tokenizer
  int64_t in_process_workers = 1;  // expert slices (contiguous placement), >= 1
  bool load_tokenizer = true;      // false for benchmarks on checkpoints without one
  EngineOptions engine;
};

class LocalModel {
 public:
  // Errors name the file or tensor at fault (missing config.json, bad tensor, no tokenizer).
  static absl::StatusOr<std::unique_ptr<LocalModel>> Create(const LocalModelOptions& options);

  Engine* engine() { return engine_.get(); }
  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return *weights_; }
  // nullptr when loaded with load_tokenizer = false.
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  InProcessTransport* transport() { return transport_.get(); }

 private:
  LocalModel() = default;
  ModelConfig config_;
  std::shared_ptr<TensorStore> store_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<InProcessTransport> transport_;
  std::unique_ptr<Engine> engine_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_LOCAL_MODEL_H_
