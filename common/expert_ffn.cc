#include "common/expert_ffn.h"

#include <algorithm>
#include <cstring>

#include "common/expert_grouping.h"

namespace moe {

ExpertFfn::ExpertFfn(const ModelWeights* weights)
    : weights_(weights),
      hidden_(weights->config().hidden_size),
      ffn_(weights->config().intermediate_size) {}

void ExpertFfn::Forward(const ExpertBatch& b, float* out) {
  std::fill(out, out + b.rows * hidden_, 0.0f);
  if (b.rows == 0) return;
  const ExpertRange& hosted = weights_->hosted_experts();
  GroupByExpert(b, hosted, &grouping_);
  for (int64_t j = 0; j < hosted.size(); ++j) {
    const int64_t n = grouping_.rows_of(j);
    if (n == 0) continue;
    const int32_t first = grouping_.expert_begin[j];
    const auto need = static_cast<size_t>(n);
    if (gathered_.size() < need * hidden_) {
      gathered_.resize(need * hidden_);
      gate_.resize(need * ffn_);
      up_.resize(need * ffn_);
      down_.resize(need * hidden_);
    }
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(&gathered_[i * hidden_], b.x + grouping_.slot_row[first + i] * hidden_,
                  hidden_ * sizeof(float));
    }
    const ExpertWeights& w = weights_->expert(b.layer, hosted.begin + j);
    // gate, up: [n, ffn]; down: [n, hidden]
    kernels::MatMul(w.w1, gathered_.data(), n, gate_.data());
    kernels::MatMul(w.w3, gathered_.data(), n, up_.data());
    kernels::SiluMul(gate_.data(), up_.data(), n * ffn_);
    kernels::MatMul(w.w2, gate_.data(), n, down_.data());
    for (int64_t i = 0; i < n; ++i) {
      kernels::Axpy(grouping_.slot_weight[first + i], &down_[i * hidden_],
                    out + grouping_.slot_row[first + i] * hidden_, hidden_);
    }
  }
}

}  // namespace moe
