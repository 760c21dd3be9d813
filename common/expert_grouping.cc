#include "common/expert_grouping.h"

#include <algorithm>

namespace moe {

void GroupByExpert(const ExpertBatch& b, const ExpertRange& hosted, ExpertGrouping* out) {
  const int64_t experts = hosted.size();
  const auto slots = static_cast<size_t>(b.assignments.size());
  out->expert_begin.assign(static_cast<size_t>(experts + 1), 0);
  out->slot_row.resize(slots);
  out->slot_weight.resize(slots);
  out->row_slots.resize(slots);
  // Counting sort by expert; rows are visited in order, so each expert's slots are row-sorted.
  for (const ExpertAssignment& a : b.assignments) ++out->expert_begin[a.expert - hosted.begin + 1];
  for (int64_t j = 0; j < experts; ++j) out->expert_begin[j + 1] += out->expert_begin[j];
  std::vector<int32_t>& next = out->next_slot;
  next.assign(out->expert_begin.begin(), out->expert_begin.end() - 1);
  for (int64_t r = 0; r < b.rows; ++r) {
    for (int32_t i = b.offsets[r]; i < b.offsets[r + 1]; ++i) {
      const int32_t s = next[b.assignments[i].expert - hosted.begin]++;
      out->slot_row[s] = static_cast<int32_t>(r);
      out->slot_weight[s] = b.assignments[i].weight;
      out->row_slots[i] = s;
    }
  }
  // A row's slots in expert order = its assignments' slots sorted (slots grow with the expert).
  for (int64_t r = 0; r < b.rows; ++r) {
    std::sort(out->row_slots.begin() + b.offsets[r], out->row_slots.begin() + b.offsets[r + 1]);
  }
}

}  // namespace moe
