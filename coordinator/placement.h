// Placements from files: a --placement JSON file (which worker serves which experts of each
// layer), and --placement-from-record (a placement that balances a recorded expert load,
// moe-cli record-experts' CSV, over what the workers have loaded).
//
// The placement file:
//   {
//     "workers": [
//       {"address": "10.0.0.1:50061", "experts": "0-3"},
//       {"address": "10.0.0.2:50061", "experts": "4-7", "layers": {"0": "4-7,1", "2-3": "all"}}
//     ]
//   }
// Each worker: its address; "experts", what it serves in every layer not listed in "layers"
// (default none); "layers", per layer ("N") or inclusive layer range ("A-B"), what it serves
// there. An expert set is a comma-separated list of experts "E" and inclusive ranges "A-B",
// "all", or "" (none). Workers may share experts (replicas). Every expert of every layer must be
// served by some worker; each worker must have loaded (its --experts) every expert it serves.
#ifndef MOE_COORDINATOR_PLACEMENT_H_
#define MOE_COORDINATOR_PLACEMENT_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/expert_range.h"
#include "common/model_config.h"
#include "coordinator/transport/dispatch.h"

namespace moe {

struct PlacementFile {
  std::vector<std::string> addresses;  // the workers, in the file's order
  Placement placement;                 // per layer; workers[w] = the span of what w serves
};

// INVALID_ARGUMENT naming the file and what is wrong (the key, the worker, the layer, the
// experts nobody serves) for anything that is not a placement of this model.
absl::StatusOr<PlacementFile> ParsePlacement(std::string_view json, const ModelConfig& config,
                                             const std::string& source);
absl::StatusOr<PlacementFile> LoadPlacementFile(const std::string& path, const ModelConfig& config);

// "0-3,6", "all", "": maximal ranges in increasing order; INVALID_ARGUMENT naming the set
// otherwise (an expert outside [0, expert_count), a reversed range, garbage).
absl::StatusOr<std::vector<ExpertRange>> ParseExpertSet(std::string_view spelled,
                                                        int64_t expert_count);

// tokens[layer][expert] from moe-cli record-experts' CSV (header "layer,expert,tokens"; missing
// pairs count 0). INVALID_ARGUMENT naming the file and line for a malformed line, a layer or
// expert outside the model, or a pair listed twice.
absl::StatusOr<std::vector<std::vector<int64_t>>> LoadExpertRecord(const std::string& path,
                                                                   const ModelConfig& config);

// Per layer, each expert on one worker that has it loaded, balancing the recorded tokens:
// experts by decreasing tokens (then id), each to the eligible worker with the fewest tokens
// so far (then the lowest index). INVALID_ARGUMENT when some expert is loaded nowhere.
absl::StatusOr<Placement> BalancedPlacement(const std::vector<std::vector<int64_t>>& tokens,
                                            std::span<const ExpertRange> loaded);

// Per layer, the most tokens one worker gets in a step divided by the mean over workers, under
// `placement` as the dispatcher sends a step (each segment whole to its least-loaded host,
// heaviest first), averaged over layers: 1 is perfectly even.
double MeanImbalance(const Placement& placement, const std::vector<std::vector<int64_t>>& tokens);

}  // namespace moe

#endif  // MOE_COORDINATOR_PLACEMENT_H_
