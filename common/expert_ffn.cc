#include "common/expert_ffn.h"

#include <algorithm>
#include <cstring>

namespace moe {

ExpertFfn::ExpertFfn(const ModelWeights* weights)
    : weights_(weights),
      hidden_(weights->config().hidden_size),
      ffn_(weights->config().intermediate_size) {}

void ExpertFfn::Forward(const ExpertBatch& b, float* out) {
  std::fill(out, out + b.rows * hidden_, 0.0f);
  if (b.rows == 0) return;
  const size_t n_max = static_cast<size_t>(b.rows);
  if (expert_rows_.size() < n_max) {
    expert_rows_.resize(n_max);
    expert_weights_.resize(n_max);
    gathered_.resize(n_max * hidden_);
    gate_.resize(n_max * ffn_);
    up_.resize(n_max * ffn_);
    down_.resize(n_max * hidden_);
  }
  for (int64_t e = weights_->hosted_experts().begin; e < weights_->hosted_experts().end; ++e) {
    // Gather the rows routed to expert e (a row lists an expert at most once).
    int64_t n = 0;
    for (int64_t r = 0; r < b.rows; ++r) {
      for (int32_t i = b.offsets[r]; i < b.offsets[r + 1]; ++i) {
        if (b.assignments[i].expert != e) continue;
        expert_rows_[n] = static_cast<int32_t>(r);
        expert_weights_[n] = b.assignments[i].weight;
        std::memcpy(&gathered_[n * hidden_], b.x + r * hidden_, hidden_ * sizeof(float));
        ++n;
      }
    }
    if (n == 0) continue;
    const ExpertWeights& w = weights_->expert(b.layer, e);
    // gate, up: [n, ffn]; down: [n, hidden]
    kernels::MatMul(w.w1, gathered_.data(), n, gate_.data());
    kernels::MatMul(w.w3, gathered_.data(), n, up_.data());
    kernels::SiluMul(gate_.data(), up_.data(), n * ffn_);
    kernels::MatMul(w.w2, gate_.data(), n, down_.data());
    for (int64_t i = 0; i < n; ++i) {
      kernels::Axpy(expert_weights_[i], &down_[i * hidden_], out + expert_rows_[i] * hidden_,
                    hidden_);
    }
  }
}

}  // namespace moe
