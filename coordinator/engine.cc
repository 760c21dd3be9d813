#include "coordinator/engine.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/kernels.h"
#include "common/status_macros.h"

namespace moe {

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ModelWeights* weights,
                                                       ExpertTransport* transport,
                                                       const EngineOptions& options) {
  if (weights->embed_tokens().data == nullptr) {
    return absl::InvalidArgumentError("the engine needs the shared (non-expert) weights loaded");
  }
  const ModelConfig& c = weights->config();
  if (options.experts_per_token < 0 || options.experts_per_token > c.routed_experts_per_token()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--experts-per-token ", options.experts_per_token, ": must be between 1 and the model's ",
        c.routed_experts_per_token(), " experts per token (0 keeps the model's)"));
  }
  return std::unique_ptr<Engine>(new Engine(weights, transport, options));
}

Engine::Engine(const ModelWeights* weights, ExpertTransport* transport,
               const EngineOptions& options)
    : weights_(weights),
      transport_(transport),
      config_(weights->config()),
      on_expert_loss_(options.on_expert_loss),
      kv_cache_(weights->config(), options.kv_cache) {
  // The router, rerouting and everything that asks engine()->config() use the override.
  if (options.experts_per_token > 0) config_.num_experts_per_tok = options.experts_per_token;
  // RoPE tables as transformers builds them (f32): inv_freq[i] = 1 / theta^(2i / head_dim),
  // angle = position * inv_freq[i].
  const int64_t half = config_.head_dim / 2;
  const int64_t positions = config_.max_position_embeddings;
  rope_cos_.resize(positions * half);
  rope_sin_.resize(positions * half);
  for (int64_t i = 0; i < half; ++i) {
    const float inv_freq =
        1.0f / std::pow(static_cast<float>(config_.rope_theta),
                        static_cast<float>(2 * i) / static_cast<float>(config_.head_dim));
    for (int64_t p = 0; p < positions; ++p) {
      const float angle = static_cast<float>(p) * inv_freq;
      rope_cos_[p * half + i] = std::cos(angle);
      rope_sin_[p * half + i] = std::sin(angle);
    }
  }
  scores_per_thread_ = positions * (config_.num_attention_heads / config_.num_key_value_heads);
  scores_.resize(static_cast<size_t>(omp_get_max_threads()) * scores_per_thread_);
}

absl::Status CheckExpertsPerToken(int64_t k, const ModelConfig& config) {
  if (k >= 0 && k <= config.routed_experts_per_token()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("experts_per_token must be in [1, ", config.routed_experts_per_token(),
                   "] (the server's experts per token; 0 or unset keeps them), got ", k));
}

absl::Status Engine::Validate(std::span<const StepInput> inputs) const {
  if (inputs.empty()) return absl::InvalidArgumentError("empty batch");
  for (const StepInput& in : inputs) {
    if (in.tokens.empty()) return absl::InvalidArgumentError("a sequence has no tokens to add");
    const int64_t end = in.seq->length + static_cast<int64_t>(in.tokens.size());
    if (end > config_.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence of ", end, " tokens exceeds the model's max_position_embeddings (",
                       config_.max_position_embeddings, ")"));
    }
    MOE_RETURN_IF_ERROR(CheckExpertsPerToken(in.experts_per_token, config_));
    for (int32_t id : in.tokens) {
      if (id < 0 || id >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token id ", id, " is outside the vocabulary [0, ", config_.vocab_size, ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Engine::ReserveKv(std::span<const StepInput> inputs) {
  std::vector<size_t>& before = blocks_before_;
  before.clear();
  for (const StepInput& in : inputs) before.push_back(in.seq->blocks.blocks.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const StepInput& in = inputs[i];
    absl::Status s = kv_cache_.Reserve(&in.seq->blocks, in.seq->length + in.tokens.size());
    if (!s.ok()) {
      for (size_t j = 0; j <= i; ++j) {
        BlockTable extra;
        auto& blocks = inputs[j].seq->blocks.blocks;
        extra.blocks.assign(blocks.begin() + before[j], blocks.end());
        blocks.resize(before[j]);
        kv_cache_.Release(&extra);
      }
      return s;
    }
  }
  return absl::OkStatus();
}

void Engine::EnsureScratch(int64_t rows) {
  if (static_cast<int64_t>(row_input_.size()) >= rows) return;
  const int64_t hidden = config_.hidden_size;
  row_input_.resize(rows);
  row_k_.resize(rows);
  row_position_.resize(rows);
  x_.resize(rows * hidden);
  xn_.resize(rows * hidden);
  q_.resize(rows * config_.q_dim());
  k_.resize(rows * config_.kv_dim());
  v_.resize(rows * config_.kv_dim());
  attn_.resize(rows * config_.q_dim());
  proj_.resize(rows * hidden);
  router_logits_.resize(rows * config_.num_local_experts);
}

// Scaled dot-product attention of every row against its sequence's cached keys and values
// (causal; with sliding_window W a query at position p sees keys (p - W, p]). The query heads
// that share a key/value head go together, a cache block at a time (its slots are contiguous).
void Engine::Attention(int64_t layer, int64_t rows, std::span<const StepInput> inputs) {
  const int64_t heads = config_.num_attention_heads;
  const int64_t kv_heads = config_.num_key_value_heads;
  const int64_t group = heads / kv_heads;
  const int64_t d = config_.head_dim;
  const int64_t kv_dim = config_.kv_dim();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t window = config_.sliding_window;
  const int64_t block = kv_cache_.block_size();
  // Round-robin: a causal prompt's later rows see more keys.
#pragma omp parallel for collapse(2) schedule(static, 1) if (rows * kv_heads > 2)
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t g = 0; g < kv_heads; ++g) {
      const BlockTable& table = inputs[row_input_[t]].seq->blocks;
      const int64_t pos = row_position_[t];
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t n = pos - first + 1;
      // Calls fn(p, keys in the block from p, the block's slot stride) block by block.
      const auto for_each_block = [&](auto fn) {
        for (int64_t p = first; p <= pos;) {
          const int64_t end = std::min(pos + 1, (p / block + 1) * block);
          fn(p, end - p);
          p = end;
        }
      };
      const float* q = &q_[(t * heads + g * group) * d];
      float* scores = &scores_[omp_get_thread_num() * scores_per_thread_];  // [group][n]
      for_each_block([&](int64_t p, int64_t nk) {
        kernels::DotRows(q, group, kv_cache_.Key(layer, table, p) + g * d, kv_dim, nk, d, scale,
                         scores + (p - first), n);
      });
      for (int64_t i = 0; i < group; ++i) kernels::Softmax(scores + i * n, n);
      float* out = &attn_[(t * heads + g * group) * d];
      std::fill(out, out + group * d, 0.0f);
      for_each_block([&](int64_t p, int64_t nk) {
        kernels::AccumulateRows(scores + (p - first), n, group,
                                kv_cache_.Value(layer, table, p) + g * d, kv_dim, nk, d, out);
      });
    }
  }
}

absl::Status Engine::Layer(int64_t layer, int64_t rows, std::span<const StepInput> inputs) {
  const LayerWeights& w = weights_->layer(layer);
  const int64_t hidden = config_.hidden_size;
  const int64_t kv_dim = config_.kv_dim();
  const int64_t half = config_.head_dim / 2;
  const float eps = static_cast<float>(config_.rms_norm_eps);

  // attention rmsnorm; q, k, v projections: [rows, q_dim], [rows, kv_dim] x2
  kernels::RmsNorm(x_.data(), w.input_norm.data(), rows, hidden, eps, xn_.data());
  kernels::MatMul(w.q_proj, xn_.data(), rows, q_.data());
  kernels::MatMul(w.k_proj, xn_.data(), rows, k_.data());
  kernels::MatMul(w.v_proj, xn_.data(), rows, v_.data());
  // rotary embedding on q and k (GGUF: interleaved pairs); k and v into the cache
  const auto rope = config_.rope_interleaved ? kernels::RopeInterleaved : kernels::RopeSplitHalf;
  for (int64_t t = 0; t < rows; ++t) {
    const float* cos = &rope_cos_[row_position_[t] * half];
    const float* sin = &rope_sin_[row_position_[t] * half];
    rope(&q_[t * config_.q_dim()], config_.num_attention_heads, config_.head_dim, cos, sin);
    rope(&k_[t * kv_dim], config_.num_key_value_heads, config_.head_dim, cos, sin);
    const BlockTable& table = inputs[row_input_[t]].seq->blocks;
    std::memcpy(kv_cache_.Key(layer, table, row_position_[t]), &k_[t * kv_dim],
                kv_dim * sizeof(float));
    std::memcpy(kv_cache_.Value(layer, table, row_position_[t]), &v_[t * kv_dim],
                kv_dim * sizeof(float));
  }
  Attention(layer, rows, inputs);
  // output projection and residual
  kernels::MatMul(w.o_proj, attn_.data(), rows, proj_.data());
  for (int64_t i = 0; i < rows * hidden; ++i) x_[i] += proj_[i];

  // moe rmsnorm; router: softmax over all experts -> top-k -> renormalize
  kernels::RmsNorm(x_.data(), w.post_attention_norm.data(), rows, hidden, eps, xn_.data());
  if (config_.is_moe) {
    const WeightMatrix router{w.router.data(), DType::kF32, config_.num_local_experts, hidden,
                              hidden};
    kernels::MatMul(router, xn_.data(), rows, router_logits_.data());
    RouteTokens(router_logits_.data(), rows, config_.num_local_experts, config_.num_experts_per_tok,
                &routing_, std::span<const int32_t>(row_k_.data(), rows));
  } else {
    RouteDense(rows, &routing_);
  }
  // experts (wherever they live) and residual
  MOE_RETURN_IF_ERROR(Experts(layer, rows));
  for (int64_t i = 0; i < rows * hidden; ++i) x_[i] += proj_[i];
  return absl::OkStatus();
}

absl::Status Engine::Experts(int64_t layer, int64_t rows) {
  const bool reroute = on_expert_loss_ == ExpertLossPolicy::kReroute && config_.is_moe;
  if (reroute) layer_degraded_.assign(rows, 0);
  // Each failed attempt lost at least one more worker, so this ends.
  for (int64_t attempt = 0;; ++attempt) {
    if (reroute && !transport_->LiveExperts(layer, &live_)) MOE_RETURN_IF_ERROR(Reroute(rows));
    const absl::Status s = transport_->Exchange(layer, routing_, xn_.data(), proj_.data());
    if (s.ok()) break;
    // Only a lost worker (UNAVAILABLE) can be routed around, and only if it took experts
    // with it.
    if (!reroute || !absl::IsUnavailable(s) || attempt >= config_.num_local_experts ||
        transport_->LiveExperts(layer, &live_)) {
      return s;
    }
  }
  if (reroute) {
    int64_t degraded = 0;
    for (int64_t r = 0; r < rows; ++r) {
      degraded += layer_degraded_[r];
      row_degraded_[r] |= layer_degraded_[r];
    }
    if (degraded > 0) {
      for (RoutingObserver* observer : observers_) observer->OnDegraded(layer, degraded);
    }
  }
  for (RoutingObserver* observer : observers_) observer->OnRouting(layer, routing_);
  return absl::OkStatus();
}

absl::Status Engine::Reroute(int64_t rows) {
  const int64_t experts = config_.num_local_experts;
  const int64_t k = config_.num_experts_per_tok;
  live_ids_.clear();
  for (int64_t e = 0; e < experts; ++e) {
    if (live_[e]) live_ids_.push_back(static_cast<int32_t>(e));
  }
  const int64_t live = static_cast<int64_t>(live_ids_.size());
  if (live < k) {
    return absl::UnavailableError(absl::StrCat(
        "only ", live, " of ", experts, " experts have a ready worker, fewer than the ", k,
        " each token is routed to (--on-expert-loss reroute needs at least top-k)"));
  }
  live_probs_.resize(live);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t own = row_k_[r];  // the rest of the row's slots are -1
    bool lost = false;
    for (int64_t j = 0; j < own; ++j) lost = lost || !live_[routing_.experts[r * k + j]];
    if (!lost) continue;
    // Top-k among the live experts from the router's probabilities (RouteTokens left them in
    // router_logits_); renormalizing over the chosen equals a softmax over the live alone.
    const float* probs = &router_logits_[r * experts];
    for (int64_t i = 0; i < live; ++i) live_probs_[i] = probs[live_ids_[i]];
    int32_t* chosen = &routing_.experts[r * k];
    TopKRenormalized(live_probs_.data(), live, own, chosen, &routing_.weights[r * k]);
    for (int64_t j = 0; j < own; ++j) chosen[j] = live_ids_[chosen[j]];
    layer_degraded_[r] = 1;
  }
  return absl::OkStatus();
}

absl::Status Engine::Step(std::span<const StepInput> inputs, std::vector<float>* logits) {
  MOE_RETURN_IF_ERROR(Validate(inputs));
  MOE_RETURN_IF_ERROR(ReserveKv(inputs));
  const absl::Status status = Forward(inputs, logits);
  for (RoutingObserver* observer : observers_) observer->OnStepEnd(status.ok());
  return status;
}

absl::Status Engine::Forward(std::span<const StepInput> inputs, std::vector<float>* logits) {
  int64_t rows = 0;
  int64_t out_rows = 0;
  for (const StepInput& in : inputs) {
    rows += static_cast<int64_t>(in.tokens.size());
    out_rows += in.all_logits ? static_cast<int64_t>(in.tokens.size()) : 1;
  }
  EnsureScratch(rows);
  const int64_t hidden = config_.hidden_size;
  // embeddings
  int64_t r = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t own = inputs[i].experts_per_token;
    const auto k = static_cast<int32_t>(own > 0 ? own : config_.num_experts_per_tok);
    for (size_t j = 0; j < inputs[i].tokens.size(); ++j, ++r) {
      row_input_[r] = static_cast<int32_t>(i);
      row_k_[r] = k;
      row_position_[r] = inputs[i].seq->length + static_cast<int64_t>(j);
      const WeightMatrix& embed = weights_->embed_tokens();
      kernels::ConvertToF32(embed.Row(inputs[i].tokens[j]), embed.dtype, hidden, &x_[r * hidden]);
    }
  }
  row_degraded_.assign(rows, 0);
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    absl::Status s = Layer(layer, rows, inputs);
    if (!s.ok()) return s;  // lengths unchanged; the blocks stay reserved with the sequences
  }
  degraded_inputs_.assign(inputs.size(), 0);
  for (int64_t t = 0; t < rows; ++t) degraded_inputs_[row_input_[t]] += row_degraded_[t];
  // final norm on the rows that need logits, then lm_head: [out_rows, vocab]
  int64_t o = 0;
  r = 0;
  for (const StepInput& in : inputs) {
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    const int64_t first = in.all_logits ? 0 : n - 1;
    for (int64_t j = first; j < n; ++j, ++o) {
      kernels::RmsNorm(&x_[(r + j) * hidden], weights_->final_norm().data(), 1, hidden,
                       static_cast<float>(config_.rms_norm_eps), &xn_[o * hidden]);
    }
    r += n;
  }
  logits->resize(out_rows * config_.vocab_size);
  kernels::MatMul(weights_->lm_head(), xn_.data(), out_rows, logits->data());
  for (const StepInput& in : inputs) in.seq->length += static_cast<int64_t>(in.tokens.size());
  return absl::OkStatus();
}

void Engine::Release(SequenceState* seq) {
  kv_cache_.Release(&seq->blocks);
  seq->length = 0;
}

}  // namespace moe
