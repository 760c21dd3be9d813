// The unit of work of an expert worker: a group of token rows of one layer and each row's
// (expert, router weight) pairs (see ExpertFfn for what is computed from them).
#ifndef MOE_COMMON_EXPERT_BATCH_H_
#define MOE_COMMON_EXPERT_BATCH_H_

#include <cstdint>
#include <span>

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

}  // namespace moe

#endif  // MOE_COMMON_EXPERT_BATCH_H_
