// Mixtral routing (transformers' MixtralSparseMoeBlock): softmax over ALL experts in f32, top-k
// (ties: lowest expert id), then the k weights divided by their sum. A dense model is one
// expert of weight 1.
#ifndef MOE_COORDINATOR_ROUTER_H_
#define MOE_COORDINATOR_ROUTER_H_

#include <cstdint>
#include <span>
#include <vector>

namespace moe {

// Top-k routing of a batch of tokens: token t uses experts[t * top_k + j] with weight
// weights[t * top_k + j], j < top_k, in descending weight order.
// experts[t * top_k + j], weights[...]: token t's j-th expert and its weight. A token routed to
// fewer experts (a request's experts_per_token) has expert -1, weight 0 in its unused slots.
struct Routing {
  int64_t tokens = 0;
  int64_t top_k = 0;
  std::vector<int32_t> experts;
  std::vector<float> weights;

  void Resize(int64_t token_count, int64_t k) {
    tokens = token_count;
    top_k = k;
    experts.resize(token_count * k);
    weights.resize(token_count * k);
  }
};

// logits: [tokens, expert_count] router logits, overwritten with the probabilities.
// row_k (optional, [tokens]): token t takes only its top row_k[t] experts (renormalized over
// them), its other slots expert -1, weight 0. REQUIRES: 1 <= top_k <= expert_count and
// 1 <= row_k[t] <= top_k.
void RouteTokens(float* logits, int64_t tokens, int64_t expert_count, int64_t top_k,
                 Routing* routing, std::span<const int32_t> row_k = {});

// The k largest of probs[0, n) (descending) and their weights renormalized to sum to 1, as
// Mixtral's router does after its softmax. REQUIRES: 1 <= k <= n.
void TopKRenormalized(const float* probs, int64_t n, int64_t k, int32_t* experts, float* weights);

// Every token to expert 0 with weight 1 (dense models).
void RouteDense(int64_t tokens, Routing* routing);

}  // namespace moe

#endif  // MOE_COORDINATOR_ROUTER_H_
