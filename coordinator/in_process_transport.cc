#include "coordinator/in_process_transport.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace moe {

Placement Placement::Contiguous(int64_t expert_count, int64_t worker_count) {
  Placement p;
  for (int64_t w = 0; w < worker_count; ++w) {
    p.ranges.emplace_back(expert_count * w / worker_count, expert_count * (w + 1) / worker_count);
  }
  // expert_count * w / worker_count floors; with more workers than experts some ranges are
  // empty, which is allowed (those workers host nothing).
  return p;
}

int64_t Placement::WorkerOf(int64_t expert) const {
  for (size_t w = 0; w < ranges.size(); ++w) {
    if (expert >= ranges[w].first && expert < ranges[w].second) return static_cast<int64_t>(w);
  }
  return -1;
}

std::vector<int32_t> Placement::WorkerTable(int64_t expert_count) const {
  std::vector<int32_t> table(expert_count);
  for (int64_t e = 0; e < expert_count; ++e) table[e] = static_cast<int32_t>(WorkerOf(e));
  return table;
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

absl::StatusOr<std::unique_ptr<InProcessTransport>> InProcessTransport::Create(
    std::shared_ptr<TensorStore> store, const ModelConfig& config, const Placement& placement) {
  std::unique_ptr<InProcessTransport> t(new InProcessTransport());
  t->hidden_ = config.hidden_size;
  for (const auto& [begin, end] : placement.ranges) {
    WeightsOptions options;
    options.load_shared = false;
    options.expert_begin = begin;
    options.expert_end = end;
    Worker w;
    MOE_ASSIGN_OR_RETURN(w.weights, ModelWeights::Load(store, config, options));
    w.ffn = std::make_unique<ExpertFfn>(w.weights.get());
    t->workers_.push_back(std::move(w));
  }
  t->worker_table_ = placement.WorkerTable(config.num_local_experts);
  for (int64_t e = 0; e < config.num_local_experts; ++e) {
    if (t->worker_table_[e] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("placement hosts no worker for expert ", e));
    }
  }
  return t;
}

absl::Status InProcessTransport::Exchange(int64_t layer, const Routing& routing, const float* x,
                                          float* out) {
  plan_.Build(routing, worker_table_, static_cast<int64_t>(workers_.size()));
  std::fill(out, out + routing.tokens * hidden_, 0.0f);
  for (size_t wi = 0; wi < workers_.size(); ++wi) {
    const WorkerDispatch& d = plan_.workers()[wi];
    const int64_t rows = d.rows();
    if (rows == 0) continue;
    if (rows_.size() < static_cast<size_t>(rows * hidden_)) {
      rows_.resize(rows * hidden_);
      partial_.resize(rows * hidden_);
    }
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(&rows_[r * hidden_], x + d.tokens[r] * hidden_, hidden_ * sizeof(float));
    }
    ExpertBatch batch{layer, rows, rows_.data(), d.offsets, d.assignments};
    workers_[wi].ffn->Forward(batch, partial_.data());
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = out + d.tokens[r] * hidden_;
      const float* src = &partial_[r * hidden_];
      for (int64_t i = 0; i < hidden_; ++i) dst[i] += src[i];
    }
  }
  return absl::OkStatus();
}

std::vector<uint64_t> InProcessTransport::WorkerExpertBytes() const {
  std::vector<uint64_t> bytes;
  for (const Worker& w : workers_) bytes.push_back(w.weights->expert_bytes());
  return bytes;
}

}  // namespace moe
