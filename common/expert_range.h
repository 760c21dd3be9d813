// ExpertRange: the experts [begin, end) of every layer that one worker hosts. The one type for
// expert slices across the tree: weight loading, worker options, placements, status snapshots.
#ifndef MOE_COMMON_EXPERT_RANGE_H_
#define MOE_COMMON_EXPERT_RANGE_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace moe {

struct ExpertRange {
  int64_t begin = 0;
  int64_t end = 0;  // exclusive; kToLast = "to the model's last expert" (options only)

  static constexpr int64_t kToLast = -1;
  // Every expert, whatever the model's count: {0, kToLast}.
  static constexpr ExpertRange All() { return {0, kToLast}; }

  int64_t size() const { return end > begin ? end - begin : 0; }
  bool empty() const { return size() == 0; }
  bool Contains(int64_t expert) const { return expert >= begin && expert < end; }
  // "[begin, end)", for messages.
  std::string ToString() const;
  // The user's inclusive spelling of the flag value: "5" or "0-40". REQUIRES: !empty().
  std::string InclusiveSpelling() const;

  bool operator==(const ExpertRange&) const = default;
};

// Parses an --experts value: "A-B" is the INCLUSIVE range A..B (so "0-3" = [0, 4)), "A" is the
// single expert A (= [A, A + 1)), "all" is ExpertRange::All(). INVALID_ARGUMENT for anything
// else: non-numbers, negatives, reversed ranges ("3-1"). Bounds against the model's expert
// count are checked by ResolveExpertRange once the config is known.
absl::StatusOr<ExpertRange> ParseExpertRange(std::string_view spec);

// `range` as concrete [begin, end) for a model of `num_experts` experts (kToLast -> n).
// INVALID_ARGUMENT when it is empty or reaches past the last expert, e.g. "--experts 0-40 is
// outside the model's 32 experts (ids 0-31)".
absl::StatusOr<ExpertRange> ResolveExpertRange(const ExpertRange& range, int64_t num_experts);

}  // namespace moe

#endif  // MOE_COMMON_EXPERT_RANGE_H_
