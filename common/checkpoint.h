// A model checkpoint as the binaries open it: either a Hugging Face directory (config.json,
// *.safetensors, tokenizer files) or a GGUF file (or a directory holding exactly one). The one
// place that tells the two apart; everything after it sees a ModelConfig, ModelWeights and a
// fingerprint.
#ifndef MOE_COMMON_CHECKPOINT_H_
#define MOE_COMMON_CHECKPOINT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/gguf.h"
#include "common/model_config.h"
#include "common/safetensors.h"
#include "common/tokenizer.h"
#include "common/weights.h"

namespace moe {

// Thread-safety: immutable after Open except the tensor mappings, which are thread-safe.
class Checkpoint {
 public:
  // `path`: a directory with config.json (safetensors), a *.gguf file (or any file of a split
  // set NAME-0000K-of-0000N.gguf), or a directory with no config.json holding one GGUF model
  // (one file or one split set). NOT_FOUND when nothing loadable is there;
  // INVALID_ARGUMENT naming the file for malformed ones or several candidate GGUF files.
  static absl::StatusOr<std::shared_ptr<Checkpoint>> Open(const std::string& path);

  const std::string& path() const { return path_; }  // the directory or the .gguf file
  bool is_gguf() const { return gguf_ != nullptr; }
  const ModelConfig& config() const { return config_; }
  // Equal for the same model on every machine (config and tensor headers).
  const std::string& fingerprint() const { return fingerprint_; }

  // Maps and validates the tensors `options` asks for (see ModelWeights).
  absl::StatusOr<std::unique_ptr<ModelWeights>> LoadWeights(const WeightsOptions& options) const;
  // The tokenizer: tokenizer.json, else tokenizer.model (+ added_tokens.json and the config
  // files) of a directory (Tokenizer::Load), or the vocabulary in a GGUF file's metadata
  // (Tokenizer::FromGguf).
  absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer() const;
  // The chat template's source: the directory's (ChatTemplate::FindSource) or the GGUF file's
  // tokenizer.chat_template. NOT_FOUND saying so when the model has none.
  absl::StatusOr<std::string> ChatTemplateSource() const;

 private:
  Checkpoint() = default;

  std::string path_;
  ModelConfig config_;
  std::string fingerprint_;
  std::shared_ptr<TensorStore> store_;    // safetensors, or
  std::shared_ptr<const GgufFile> gguf_;  // GGUF
};

}  // namespace moe

#endif  // MOE_COMMON_CHECKPOINT_H_
