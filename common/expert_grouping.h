// The rows of an ExpertBatch grouped by expert: the order in which an expert FFN computes them
// (one GEMM per expert over its rows), and the way back to the rows. Plain host bookkeeping,
// shared by the CPU FFN and the CUDA backend, so both gather, compute and add back in the same
// order.
//
// A slot is one (row, expert) pair of the batch. Slots are numbered expert by expert (hosted
// experts ascending), rows ascending within an expert:
//   expert_begin[j] .. expert_begin[j + 1]: the slots of hosted expert (hosted.begin + j);
//   slot_row[s], slot_weight[s]: the batch row slot s reads and its router weight;
//   row_slots[offsets[r] .. offsets[r + 1]): row r's slots, experts ascending — the order the
//   weighted results are added into row r (the batch's own offsets index it).
#ifndef MOE_COMMON_EXPERT_GROUPING_H_
#define MOE_COMMON_EXPERT_GROUPING_H_

#include <cstdint>
#include <vector>

#include "common/expert_batch.h"
#include "common/expert_range.h"

namespace moe {

struct ExpertGrouping {
  std::vector<int32_t> expert_begin;  // [hosted experts + 1]
  std::vector<int32_t> slot_row;      // [slots]
  std::vector<float> slot_weight;     // [slots]
  std::vector<int32_t> row_slots;     // [slots], CSR by the batch's offsets
  std::vector<int32_t> next_slot;     // scratch of GroupByExpert

  int64_t slots() const { return static_cast<int64_t>(slot_row.size()); }
  int64_t rows_of(int64_t j) const { return expert_begin[j + 1] - expert_begin[j]; }
};

// Fills `out` (its buffers reused) for `batch` over the experts `hosted`. O(rows + slots +
// hosted experts). REQUIRES: `batch` is well-formed (ExpertBatch) and hosts its experts in
// `hosted`.
void GroupByExpert(const ExpertBatch& batch, const ExpertRange& hosted, ExpertGrouping* out);

}  // namespace moe

#endif  // MOE_COMMON_EXPERT_GROUPING_H_
