// The unit of work an expert worker serves: for a group of token rows and each row's
// (expert, weight) pairs, the weighted sum of the SwiGLU FFNs of those experts,
//   out[r] = sum_{(e, w) of row r} w * w2_e(silu(w1_e x_r) * w3_e x_r)
// (transformers' MixtralSparseMoeBlock, per expert: MixtralBlockSparseTop2MLP).
#ifndef MOE_COMMON_EXPERT_FFN_H_
#define MOE_COMMON_EXPERT_FFN_H_

#include <cstdint>
#include <vector>

#include "common/expert_batch.h"
#include "common/expert_grouping.h"
#include "common/weights.h"

namespace moe {

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
  ExpertGrouping grouping_;
  std::vector<float> gathered_;  // [n, hidden]
  std::vector<float> gate_;      // [n, ffn]
  std::vector<float> up_;        // [n, ffn]
  std::vector<float> down_;      // [n, hidden]
};

}  // namespace moe

#endif  // MOE_COMMON_EXPERT_FFN_H_
