#include "common/weights.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/quant.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace moe {

// Maps tensors by name and checks them against the expected shape and the checkpoint dtype.
class ModelWeights::Loader {
 public:
  Loader(TensorStore* store, DType dtype) : store_(store), dtype_(dtype) {}

  // Names of the tensors this loader mapped.
  const std::vector<std::string>& mapped() const { return mapped_; }

  absl::StatusOr<TensorData> Tensor(const std::string& name, std::vector<int64_t> shape) {
    const TensorInfo* info = store_->Find(name);
    if (info == nullptr) {
      return absl::NotFoundError(absl::StrCat("tensor ", name, " (expected ",
                                              DescribeTensor(shape, dtype_),
                                              ") is missing from the checkpoint"));
    }
    if (info->shape != shape || info->dtype != dtype_) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": expected ",
                                                     DescribeTensor(shape, dtype_), ", got ",
                                                     DescribeTensor(info->shape, info->dtype)));
    }
    mapped_.push_back(name);
    return store_->Map(name);
  }

  absl::StatusOr<WeightMatrix> Matrix(const std::string& name, int64_t rows, int64_t cols) {
    MOE_ASSIGN_OR_RETURN(TensorData t, Tensor(name, {rows, cols}));
    return WeightMatrix{t.data, dtype_, rows, cols, cols};
  }

  absl::StatusOr<std::vector<float>> Vector(const std::string& name, std::vector<int64_t> shape) {
    MOE_ASSIGN_OR_RETURN(TensorData t, Tensor(name, shape));
    std::vector<float> out(t.info->num_elements);
    kernels::ConvertToF32(t.data, dtype_, t.info->num_elements, out.data());
    return out;
  }

  // Slice `index` of a stacked [n, rows, cols] tensor as a matrix.
  static WeightMatrix Slice(const TensorData& t, DType dtype, int64_t index, int64_t row_begin,
                            int64_t rows, int64_t cols) {
    const int64_t slice_rows = t.info->shape[1];
    const auto* base = static_cast<const uint8_t*>(t.data);
    const int64_t element = (index * slice_rows + row_begin) * cols;
    return WeightMatrix{base + element * DTypeSize(dtype), dtype, rows, cols, cols};
  }

 private:
  TensorStore* store_;
  DType dtype_;
  std::vector<std::string> mapped_;
};

namespace {

std::string LayerPrefix(int64_t layer) { return absl::StrCat("model.layers.", layer, "."); }

}  // namespace

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& model_dir,
                                                                 const ModelConfig& config,
                                                                 const WeightsOptions& options) {
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::Open(model_dir));
  return Load(std::shared_ptr<TensorStore>(std::move(store)), config, options);
}

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(std::shared_ptr<TensorStore> store,
                                                                 const ModelConfig& c,
                                                                 const WeightsOptions& options) {
  if (options.quantize.has_value() && !CanQuantizeTo(*options.quantize)) {
    std::vector<std::string> supported;
    for (DType t : kQuantizeTargets) supported.emplace_back(DTypeName(t));
    return absl::InvalidArgumentError(
        absl::StrCat("cannot quantize to ", std::string(DTypeName(*options.quantize)),
                     " (supported: ", absl::StrJoin(supported, ", "), ")"));
  }
  std::unique_ptr<ModelWeights> w(new ModelWeights());
  w->config_ = c;
  w->store_ = store;
  const TensorInfo* embed = store->Find("model.embed_tokens.weight");
  if (embed == nullptr) {
    return absl::NotFoundError("tensor model.embed_tokens.weight is missing from the checkpoint");
  }
  w->dtype_ = embed->dtype;
  MOE_RETURN_IF_ERROR(w->SetHostedExperts(options.experts));
  Loader loader(store.get(), w->dtype_);
  const int64_t hidden = c.hidden_size;
  if (options.load_shared) {
    MOE_ASSIGN_OR_RETURN(w->embed_tokens_,
                         loader.Matrix("model.embed_tokens.weight", c.vocab_size, hidden));
    MOE_ASSIGN_OR_RETURN(w->final_norm_, loader.Vector("model.norm.weight", {hidden}));
    if (c.tie_word_embeddings) {
      w->lm_head_ = w->embed_tokens_;
    } else {
      MOE_ASSIGN_OR_RETURN(w->lm_head_, loader.Matrix("lm_head.weight", c.vocab_size, hidden));
    }
    w->layers_.resize(c.num_hidden_layers);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      LayerWeights& l = w->layers_[i];
      const std::string p = LayerPrefix(i);
      MOE_ASSIGN_OR_RETURN(l.input_norm, loader.Vector(p + "input_layernorm.weight", {hidden}));
      MOE_ASSIGN_OR_RETURN(l.post_attention_norm,
                           loader.Vector(p + "post_attention_layernorm.weight", {hidden}));
      MOE_ASSIGN_OR_RETURN(l.q_proj,
                           loader.Matrix(p + "self_attn.q_proj.weight", c.q_dim(), hidden));
      MOE_ASSIGN_OR_RETURN(l.k_proj,
                           loader.Matrix(p + "self_attn.k_proj.weight", c.kv_dim(), hidden));
      MOE_ASSIGN_OR_RETURN(l.v_proj,
                           loader.Matrix(p + "self_attn.v_proj.weight", c.kv_dim(), hidden));
      MOE_ASSIGN_OR_RETURN(l.o_proj,
                           loader.Matrix(p + "self_attn.o_proj.weight", hidden, c.q_dim()));
      if (c.is_moe) {
        const std::string gate = store->Find(p + "mlp.gate.weight") != nullptr
                                     ? p + "mlp.gate.weight"
                                     : p + "block_sparse_moe.gate.weight";
        MOE_ASSIGN_OR_RETURN(l.router, loader.Vector(gate, {c.num_local_experts, hidden}));
      }
    }
  }
  const int64_t hosted = w->hosted_.size();
  w->experts_.resize(c.num_hidden_layers * hosted);
  const int64_t ffn = c.intermediate_size;
  for (int64_t i = 0; i < c.num_hidden_layers && hosted > 0; ++i) {
    const std::string p = LayerPrefix(i);
    ExpertWeights* out = &w->experts_[i * hosted];
    if (!c.is_moe) {
      MOE_ASSIGN_OR_RETURN(out->w1, loader.Matrix(p + "mlp.gate_proj.weight", ffn, hidden));
      MOE_ASSIGN_OR_RETURN(out->w3, loader.Matrix(p + "mlp.up_proj.weight", ffn, hidden));
      MOE_ASSIGN_OR_RETURN(out->w2, loader.Matrix(p + "mlp.down_proj.weight", hidden, ffn));
    } else if (store->Find(p + "mlp.experts.gate_up_proj") != nullptr) {
      const int64_t e_count = c.num_local_experts;
      MOE_ASSIGN_OR_RETURN(TensorData gate_up, loader.Tensor(p + "mlp.experts.gate_up_proj",
                                                             {e_count, 2 * ffn, hidden}));
      MOE_ASSIGN_OR_RETURN(TensorData down,
                           loader.Tensor(p + "mlp.experts.down_proj", {e_count, hidden, ffn}));
      for (int64_t e = 0; e < hosted; ++e) {
        const int64_t id = w->hosted_.begin + e;
        out[e].w1 = Loader::Slice(gate_up, w->dtype_, id, 0, ffn, hidden);
        out[e].w3 = Loader::Slice(gate_up, w->dtype_, id, ffn, ffn, hidden);
        out[e].w2 = Loader::Slice(down, w->dtype_, id, 0, hidden, ffn);
      }
    } else {
      for (int64_t e = 0; e < hosted; ++e) {
        const std::string q =
            absl::StrCat(p, "block_sparse_moe.experts.", w->hosted_.begin + e, ".");
        MOE_ASSIGN_OR_RETURN(out[e].w1, loader.Matrix(q + "w1.weight", ffn, hidden));
        MOE_ASSIGN_OR_RETURN(out[e].w3, loader.Matrix(q + "w3.weight", ffn, hidden));
        MOE_ASSIGN_OR_RETURN(out[e].w2, loader.Matrix(q + "w2.weight", hidden, ffn));
      }
    }
  }
  if (options.quantize.has_value()) {
    // Norms and the router were copied to f32 already; once every matrix is quantized nothing
    // points into the mappings any more.
    if (w->QuantizeMatrices(*options.quantize)) {
      for (const std::string& name : loader.mapped()) store->Release(name);
    } else {
      LOG(WARNING) << "--quantize " << DTypeName(*options.quantize) << ": matrices whose rows are "
                   << "not a multiple of " << DTypeBlockElements(*options.quantize)
                   << " values stay as stored (and mapped)";
    }
  }
  return w;
}

bool ModelWeights::QuantizeMatrices(DType dtype) {
  std::vector<WeightMatrix*> matrices;
  if (embed_tokens_.data != nullptr) matrices.push_back(&embed_tokens_);
  const bool tied = lm_head_.data == embed_tokens_.data;
  if (lm_head_.data != nullptr && !tied) matrices.push_back(&lm_head_);
  for (LayerWeights& l : layers_) {
    for (WeightMatrix* m : {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj}) matrices.push_back(m);
  }
  for (ExpertWeights& e : experts_) {
    for (WeightMatrix* m : {&e.w1, &e.w3, &e.w2}) matrices.push_back(m);
  }
  bool all = true;
  for (WeightMatrix* m : matrices) {
    if (m->cols % DTypeBlockElements(dtype) != 0 || IsQuantized(m->dtype)) {
      all = all && IsQuantized(m->dtype);
      continue;
    }
    std::vector<uint8_t>& bytes = owned_.emplace_back(m->rows * DTypeBytes(dtype, m->cols));
    // Rows are independent: on the OpenMP team (Q4_K's scale search is ~10 M values/s a core).
#pragma omp parallel for schedule(static) if (m->rows * m->cols >= (1 << 16))
    for (int64_t r = 0; r < m->rows; ++r) {
      thread_local std::vector<float> row;
      row.resize(static_cast<size_t>(m->cols));
      kernels::ConvertToF32(m->Row(r), m->dtype, m->cols, row.data());
      QuantizeRow(row.data(), m->cols, dtype, &bytes[r * DTypeBytes(dtype, m->cols)]);
    }
    *m = WeightMatrix{bytes.data(), dtype, m->rows, m->cols, m->cols};
  }
  if (tied) lm_head_ = embed_tokens_;
  dtype_ = !experts_.empty()               ? experts_.front().w1.dtype
           : embed_tokens_.data != nullptr ? embed_tokens_.dtype
                                           : dtype_;
  return all;
}

uint64_t ModelWeights::owned_bytes() const {
  uint64_t bytes = 0;
  for (const auto& b : owned_) bytes += b.size();
  return bytes;
}

absl::Status ModelWeights::SetHostedExperts(const ExpertRange& experts) {
  // {} (= {0, 0}): the shared weights only (a coordinator); anything else as --experts is.
  if (experts.begin == 0 && experts.end == 0) {
    hosted_ = ExpertRange{};
    return absl::OkStatus();
  }
  MOE_ASSIGN_OR_RETURN(hosted_, ResolveExpertRange(experts, config_.num_local_experts));
  return absl::OkStatus();
}

uint64_t ModelWeights::expert_bytes() const {
  uint64_t bytes = 0;
  for (const ExpertWeights& e : experts_) {
    for (const WeightMatrix* m : {&e.w1, &e.w3, &e.w2}) {
      bytes += m->bytes();
    }
  }
  return bytes;
}

}  // namespace moe
