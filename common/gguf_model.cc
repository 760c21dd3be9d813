#include "common/gguf_model.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/fingerprint.h"
#include "common/kernels.h"
#include "common/status_macros.h"
#include "common/weights.h"
#include "glog/logging.h"

namespace moe {
namespace {

constexpr struct {
  uint32_t ggml_id;
  DType dtype;
} kSupportedTypes[] = {
    {0, DType::kF32},   {1, DType::kF16},   {30, DType::kBF16}, {8, DType::kQ8_0},
    {2, DType::kQ4_0},  {3, DType::kQ4_1},  {6, DType::kQ5_0},  {7, DType::kQ5_1},
    {12, DType::kQ4_K}, {13, DType::kQ5_K}, {14, DType::kQ6_K},
};

absl::Status Bad(const GgufFile& f, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(f.path(), ": ", what));
}

// A positive integer metadata value, or `fallback` (when >= 0) if the key is absent; a
// fallback of 0 (derived from other keys) is an error too.
absl::StatusOr<int64_t> PositiveKey(const GgufFile& f, const std::string& key,
                                    int64_t fallback = -1) {
  if (f.FindValue(key) == nullptr && fallback > 0) return fallback;
  if (f.FindValue(key) == nullptr && fallback == 0) {
    return Bad(f, absl::StrCat("metadata ", key, " is missing and its default would be 0"));
  }
  MOE_ASSIGN_OR_RETURN(uint64_t v, f.GetUint(key));
  if (v == 0 || v > (uint64_t{1} << 31)) {
    return Bad(f, absl::StrCat("metadata ", key, " = ", v, " is out of range"));
  }
  return static_cast<int64_t>(v);
}

// A float metadata value, or `fallback` if the key is absent.
absl::StatusOr<double> FloatKey(const GgufFile& f, const std::string& key, double fallback) {
  if (f.FindValue(key) == nullptr) return fallback;
  return f.GetFloat(key);
}

std::string Describe(const std::vector<int64_t>& dims, const char* type) {
  return absl::StrCat("{", absl::StrJoin(dims, ", "), "} ", type);
}

}  // namespace

std::optional<DType> DTypeOfGgmlType(uint32_t ggml_type) {
  for (const auto& s : kSupportedTypes) {
    if (s.ggml_id == ggml_type) return s.dtype;
  }
  return std::nullopt;
}

uint32_t GgmlTypeOf(DType dtype) {
  for (const auto& s : kSupportedTypes) {
    if (s.dtype == dtype) return s.ggml_id;
  }
  LOG(FATAL) << "no ggml type for " << DTypeName(dtype);
}

absl::StatusOr<DType> DTypeOfGgufTensor(const GgufTensorInfo& t, const std::string& file) {
  if (const std::optional<DType> dtype = DTypeOfGgmlType(t.type_id)) return *dtype;
  std::vector<std::string> supported;
  for (const auto& s : kSupportedTypes) supported.emplace_back(DTypeName(s.dtype));
  return absl::InvalidArgumentError(absl::StrCat(file, ": tensor ", t.name, " has type ",
                                                 t.type->name,
                                                 ", which moe-cluster cannot compute with "
                                                 "(supported: ",
                                                 absl::StrJoin(supported, ", "), ")"));
}

absl::StatusOr<ModelConfig> ModelConfigFromGguf(const GgufFile& f) {
  MOE_ASSIGN_OR_RETURN(std::string arch, f.GetString("general.architecture"));
  if (arch != "llama") {
    return Bad(f, absl::StrCat("architecture \"", arch,
                               "\" is not supported (llama: Llama, Mistral, Mixtral and "
                               "their merges)"));
  }
  if (const GgufValue* scaling = f.FindValue("llama.rope.scaling.type");
      scaling != nullptr && !(scaling->type == GgufValueType::kString && scaling->s == "none")) {
    return Bad(f, "llama.rope.scaling.type is set: RoPE scaling is not supported");
  }
  ModelConfig c;
  c.rope_interleaved = true;
  MOE_ASSIGN_OR_RETURN(c.hidden_size, PositiveKey(f, "llama.embedding_length"));
  MOE_ASSIGN_OR_RETURN(c.num_hidden_layers, PositiveKey(f, "llama.block_count"));
  MOE_ASSIGN_OR_RETURN(c.num_attention_heads, PositiveKey(f, "llama.attention.head_count"));
  MOE_ASSIGN_OR_RETURN(c.num_key_value_heads,
                       PositiveKey(f, "llama.attention.head_count_kv", c.num_attention_heads));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return Bad(f,
               absl::StrCat("llama.attention.head_count (", c.num_attention_heads,
                            ") is not a multiple of head_count_kv (", c.num_key_value_heads, ")"));
  }
  MOE_ASSIGN_OR_RETURN(c.intermediate_size, PositiveKey(f, "llama.feed_forward_length"));
  MOE_ASSIGN_OR_RETURN(c.max_position_embeddings, PositiveKey(f, "llama.context_length"));
  // Without key_length, head_dim is hidden / heads, which must then divide evenly.
  const int64_t default_head_dim =
      c.hidden_size % c.num_attention_heads == 0 ? c.hidden_size / c.num_attention_heads : 0;
  MOE_ASSIGN_OR_RETURN(c.head_dim, PositiveKey(f, "llama.attention.key_length", default_head_dim));
  MOE_ASSIGN_OR_RETURN(int64_t rotary, PositiveKey(f, "llama.rope.dimension_count", c.head_dim));
  if (rotary != c.head_dim || c.head_dim % 2 != 0) {
    return Bad(f, absl::StrCat("llama.rope.dimension_count ", rotary, " with head_dim ", c.head_dim,
                               ": only full, even rotary dimensions are supported"));
  }
  // llama.cpp's defaults for llama.
  MOE_ASSIGN_OR_RETURN(c.rope_theta, FloatKey(f, "llama.rope.freq_base", 1e4));
  MOE_ASSIGN_OR_RETURN(c.rms_norm_eps, FloatKey(f, "llama.attention.layer_norm_rms_epsilon", 1e-5));
  if (!(c.rope_theta > 0) || !(c.rms_norm_eps > 0) || !std::isfinite(c.rope_theta)) {
    return Bad(f, "llama.rope.freq_base and layer_norm_rms_epsilon must be positive");
  }
  MOE_ASSIGN_OR_RETURN(c.num_local_experts, PositiveKey(f, "llama.expert_count", 1));
  c.is_moe = f.FindTensor("blk.0.ffn_gate_inp.weight") != nullptr;
  if (c.is_moe) {
    MOE_ASSIGN_OR_RETURN(c.num_experts_per_tok, PositiveKey(f, "llama.expert_used_count"));
    if (c.num_experts_per_tok > c.num_local_experts) {
      return Bad(f,
                 absl::StrCat("llama.expert_used_count (", c.num_experts_per_tok,
                              ") is larger than llama.expert_count (", c.num_local_experts, ")"));
    }
  } else {
    c.num_local_experts = 1;
  }
  // The counts that size the loader's tables must match tensors that are in the file.
  const std::string last_norm = absl::StrCat("blk.", c.num_hidden_layers - 1, ".attn_norm.weight");
  if (f.FindTensor(last_norm) == nullptr) {
    return Bad(f, absl::StrCat("llama.block_count is ", c.num_hidden_layers, " but tensor ",
                               last_norm, " is missing"));
  }
  if (c.is_moe) {
    const GgufTensorInfo* router = f.FindTensor("blk.0.ffn_gate_inp.weight");
    if (router->dims.size() != 2 || router->dims[1] != c.num_local_experts) {
      return Bad(f, absl::StrCat("llama.expert_count is ", c.num_local_experts,
                                 " but tensor blk.0.ffn_gate_inp.weight is ",
                                 Describe(router->dims, router->type->name)));
    }
  }
  c.architecture = c.is_moe ? "MixtralForCausalLM" : "LlamaForCausalLM";
  const GgufTensorInfo* embed = f.FindTensor("token_embd.weight");
  if (embed == nullptr || embed->dims.size() != 2 || embed->dims[0] != c.hidden_size) {
    return Bad(f, absl::StrCat("tensor token_embd.weight must be {", c.hidden_size, ", vocab}"));
  }
  c.vocab_size = embed->dims[1];
  if (f.FindValue("llama.vocab_size") != nullptr) {
    MOE_ASSIGN_OR_RETURN(int64_t vocab, PositiveKey(f, "llama.vocab_size"));
    if (vocab != c.vocab_size) {
      return Bad(f, absl::StrCat("llama.vocab_size ", vocab, " differs from token_embd's ",
                                 c.vocab_size, " rows"));
    }
  }
  c.tie_word_embeddings = f.FindTensor("output.weight") == nullptr;
  return c;
}

std::string GgufFingerprint(const ModelConfig& config, const GgufFile& file) {
  std::vector<std::string> tensors;
  for (const GgufTensorInfo& t : file.header().tensors) {
    tensors.push_back(absl::StrCat(t.name, ":", Describe(t.dims, t.type->name)));
  }
  std::sort(tensors.begin(), tensors.end());
  return ModelFingerprint(config, tensors);
}

namespace {

// Finds GGUF tensors and checks their dims and types; hands out matrices into the mapping.
class GgufLoader {
 public:
  GgufLoader(const GgufFile& file, uint64_t* mapped_bytes) : f_(file), mapped_(mapped_bytes) {}

  // The tensor `name` with ggml dims `dims`, or an error naming both.
  absl::StatusOr<const GgufTensorInfo*> Tensor(const std::string& name,
                                               const std::vector<int64_t>& dims) const {
    const GgufTensorInfo* t = f_.FindTensor(name);
    if (t == nullptr) {
      return absl::NotFoundError(absl::StrCat(f_.path(), ": tensor ", name, " (expected ",
                                              Describe(dims, "of any supported type"),
                                              ") is missing"));
    }
    if (t->dims != dims) {
      return Bad(f_, absl::StrCat("tensor ", name, ": expected dims ", Describe(dims, ""), "got ",
                                  Describe(t->dims, t->type->name)));
    }
    return t;
  }

  // Matrix [rows, cols] (ggml dims {cols, rows}), or rows [row_begin, row_begin + rows) of
  // slice `index` of a stacked {cols, slice_rows, n} tensor.
  absl::StatusOr<WeightMatrix> Matrix(const std::string& name, int64_t rows, int64_t cols) {
    MOE_ASSIGN_OR_RETURN(const GgufTensorInfo* t, Tensor(name, {cols, rows}));
    return Slice(*t, 0, 0, rows);
  }
  absl::StatusOr<WeightMatrix> Slice(const GgufTensorInfo& t, int64_t index, int64_t row_begin,
                                     int64_t rows) {
    MOE_ASSIGN_OR_RETURN(DType dtype, DTypeOfGgufTensor(t, f_.path()));
    const int64_t cols = t.dims[0];
    const int64_t slice_rows = t.dims.size() > 1 ? t.dims[1] : 1;
    const uint64_t offset = (index * slice_rows + row_begin) * t.row_bytes();
    const uint64_t bytes = static_cast<uint64_t>(rows) * t.row_bytes();
    f_.Prefault(t, offset, bytes);
    *mapped_ += bytes;
    return WeightMatrix{f_.Data(t, offset), dtype, rows, cols, cols};
  }

  // A small tensor of `elements` values widened to f32 (norms, the router).
  absl::StatusOr<std::vector<float>> Vector(const std::string& name,
                                            const std::vector<int64_t>& dims) {
    MOE_ASSIGN_OR_RETURN(const GgufTensorInfo* t, Tensor(name, dims));
    MOE_ASSIGN_OR_RETURN(WeightMatrix m, Slice(*t, 0, 0, t->rows()));
    std::vector<float> out(static_cast<size_t>(t->rows() * t->row_elements()));
    for (int64_t r = 0; r < t->rows(); ++r) {
      kernels::ConvertToF32(m.Row(r), m.dtype, m.cols, &out[r * m.cols]);
    }
    return out;
  }

 private:
  const GgufFile& f_;
  uint64_t* mapped_;
};

std::string Blk(int64_t layer, const char* name) {
  return absl::StrCat("blk.", layer, ".", name, ".weight");
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::LoadGguf(
    std::shared_ptr<const GgufFile> file, const ModelConfig& c, const WeightsOptions& options) {
  std::unique_ptr<ModelWeights> w(new ModelWeights());
  w->config_ = c;
  w->gguf_ = file;
  if (options.quantize.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file->path(),
                     ": --quantize converts safetensors checkpoints; a GGUF file is served in "
                     "the types it stores"));
  }
  MOE_RETURN_IF_ERROR(w->SetHostedExperts(options.experts));
  GgufLoader loader(*file, &w->gguf_mapped_bytes_);
  const int64_t hidden = c.hidden_size;
  MOE_ASSIGN_OR_RETURN(const GgufTensorInfo* embed,
                       loader.Tensor("token_embd.weight", {hidden, c.vocab_size}));
  MOE_ASSIGN_OR_RETURN(w->dtype_, DTypeOfGgufTensor(*embed, file->path()));
  if (options.load_shared) {
    MOE_ASSIGN_OR_RETURN(w->embed_tokens_,
                         loader.Matrix("token_embd.weight", c.vocab_size, hidden));
    MOE_ASSIGN_OR_RETURN(w->final_norm_, loader.Vector("output_norm.weight", {hidden}));
    if (c.tie_word_embeddings) {
      w->lm_head_ = w->embed_tokens_;
    } else {
      MOE_ASSIGN_OR_RETURN(w->lm_head_, loader.Matrix("output.weight", c.vocab_size, hidden));
    }
    w->layers_.resize(c.num_hidden_layers);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      LayerWeights& l = w->layers_[i];
      MOE_ASSIGN_OR_RETURN(l.input_norm, loader.Vector(Blk(i, "attn_norm"), {hidden}));
      MOE_ASSIGN_OR_RETURN(l.post_attention_norm, loader.Vector(Blk(i, "ffn_norm"), {hidden}));
      MOE_ASSIGN_OR_RETURN(l.q_proj, loader.Matrix(Blk(i, "attn_q"), c.q_dim(), hidden));
      MOE_ASSIGN_OR_RETURN(l.k_proj, loader.Matrix(Blk(i, "attn_k"), c.kv_dim(), hidden));
      MOE_ASSIGN_OR_RETURN(l.v_proj, loader.Matrix(Blk(i, "attn_v"), c.kv_dim(), hidden));
      MOE_ASSIGN_OR_RETURN(l.o_proj, loader.Matrix(Blk(i, "attn_output"), hidden, c.q_dim()));
      if (c.is_moe) {
        MOE_ASSIGN_OR_RETURN(l.router,
                             loader.Vector(Blk(i, "ffn_gate_inp"), {hidden, c.num_local_experts}));
      }
    }
  }
  const int64_t hosted = w->hosted_.size();
  const int64_t ffn = c.intermediate_size;
  w->experts_.resize(c.num_hidden_layers * hosted);
  for (int64_t i = 0; i < c.num_hidden_layers && hosted > 0; ++i) {
    ExpertWeights* out = &w->experts_[i * hosted];
    const int64_t n = c.num_local_experts;
    if (!c.is_moe) {
      MOE_ASSIGN_OR_RETURN(out->w1, loader.Matrix(Blk(i, "ffn_gate"), ffn, hidden));
      MOE_ASSIGN_OR_RETURN(out->w3, loader.Matrix(Blk(i, "ffn_up"), ffn, hidden));
      MOE_ASSIGN_OR_RETURN(out->w2, loader.Matrix(Blk(i, "ffn_down"), hidden, ffn));
    } else if (const bool fused = file->FindTensor(Blk(i, "ffn_gate_up_exps")) != nullptr;
               fused || file->FindTensor(Blk(i, "ffn_gate_exps")) != nullptr) {
      // Stacked: ffn_{gate,up}_exps {hidden, ffn, n}, or fused: ffn_gate_up_exps
      // {hidden, 2 ffn, n} with up's rows after gate's.
      const GgufTensorInfo *gate = nullptr, *up = nullptr;
      if (fused) {
        MOE_ASSIGN_OR_RETURN(gate, loader.Tensor(Blk(i, "ffn_gate_up_exps"), {hidden, 2 * ffn, n}));
        up = gate;
      } else {
        MOE_ASSIGN_OR_RETURN(gate, loader.Tensor(Blk(i, "ffn_gate_exps"), {hidden, ffn, n}));
        MOE_ASSIGN_OR_RETURN(up, loader.Tensor(Blk(i, "ffn_up_exps"), {hidden, ffn, n}));
      }
      MOE_ASSIGN_OR_RETURN(const GgufTensorInfo* down,
                           loader.Tensor(Blk(i, "ffn_down_exps"), {ffn, hidden, n}));
      const int64_t up_row = fused ? ffn : 0;
      for (int64_t e = 0; e < hosted; ++e) {
        const int64_t id = w->hosted_.begin + e;
        MOE_ASSIGN_OR_RETURN(out[e].w1, loader.Slice(*gate, id, 0, ffn));
        MOE_ASSIGN_OR_RETURN(out[e].w3, loader.Slice(*up, id, up_row, ffn));
        MOE_ASSIGN_OR_RETURN(out[e].w2, loader.Slice(*down, id, 0, hidden));
      }
    } else {
      for (int64_t e = 0; e < hosted; ++e) {
        const int64_t id = w->hosted_.begin + e;
        const auto name = [&](const char* what) {
          return absl::StrCat("blk.", i, ".", what, ".", id, ".weight");
        };
        MOE_ASSIGN_OR_RETURN(out[e].w1, loader.Matrix(name("ffn_gate"), ffn, hidden));
        MOE_ASSIGN_OR_RETURN(out[e].w3, loader.Matrix(name("ffn_up"), ffn, hidden));
        MOE_ASSIGN_OR_RETURN(out[e].w2, loader.Matrix(name("ffn_down"), hidden, ffn));
      }
    }
  }
  if (hosted > 0) w->dtype_ = w->experts_[0].w1.dtype;
  return w;
}

}  // namespace moe
