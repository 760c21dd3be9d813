// The coordinator's forward pass over a batch of sequences: embeddings, attention with the
// paged KV cache, the router, the MoE block through an ExpertTransport, final norm and lm_head.
// Mirrors transformers' MixtralForCausalLM / LlamaForCausalLM:
//   h = embed(tokens)
//   per layer: h += o_proj(attn(rope(q), rope(k), v))  on rmsnorm(h)
//              h += sum_k w_k * expert_k(rmsnorm(h))   (router softmax -> top-k -> renormalize)
//   logits = lm_head(rmsnorm(h))
#ifndef MOE_COORDINATOR_ENGINE_H_
#define MOE_COORDINATOR_ENGINE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "common/weights.h"
#include "coordinator/kv_cache.h"
#include "coordinator/router.h"
#include "coordinator/transport/dispatch.h"
#include "coordinator/transport/expert_transport.h"

namespace moe {

struct EngineOptions {
  KvCacheOptions kv_cache;
  // kReroute: a token routed to an expert that no ready worker hosts takes its top-k among the
  // live experts instead (the transport says which are live), and an exchange that fails
  // because a worker was lost is routed around it and retried. Such tokens are counted
  // (RoutingObserver::OnDegraded, degraded_rows()).
  ExpertLossPolicy on_expert_loss = ExpertLossPolicy::kFail;
  // Route every token to this many experts instead of the model's num_experts_per_tok (0: the
  // model's), renormalising the router weights over them as Mixtral does over its top-k;
  // 1 <= K <= the model's. Faster (fewer expert FFNs per token) and no longer the model's
  // outputs: llama.cpp users run MoE models this way knowingly.
  int64_t experts_per_token = 0;
};

// OK when a request or step input may route to `k` experts per token under `config` (the
// engine's): 0 (its own) or 1 .. its experts per token. INVALID_ARGUMENT naming the bound.
absl::Status CheckExpertsPerToken(int64_t k, const ModelConfig& config);

// A sequence's state in the engine: its KV blocks and how many positions are cached.
struct SequenceState {
  BlockTable blocks;
  int64_t length = 0;
};

// One sequence's part of a step: append `tokens` at positions [seq->length, ...).
struct StepInput {
  SequenceState* seq = nullptr;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // logits for every token (tests); else only for the last
  // Route these tokens to this many experts (a request's experts_per_token; 0: the engine's),
  // 1 <= K <= the engine's. The other slots of their Routing rows are expert -1, weight 0.
  int64_t experts_per_token = 0;
};

// Observes routing decisions (e.g. expert-load counters). OnRouting is called once per layer
// per step, on the thread running Step; OnStepEnd once at the end of every step that passed
// validation (and so may have routed), with ok = false when the step failed part-way (its
// routing never completed a forward pass). Observers that publish per step do it there.
class RoutingObserver {
 public:
  virtual ~RoutingObserver() = default;
  virtual void OnRouting(int64_t layer, const Routing& routing) = 0;
  virtual void OnStepEnd(bool ok) { (void)ok; }
  // `tokens` rows of this layer were routed around lost experts (--on-expert-loss reroute);
  // called before that layer's OnRouting.
  virtual void OnDegraded(int64_t layer, int64_t tokens) {
    (void)layer;
    (void)tokens;
  }
};

// Not thread-safe: one Step at a time (it owns the KV cache and scratch buffers).
class Engine {
 public:
  // `weights` (shared weights loaded) and `transport` must outlive the engine.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const ModelWeights* weights,
                                                        ExpertTransport* transport,
                                                        const EngineOptions& options);

  // Runs the inputs through the model as one batch. On success each sequence's length grows
  // by its token count and `logits` holds [rows, vocab] where rows = sum over inputs of
  // (all_logits ? tokens : 1), in input order. INVALID_ARGUMENT for token ids outside the
  // vocabulary, empty inputs or positions beyond max_position_embeddings; RESOURCE_EXHAUSTED
  // when the KV cache is full; the transport's error if the experts fail. On error no
  // sequence's length changes.
  absl::Status Step(std::span<const StepInput> inputs, std::vector<float>* logits);

  // After a successful Step: for each input, how many of its rows were routed around a lost
  // expert in some layer (all zero unless on_expert_loss is kReroute).
  std::span<const int64_t> degraded_rows() const { return degraded_inputs_; }

  // Frees the sequence's KV blocks and resets it.
  void Release(SequenceState* seq);

  const ModelConfig& config() const { return config_; }
  const KvCache& kv_cache() const { return kv_cache_; }
  // Observers see every layer's routing of every step, in the order added. Not owned.
  void AddRoutingObserver(RoutingObserver* observer) { observers_.push_back(observer); }
  void RemoveRoutingObserver(RoutingObserver* observer) { std::erase(observers_, observer); }

 private:
  Engine(const ModelWeights* weights, ExpertTransport* transport, const EngineOptions& options);
  // INVALID_ARGUMENT for what Step refuses; changes nothing.
  absl::Status Validate(std::span<const StepInput> inputs) const;
  // KV blocks for every input's new positions. RESOURCE_EXHAUSTED when the cache is full, and
  // then every sequence keeps the blocks it had before (what this call took is given back).
  absl::Status ReserveKv(std::span<const StepInput> inputs);
  void EnsureScratch(int64_t rows);
  // The step's rows: `rows` = total tokens of `inputs`, laid out input by input.
  void Attention(int64_t layer, int64_t rows, std::span<const StepInput> inputs);
  absl::Status Layer(int64_t layer, int64_t rows, std::span<const StepInput> inputs);
  absl::Status Forward(std::span<const StepInput> inputs, std::vector<float>* logits);
  // The experts of this layer's step, through the transport; with kReroute around lost ones.
  absl::Status Experts(int64_t layer, int64_t rows);
  // Reroutes the rows of routing_ that name an expert with live_[e] == 0, from the router's
  // probabilities.
  absl::Status Reroute(int64_t rows);

  // Constant after construction.
  const ModelWeights* weights_;
  ExpertTransport* transport_;
  ModelConfig config_;
  ExpertLossPolicy on_expert_loss_;
  std::vector<float> rope_cos_;  // [max_position, head_dim / 2]
  std::vector<float> rope_sin_;

  KvCache kv_cache_;
  std::vector<RoutingObserver*> observers_;

  // Per-step row bookkeeping and scratch, grown to the largest step seen.
  std::vector<int32_t> row_input_;     // input index of each row
  std::vector<int32_t> row_k_;         // experts per token of each row (its input's or ours)
  std::vector<int64_t> row_position_;  // position of each row
  std::vector<float> x_;               // [rows, hidden] residual stream
  std::vector<float> xn_;              // [rows, hidden] normed
  std::vector<float> q_;               // [rows, q_dim]
  std::vector<float> k_;               // [rows, kv_dim]
  std::vector<float> v_;               // [rows, kv_dim]
  std::vector<float> attn_;            // [rows, q_dim]
  std::vector<float> proj_;            // [rows, hidden]
  std::vector<float> router_logits_;   // [rows, experts]; after routing, the probabilities
  // kReroute only: the live experts, this layer's rerouted rows, each row's any-layer flag and
  // its input's count, and scratch for one row's live probabilities.
  std::vector<char> live_;
  std::vector<char> layer_degraded_;
  std::vector<char> row_degraded_;
  std::vector<int64_t> degraded_inputs_;
  std::vector<float> live_probs_;
  std::vector<int32_t> live_ids_;
  std::vector<float> scores_;  // [threads][query heads per key/value head][max_position]
  int64_t scores_per_thread_ = 0;
  std::vector<size_t> blocks_before_;  // per input, KV blocks held before this step
  Routing routing_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_ENGINE_H_
