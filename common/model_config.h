// Model shape and hyper-parameters from a Hugging Face config.json. Mixtral checkpoints and
// dense Llama/Mistral checkpoints (one expert of weight 1) share this one description.
#ifndef MOE_COMMON_MODEL_CONFIG_H_
#define MOE_COMMON_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace moe {

struct ModelConfig {
  std::string architecture;  // "MixtralForCausalLM", "LlamaForCausalLM", ...
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  // per expert
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads
  int64_t head_dim = 0;             // config head_dim, else hidden_size / num_attention_heads
  int64_t num_local_experts = 1;    // 1 for dense models
  int64_t num_experts_per_tok = 1;  // top-k
  bool is_moe = false;              // false: dense MLP stored as mlp.{gate,up,down}_proj
  double rms_norm_eps = 1e-5;
  double rope_theta = 1e6;  // top level or rope_parameters.rope_theta
  int64_t max_position_embeddings = 0;
  int64_t sliding_window = 0;        // 0 = full attention
  bool tie_word_embeddings = false;  // lm_head shares embed_tokens
  // RoPE rotates pairs (2i, 2i + 1) instead of HF's split-half (i, i + head_dim/2): GGUF
  // checkpoints, whose q/k rows llama.cpp's converter permuted into that order. Same math.
  bool rope_interleaved = false;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  // Experts each token's row goes to per layer (dense models: the one MLP).
  int64_t routed_experts_per_token() const { return is_moe ? num_experts_per_tok : 1; }
};

// Parses config.json text. `label` (the path) prefixes errors. INVALID_ARGUMENT for malformed
// JSON, missing or non-positive sizes, inconsistent heads, top-k > experts, and for anything the
// engine does not implement (other architectures, rope_scaling, biases, activations other than
// silu) — never a silent guess.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json, const std::string& label);

// Reads and parses `model_dir`/config.json (NOT_FOUND when it is missing).
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// Reads a whole file; NOT_FOUND naming it when it cannot be opened.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace moe

#endif  // MOE_COMMON_MODEL_CONFIG_H_
