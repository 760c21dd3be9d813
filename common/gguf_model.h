// Models from GGUF files of architecture "llama" (how llama.cpp's converter writes Llama,
// Mistral, Mixtral and mergekit frankenMoEs): the config from the metadata, and
// ModelWeights::LoadGguf (declared in weights.h) from the tensors.
//
// Tensor names (ggml dims, contiguous first):
//   token_embd.weight {hidden, vocab}   output_norm.weight {hidden}   output.weight {hidden, vocab}
//   blk.N.attn_norm.weight {hidden}     blk.N.ffn_norm.weight {hidden}
//   blk.N.attn_q.weight {hidden, heads*hd}  attn_k / attn_v {hidden, kv_heads*hd}
//   blk.N.attn_output.weight {heads*hd, hidden}
//   MoE: blk.N.ffn_gate_inp.weight {hidden, experts} (the router) and the experts either
//     stacked: blk.N.ffn_{gate,up}_exps.weight {hidden, ffn, experts},
//              blk.N.ffn_down_exps.weight {ffn, hidden, experts}
//     fused:   blk.N.ffn_gate_up_exps.weight {hidden, 2*ffn, experts} (gate rows first)
//     or one per expert: blk.N.ffn_{gate,up,down}.E.weight
//   dense: blk.N.ffn_{gate,up,down}.weight
// output.weight absent: tied to token_embd. The converter permutes the rows of attn_q/attn_k
// for llama.cpp's RoPE; the config sets rope_interleaved so the engine rotates the matching
// pairs (no copy, same result as HF's split-half on the original rows).
#ifndef MOE_COMMON_GGUF_MODEL_H_
#define MOE_COMMON_GGUF_MODEL_H_

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/gguf.h"
#include "common/model_config.h"

namespace moe {

// The config from the llama.* metadata: embedding_length, block_count, attention.head_count
// (and head_count_kv, key_length), feed_forward_length, context_length, rope.freq_base,
// attention.layer_norm_rms_epsilon, expert_count / expert_used_count, rope.dimension_count;
// vocab from the tokenizer or token_embd. INVALID_ARGUMENT naming the key for a missing or
// inconsistent value and for what the engine does not implement (other architectures, RoPE
// scaling, partial rotary dimensions).
absl::StatusOr<ModelConfig> ModelConfigFromGguf(const GgufFile& file);

// The engine's dtype for a ggml type id, nullopt for the types it cannot compute with.
std::optional<DType> DTypeOfGgmlType(uint32_t ggml_type);
// The inverse: the ggml type id of a dtype the engine computes with (every DType has one).
uint32_t GgmlTypeOf(DType dtype);

// The engine's dtype for a tensor's ggml type. INVALID_ARGUMENT naming the tensor and its type
// for the types moe-cluster cannot compute with (e.g. IQ2_XS), listing those it can.
absl::StatusOr<DType> DTypeOfGgufTensor(const GgufTensorInfo& tensor, const std::string& file);

// A stable identity of the model (as ModelFingerprint for safetensors): config shape fields
// and every tensor's name, type and dims.
std::string GgufFingerprint(const ModelConfig& config, const GgufFile& file);

}  // namespace moe

#endif  // MOE_COMMON_GGUF_MODEL_H_
