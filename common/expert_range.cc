#include "common/expert_range.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moe {
namespace {

// A non-negative decimal expert id: digits only (no sign, no spaces), at most 9 of them.
bool ParseExpertId(std::string_view s, int64_t* id) {
  if (s.empty() || s.size() > 9) return false;
  for (char c : s) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return absl::SimpleAtoi(std::string(s), id);
}

}  // namespace

std::string ExpertRange::ToString() const { return absl::StrCat("[", begin, ", ", end, ")"); }

std::string ExpertRange::InclusiveSpelling() const {
  if (end == begin + 1) return absl::StrCat(begin);
  return absl::StrCat(begin, "-", end - 1);
}

absl::StatusOr<ExpertRange> ParseExpertRange(std::string_view spec) {
  if (spec == "all") return ExpertRange::All();
  const auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("--experts \"", std::string(spec), "\": ", std::string(why),
                     " (expected A-B for the inclusive range A..B, a single expert A, or all)"));
  };
  const size_t dash = spec.find('-');
  int64_t first = 0, last = 0;
  if (dash == std::string_view::npos) {
    if (!ParseExpertId(spec, &first)) return bad("not an expert id");
    return ExpertRange{first, first + 1};
  }
  if (!ParseExpertId(spec.substr(0, dash), &first) ||
      !ParseExpertId(spec.substr(dash + 1), &last)) {
    return bad("not a range of expert ids");
  }
  if (last < first) return bad("the range is reversed");
  return ExpertRange{first, last + 1};
}

absl::StatusOr<ExpertRange> ResolveExpertRange(const ExpertRange& range, int64_t num_experts) {
  ExpertRange r = range;
  if (r.end == ExpertRange::kToLast) r.end = num_experts;
  if (r.begin < 0 || r.begin >= r.end) {
    return absl::InvalidArgumentError(
        absl::StrCat("the expert range ", r.ToString(), " is empty or negative"));
  }
  if (r.end > num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("--experts ", r.InclusiveSpelling(),
                                                   " is outside the model's ", num_experts,
                                                   " experts (ids 0-", num_experts - 1, ")"));
  }
  return r;
}

}  // namespace moe
