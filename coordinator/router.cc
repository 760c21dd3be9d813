#include "coordinator/router.h"

#include "common/kernels.h"

namespace moe {

void RouteTokens(float* logits, int64_t tokens, int64_t expert_count, int64_t top_k,
                 Routing* routing) {
  routing->Resize(tokens, top_k);
  for (int64_t t = 0; t < tokens; ++t) {
    float* probs = logits + t * expert_count;
    int32_t* experts = &routing->experts[t * top_k];
    float* weights = &routing->weights[t * top_k];
    kernels::Softmax(probs, expert_count);
    kernels::TopK(probs, expert_count, top_k, experts, weights);
    // Mixtral always renormalizes the top-k weights (norm_topk_prob is implicit).
    float sum = 0.0f;
    for (int64_t j = 0; j < top_k; ++j) sum += weights[j];
    for (int64_t j = 0; j < top_k; ++j) weights[j] /= sum;
  }
}

void RouteDense(int64_t tokens, Routing* routing) {
  routing->Resize(tokens, 1);
  for (int64_t t = 0; t < tokens; ++t) {
    routing->experts[t] = 0;
    routing->weights[t] = 1.0f;
  }
}

}  // namespace moe
