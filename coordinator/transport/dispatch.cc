#include "coordinator/transport/dispatch.h"

#include <algorithm>
#include <cstring>

namespace moe {

Placement Placement::Contiguous(int64_t expert_count, int64_t worker_count) {
  Placement p;
  for (int64_t w = 0; w < worker_count; ++w) {
    p.workers.push_back({expert_count * w / worker_count, expert_count * (w + 1) / worker_count});
  }
  return p;
}

void AssignExpertsToWorkers(std::span<const ExpertRange> hosted, int64_t expert_count,
                            std::vector<int32_t>* table) {
  table->assign(expert_count, -1);
  for (size_t w = 0; w < hosted.size(); ++w) {
    const int64_t end = std::min(hosted[w].end, expert_count);
    for (int64_t e = std::max<int64_t>(hosted[w].begin, 0); e < end; ++e) {
      if ((*table)[e] < 0) (*table)[e] = static_cast<int32_t>(w);
    }
  }
}

std::vector<ExpertRange> UncoveredExperts(std::span<const ExpertRange> hosted,
                                          int64_t expert_count) {
  std::vector<int32_t> table;
  AssignExpertsToWorkers(hosted, expert_count, &table);
  std::vector<ExpertRange> runs;
  for (int64_t e = 0; e < expert_count; ++e) {
    if (table[e] >= 0) continue;
    if (!runs.empty() && runs.back().end == e) {
      ++runs.back().end;
    } else {
      runs.push_back({e, e + 1});
    }
  }
  return runs;
}

bool AllExpertsServed(std::span<const WorkerSnapshot> workers, int64_t expert_count) {
  std::vector<ExpertRange> ready;
  for (const WorkerSnapshot& w : workers) ready.push_back(w.ready ? w.experts : ExpertRange{});
  return UncoveredExperts(ready, expert_count).empty();
}

void DispatchPlan::Build(const Routing& routing, std::span<const int32_t> worker_of_expert,
                         int64_t worker_count) {
  workers_.resize(worker_count);
  for (WorkerDispatch& w : workers_) {
    w.tokens.clear();
    w.offsets.assign(1, 0);
    w.assignments.clear();
  }
  for (int64_t t = 0; t < routing.tokens; ++t) {
    for (int64_t j = 0; j < routing.top_k; ++j) {
      const int32_t expert = routing.experts[t * routing.top_k + j];
      WorkerDispatch& w = workers_[worker_of_expert[expert]];
      // Open this token's row on the worker the first time one of its experts lands there.
      if (w.tokens.empty() || w.tokens.back() != t) {
        w.tokens.push_back(static_cast<int32_t>(t));
        w.offsets.push_back(w.offsets.back());
      }
      w.assignments.push_back({expert, routing.weights[t * routing.top_k + j]});
      ++w.offsets.back();
    }
  }
}

void GatherRows(const float* x, int64_t hidden, std::span<const int32_t> tokens, void* rows) {
  auto* dst = static_cast<char*>(rows);
  const size_t row_bytes = static_cast<size_t>(hidden) * sizeof(float);
  for (size_t r = 0; r < tokens.size(); ++r) {
    std::memcpy(dst + r * row_bytes, x + tokens[r] * hidden, row_bytes);
  }
}

void ScatterAddRows(const void* partial, int64_t hidden, std::span<const int32_t> tokens,
                    float* out) {
  const auto* src = static_cast<const char*>(partial);
  for (size_t r = 0; r < tokens.size(); ++r) {
    float* dst = out + tokens[r] * hidden;
    const char* row = src + r * hidden * sizeof(float);
    for (int64_t i = 0; i < hidden; ++i) {
      float v;
      std::memcpy(&v, row + i * sizeof(float), sizeof(float));
      dst[i] += v;
    }
  }
}

}  // namespace moe
