// The unit of work an expert worker serves: for a group of token rows and each row's
// (expert, weight) pairs, the weighted sum of the SwiGLU FFNs of those experts,
//   out[r] = sum_{(e, w) of row r} w * w2_e(silu(w1_e x_r) * w3_e x_r)
// (transformers' MixtralSparseMoeBlock, per expert: MixtralBlockSparseTop2MLP).
#ifndef MOE_COMMON_EXPERT_FFN_H_
#define MOE_COMMON_EXPERT_FFN_H_

#include <cstdint>
#include <span>
#include <vector>

#include "common/weights.h"

namespace moe {

struct ExpertAssignment {
  int32_t expert = 0;
  float weight = 0.0f;
};

// A batch of rows for one layer. Row r's assignments are
// assignments[offsets[r], offsets[r + 1]); offsets has rows + 1 entries.
// Well-formed: layer in range; offsets start at 0, never decrease and end at
// assignments.size(); every expert hosted by the weights computing it; every weight finite; no
// row names an expert twice. DispatchPlan builds such batches; the expert worker checks each
// request it receives against this list (ExpertService), once, before it builds a batch.
struct ExpertBatch {
  int64_t layer = 0;
  int64_t rows = 0;
  const float* x = nullptr;  // [rows, hidden]
  std::span<const int32_t> offsets;
  std::span<const ExpertAssignment> assignments;
};

// Not thread-safe (owns scratch buffers reused across calls); one per worker thread.
class ExpertFfn {
 public:
  // `weights` must outlive this object and host the experts it will be asked for.
  explicit ExpertFfn(const ModelWeights* weights);

  // out: [rows, hidden], overwritten. REQUIRES: `batch` is well-formed (see ExpertBatch).
  void Forward(const ExpertBatch& batch, float* out);

 private:
  const ModelWeights* weights_;
  int64_t hidden_;
  int64_t ffn_;
  // Scratch, grown to the largest batch seen.
  std::vector<int32_t> expert_rows_;   // rows routed to the current expert
  std::vector<float> expert_weights_;  // their weights
  std::vector<float> gathered_;        // [n, hidden]
  std::vector<float> gate_;            // [n, ffn]
  std::vector<float> up_;              // [n, ffn]
  std::vector<float> down_;            // [n, hidden]
};

}  // namespace moe

#endif  // MOE_COMMON_EXPERT_FFN_H_
