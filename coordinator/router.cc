#include "coordinator/router.h"

#include <algorithm>

#include "common/kernels.h"

namespace moe {

void RouteTokens(float* logits, int64_t tokens, int64_t expert_count, int64_t top_k,
                 Routing* routing, std::span<const int32_t> row_k) {
  routing->Resize(tokens, top_k);
  for (int64_t t = 0; t < tokens; ++t) {
    float* probs = logits + t * expert_count;
    int32_t* experts = &routing->experts[t * top_k];
    float* weights = &routing->weights[t * top_k];
    const int64_t k = row_k.empty() ? top_k : row_k[t];
    kernels::Softmax(probs, expert_count);
    TopKRenormalized(probs, expert_count, k, experts, weights);
    std::fill(experts + k, experts + top_k, -1);
    std::fill(weights + k, weights + top_k, 0.0f);
  }
}

void TopKRenormalized(const float* probs, int64_t n, int64_t k, int32_t* experts, float* weights) {
  kernels::TopK(probs, n, k, experts, weights);
  // Mixtral always renormalizes the top-k weights (norm_topk_prob is implicit).
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) sum += weights[j];
  for (int64_t j = 0; j < k; ++j) weights[j] /= sum;
}

void RouteDense(int64_t tokens, Routing* routing) {
  routing->Resize(tokens, 1);
  for (int64_t t = 0; t < tokens; ++t) {
    routing->experts[t] = 0;
    routing->weights[t] = 1.0f;
  }
}

}  // namespace moe
