// Model weights, validated once at load against the config so the forward pass has no error
// paths. Matrices stay in the checkpoint's dtype in read-only mappings; the small vectors the
// hot loop reads per token (norms, router) are widened to f32 copies.
//
// Both on-disk MoE layouts load:
//   classic (mergekit-moe, transformers < 5):
//     model.layers.{i}.block_sparse_moe.gate.weight            [experts, hidden]
//     model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight  [ffn, hidden]   (gate)
//     model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight  [ffn, hidden]   (up)
//     model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight  [hidden, ffn]   (down)
//   fused (transformers v5, new mergekit):
//     model.layers.{i}.mlp.gate.weight                         [experts, hidden]
//     model.layers.{i}.mlp.experts.gate_up_proj                [experts, 2*ffn, hidden]
//                                                               rows [0, ffn) = w1, [ffn, 2ffn) =
//                                                               w3
//     model.layers.{i}.mlp.experts.down_proj                   [experts, hidden, ffn]
// Dense Llama/Mistral checkpoints (mlp.{gate,up,down}_proj) load as expert 0 of one.
#ifndef MOE_COMMON_WEIGHTS_H_
#define MOE_COMMON_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/expert_range.h"
#include "common/kernels.h"
#include "common/model_config.h"
#include "common/safetensors.h"

namespace moe {

class GgufFile;
using kernels::WeightMatrix;

// One expert's SwiGLU FFN: w2(silu(w1 x) * w3 x).
struct ExpertWeights {
  WeightMatrix w1;  // [ffn, hidden]
  WeightMatrix w3;  // [ffn, hidden]
  WeightMatrix w2;  // [hidden, ffn]
};

// Everything of one layer except the experts.
struct LayerWeights {
  std::vector<float> input_norm;           // [hidden]
  WeightMatrix q_proj;                     // [heads * head_dim, hidden]
  WeightMatrix k_proj;                     // [kv_heads * head_dim, hidden]
  WeightMatrix v_proj;                     // [kv_heads * head_dim, hidden]
  WeightMatrix o_proj;                     // [hidden, heads * head_dim]
  std::vector<float> post_attention_norm;  // [hidden]
  std::vector<float> router;               // [experts, hidden]; empty for dense models
};

// What to load. Default: everything.
struct WeightsOptions {
  // Embeddings, attention, norms, router, lm_head (what the coordinator needs).
  bool load_shared = true;
  // Experts of every layer to load (kToLast: to the model's last expert). An empty range loads
  // no expert (the coordinator of a cluster).
  ExpertRange experts = ExpertRange::All();
  // Quantize-on-load (safetensors only): every weight matrix of the load (embeddings, lm_head,
  // attention, experts; not norms or the router) is quantized to this type (Q8_0, Q4_K, Q6_K)
  // while loading, and the checkpoint's mapping of it released, so it stays resident only
  // quantized. Matrices whose rows are not a multiple of the type's block stay as stored.
  std::optional<DType> quantize;
};

class ModelWeights {
 public:
  // Maps and validates the requested tensors of the checkpoint in `model_dir`. Errors name the
  // tensor and say what was expected, e.g. "tensor model.layers.3.self_attn.q_proj.weight:
  // expected [2048, 2048] BF16, got [2048, 1024] BF16". Only requested tensors are mapped.
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(const std::string& model_dir,
                                                            const ModelConfig& config,
                                                            const WeightsOptions& options);
  // Same over an already opened store (the store must outlive the weights).
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(std::shared_ptr<TensorStore> store,
                                                            const ModelConfig& config,
                                                            const WeightsOptions& options);
  // The same from a GGUF file of architecture llama (common/gguf_model.cc): tensors keep their
  // own types (GGUF files mix them), each checked for name, ggml dims and a supported type.
  static absl::StatusOr<std::unique_ptr<ModelWeights>> LoadGguf(
      std::shared_ptr<const GgufFile> file, const ModelConfig& config,
      const WeightsOptions& options);

  const ModelConfig& config() const { return config_; }
  // The dtype of the matrices: one per safetensors checkpoint; for GGUF (mixed types) that of
  // the first hosted expert's w1 (or of the embedding when no expert is loaded).
  DType dtype() const { return dtype_; }

  // Shared weights; REQUIRES: options.load_shared.
  const WeightMatrix& embed_tokens() const { return embed_tokens_; }    // [vocab, hidden]
  const std::vector<float>& final_norm() const { return final_norm_; }  // [hidden]
  const WeightMatrix& lm_head() const { return lm_head_; }  // [vocab, hidden] (tied or not)
  const LayerWeights& layer(int64_t i) const { return layers_[i]; }

  // Hosted experts.
  const ExpertRange& hosted_experts() const { return hosted_; }
  bool HostsExpert(int64_t expert) const { return hosted_.Contains(expert); }
  // REQUIRES: HostsExpert(expert).
  const ExpertWeights& expert(int64_t layer, int64_t expert) const {
    return experts_[layer * hosted_.size() + (expert - hosted_.begin)];
  }

  // Bytes of checkpoint tensors mapped by this load.
  uint64_t mapped_tensor_bytes() const {
    return store_ != nullptr ? store_->mapped_tensor_bytes() : gguf_mapped_bytes_;
  }
  // Bytes of the weights this load holds itself (quantize-on-load), beside the mappings.
  uint64_t owned_bytes() const;
  // Bytes of the hosted experts' matrices.
  uint64_t expert_bytes() const;

 private:
  class Loader;
  ModelWeights() = default;
  // Resolves `experts` (kToLast) against config_ into hosted_; an empty range is allowed.
  absl::Status SetHostedExperts(const ExpertRange& experts);
  // Quantizes every loaded matrix whose rows fit the block; true when all of them did.
  bool QuantizeMatrices(DType dtype);

  ModelConfig config_;
  DType dtype_ = DType::kF32;
  std::shared_ptr<TensorStore> store_;       // safetensors, or
  std::shared_ptr<const GgufFile> gguf_;     // GGUF
  uint64_t gguf_mapped_bytes_ = 0;           // bytes of the GGUF tensors (or slices) used
  std::vector<std::vector<uint8_t>> owned_;  // quantize-on-load results the matrices point to
  WeightMatrix embed_tokens_;
  std::vector<float> final_norm_;
  WeightMatrix lm_head_;
  std::vector<LayerWeights> layers_;
  ExpertRange hosted_;                  // resolved: end is concrete
  std::vector<ExpertWeights> experts_;  // [layer][expert - hosted_.begin]
};

}  // namespace moe

#endif  // MOE_COMMON_WEIGHTS_H_
