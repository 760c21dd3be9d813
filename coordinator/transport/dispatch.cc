#include "coordinator/transport/dispatch.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace moe {

Placement Placement::Contiguous(int64_t expert_count, int64_t worker_count) {
  Placement p;
  for (int64_t w = 0; w < worker_count; ++w) {
    p.workers.push_back({expert_count * w / worker_count, expert_count * (w + 1) / worker_count});
  }
  return p;
}

std::vector<ExpertRange> Placement::Served(int64_t layer, int32_t w) const {
  if (layers.empty()) return {workers[w]};
  return layers[layer][w];
}

ExpertRange Placement::Span(int32_t w, int64_t layer_count) const {
  if (layers.empty()) return workers[w];
  ExpertRange span{0, 0};
  for (int64_t l = 0; l < layer_count && l < static_cast<int64_t>(layers.size()); ++l) {
    for (const ExpertRange& r : layers[l][w]) {
      if (r.empty()) continue;
      span =
          span.empty() ? r : ExpertRange{std::min(span.begin, r.begin), std::max(span.end, r.end)};
    }
  }
  return span;
}

absl::Status Placement::CheckCoverage(int64_t layer_count, int64_t expert_count) const {
  if (!layers.empty() && static_cast<int64_t>(layers.size()) != layer_count) {
    return absl::InvalidArgumentError(absl::StrCat("the placement lists ", layers.size(),
                                                   " layers; the model has ", layer_count));
  }
  const int64_t checked = layers.empty() ? 1 : layer_count;
  for (int64_t l = 0; l < checked; ++l) {
    if (!layers.empty() && static_cast<int64_t>(layers[l].size()) != worker_count()) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", l, " of the placement lists ",
                                                     layers[l].size(), " workers, not ",
                                                     worker_count()));
    }
    std::vector<ExpertRange> hosted;
    for (int32_t w = 0; w < worker_count(); ++w) {
      for (const ExpertRange& r : Served(l, w)) {
        if (r.begin < 0 || r.end > expert_count || r.begin > r.end) {
          return absl::InvalidArgumentError(
              absl::StrCat("worker ", w, " serves experts ", r.ToString(), " in layer ", l,
                           ", outside the model's [0, ", expert_count, ")"));
        }
        hosted.push_back(r);
      }
    }
    const std::vector<ExpertRange> missing = UncoveredExperts(hosted, expert_count);
    if (!missing.empty()) {
      const bool one = missing.front().size() == 1;
      return absl::InvalidArgumentError(
          absl::StrCat(one ? absl::StrCat("expert ", missing.front().begin)
                           : absl::StrCat("experts ", missing.front().ToString()),
                       layers.empty() ? " of every layer" : absl::StrCat(" of layer ", l),
                       one ? " is" : " are", " served by no worker"));
    }
  }
  return absl::OkStatus();
}

std::vector<ExpertRange> RangesOf(std::span<const char> mask) {
  std::vector<ExpertRange> runs;
  for (int64_t e = 0; e < static_cast<int64_t>(mask.size()); ++e) {
    if (!mask[e]) continue;
    if (!runs.empty() && runs.back().end == e) {
      ++runs.back().end;
    } else {
      runs.push_back({e, e + 1});
    }
  }
  return runs;
}

std::vector<ExpertRange> UncoveredExperts(std::span<const ExpertRange> hosted,
                                          int64_t expert_count) {
  std::vector<char> uncovered(expert_count, 1);
  for (const ExpertRange& r : hosted) {
    for (int64_t e = std::max<int64_t>(r.begin, 0); e < std::min(r.end, expert_count); ++e) {
      uncovered[e] = 0;
    }
  }
  return RangesOf(uncovered);
}

bool AllExpertsServed(std::span<const WorkerSnapshot> workers, int64_t expert_count) {
  return LiveExpertCount(workers, expert_count) == expert_count;
}

int64_t LiveExpertCount(std::span<const WorkerSnapshot> workers, int64_t expert_count) {
  size_t layer_count = 1;
  for (const WorkerSnapshot& w : workers) layer_count = std::max(layer_count, w.layers.size());
  int64_t live = expert_count;
  for (size_t l = 0; l < layer_count; ++l) {
    std::vector<ExpertRange> ready;
    for (const WorkerSnapshot& w : workers) {
      if (!w.ready) continue;
      if (w.layers.empty()) {
        ready.push_back(w.experts);
      } else if (l < w.layers.size()) {
        ready.insert(ready.end(), w.layers[l].begin(), w.layers[l].end());
      }
    }
    int64_t missing = 0;
    for (const ExpertRange& r : UncoveredExperts(ready, expert_count)) missing += r.size();
    live = std::min(live, expert_count - missing);
  }
  return live;
}

bool ParseExpertLossPolicy(std::string_view text, ExpertLossPolicy* policy) {
  if (text == "fail") {
    *policy = ExpertLossPolicy::kFail;
  } else if (text == "reroute") {
    *policy = ExpertLossPolicy::kReroute;
  } else {
    return false;
  }
  return true;
}

bool ClusterServing(std::span<const WorkerSnapshot> workers, int64_t expert_count, int64_t top_k,
                    ExpertLossPolicy policy) {
  const int64_t live = LiveExpertCount(workers, expert_count);
  return live == expert_count || (policy == ExpertLossPolicy::kReroute && live >= top_k);
}

Segmentation Segmentation::Of(std::span<const ExpertRange> hosted, int64_t expert_count) {
  std::vector<std::vector<ExpertRange>> served;
  for (const ExpertRange& r : hosted) served.push_back({r});
  return Of(served, expert_count);
}

Segmentation Segmentation::Of(std::span<const std::vector<ExpertRange>> served,
                              int64_t expert_count) {
  std::vector<int64_t> cuts = {0, expert_count};
  for (const std::vector<ExpertRange>& ranges : served) {
    for (const ExpertRange& r : ranges) {
      for (int64_t c : {r.begin, r.end}) {
        if (c > 0 && c < expert_count) cuts.push_back(c);
      }
    }
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  Segmentation s;
  s.segment_of_expert.resize(expert_count);
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    const ExpertRange segment{cuts[i], cuts[i + 1]};
    std::vector<int32_t> hosts;
    for (size_t w = 0; w < served.size(); ++w) {
      for (const ExpertRange& r : served[w]) {
        if (!segment.empty() && r.begin <= segment.begin && segment.end <= r.end) {
          hosts.push_back(static_cast<int32_t>(w));
          break;
        }
      }
    }
    for (int64_t e = segment.begin; e < segment.end; ++e) {
      s.segment_of_expert[e] = static_cast<int32_t>(s.segments.size());
    }
    s.segments.push_back(segment);
    s.hosts.push_back(std::move(hosts));
  }
  return s;
}

void DispatchRows::Clear() {
  tokens.clear();
  offsets.assign(1, 0);
  assignments.clear();
}

void DispatchRows::Append(const DispatchRows& other) {
  tokens.insert(tokens.end(), other.tokens.begin(), other.tokens.end());
  const int32_t base = offsets.back();
  for (size_t r = 1; r < other.offsets.size(); ++r) offsets.push_back(base + other.offsets[r]);
  assignments.insert(assignments.end(), other.assignments.begin(), other.assignments.end());
}

void DispatchPlan::Build(const Routing& routing, std::span<const int32_t> segment_of_expert,
                         int64_t segment_count) {
  segments_.resize(segment_count);
  for (DispatchRows& s : segments_) s.Clear();
  for (int64_t t = 0; t < routing.tokens; ++t) {
    for (int64_t j = 0; j < routing.top_k; ++j) {
      const int32_t expert = routing.experts[t * routing.top_k + j];
      if (expert < 0) continue;  // an unused slot (Routing)
      DispatchRows& s = segments_[segment_of_expert[expert]];
      // Open this token's row in the segment the first time one of its experts lands there.
      if (s.tokens.empty() || s.tokens.back() != t) {
        s.tokens.push_back(static_cast<int32_t>(t));
        s.offsets.push_back(s.offsets.back());
      }
      s.assignments.push_back({expert, routing.weights[t * routing.top_k + j]});
      ++s.offsets.back();
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

absl::Status CopyPartialSums(const void* src, int64_t values, int64_t hidden, float* dst) {
  std::memcpy(dst, src, static_cast<size_t>(values) * sizeof(float));
  for (int64_t i = 0; i < values; ++i) {
    if (!(std::fabs(dst[i]) <= kMaxPartialSum)) {  // NaN fails too
      return absl::InternalError(absl::StrCat("output row ", i / hidden, " holds ", dst[i],
                                              " (partial sums must be finite and within ±",
                                              kMaxPartialSum, ")"));
    }
  }
  return absl::OkStatus();
}

namespace {

std::vector<Segmentation> Segmentations(const Placement& placement, int64_t layer_count,
                                        int64_t expert_count) {
  std::vector<Segmentation> out;
  const int64_t cut = placement.layers.empty() ? 1 : layer_count;
  for (int64_t l = 0; l < cut; ++l) {
    std::vector<std::vector<ExpertRange>> served;
    for (int32_t w = 0; w < placement.worker_count(); ++w) {
      served.push_back(placement.Served(l, w));
    }
    out.push_back(Segmentation::Of(served, expert_count));
  }
  return out;
}

}  // namespace

Dispatcher::Dispatcher(const Placement& placement, int64_t layer_count, int64_t expert_count,
                       int64_t hidden, const DispatchOptions& options)
    : segmentations_(Segmentations(placement, layer_count, expert_count)),
      hidden_(hidden),
      options_(options) {
  const size_t workers = static_cast<size_t>(placement.worker_count());
  excluded_.resize(workers);
  draining_.resize(workers);
  assigned_.resize(workers);
  load_.resize(workers);
  worker_rows_.resize(workers);
}

bool Dispatcher::LiveExperts(int64_t layer, WorkerLinks* links, std::vector<char>* live) const {
  const Segmentation& seg = segmentation(layer);
  bool all = true;
  for (size_t s = 0; s < seg.segments.size(); ++s) {
    bool up = false;
    for (int32_t h : seg.hosts[s]) up = up || links->Ready(h);
    if (up == all) continue;  // nothing to write while all are live, or for a live one after
    if (all) live->assign(seg.segment_of_expert.size(), 1);
    all = false;
    const ExpertRange& r = seg.segments[s];
    std::fill(live->begin() + r.begin, live->begin() + r.end, 0);
  }
  return all;
}

absl::Duration Dispatcher::SoftDeadline(int64_t rows) const {
  if (recent_rows_ <= 0) return options_.step_timeout;  // nothing measured yet
  const double expected = recent_seconds_ * std::max(1.0, static_cast<double>(rows) / recent_rows_);
  return std::clamp(absl::Seconds(options_.deadline_factor * expected), options_.deadline_floor,
                    options_.step_timeout);
}

bool Dispatcher::Replaceable(int32_t w) const {
  for (int32_t s : assigned_[w]) {
    bool elsewhere = false;
    for (int32_t h : seg_->hosts[s]) elsewhere |= h != w && !excluded_[h];
    if (!elsewhere) return false;
  }
  return true;
}

void Dispatcher::Fail(int32_t w, int64_t layer, const std::string& why, WorkerLinks* links) {
  const std::string at = absl::StrCat("layer ", layer, ": ", why);
  if (failure_.ok()) {
    failure_ = absl::UnavailableError(absl::StrCat(links->Name(w), " failed at ", at));
  }
  links->MarkDown(w, at);
  excluded_[w] = 1;
  ++failovers_;
  pending_.insert(pending_.end(), assigned_[w].begin(), assigned_[w].end());
}

absl::Status Dispatcher::Choose(WorkerLinks* links) {
  const size_t workers = excluded_.size();
  for (size_t w = 0; w < workers; ++w) {
    assigned_[w].clear();
    load_[w] = 0;
  }
  // Heaviest segments first, each to its least-loaded live host; ties rotate with the exchange
  // count so that replicas share the rows across steps too.
  std::sort(pending_.begin(), pending_.end(), [&](int32_t a, int32_t b) {
    return plan_.segments()[a].rows() > plan_.segments()[b].rows() ||
           (plan_.segments()[a].rows() == plan_.segments()[b].rows() && a < b);
  });
  for (size_t w = 0; w < workers; ++w) draining_[w] = links->Draining(static_cast<int32_t>(w));
  for (int32_t s : pending_) {
    const std::vector<int32_t>& hosts = seg_->hosts[s];
    int32_t best = -1;
    for (size_t i = 0; i < hosts.size(); ++i) {
      const int32_t h = hosts[(i + exchanges_) % hosts.size()];
      if (excluded_[h]) continue;
      // A draining worker only when nothing else is left; then the least loaded.
      if (best < 0 || draining_[h] < draining_[best] ||
          (draining_[h] == draining_[best] && load_[h] < load_[best])) {
        best = h;
      }
    }
    if (best < 0) {
      const ExpertRange& experts = seg_->segments[s];
      std::string down;
      for (int32_t h : hosts) {
        const std::string reason = links->DownReason(h);
        absl::StrAppend(&down, down.empty() ? "" : "; ", links->Name(h), ": ",
                        reason.empty() ? "failed in this step" : reason);
      }
      if (hosts.empty()) down = "hosted by no worker";
      absl::Status none = absl::UnavailableError(
          absl::StrCat(experts.size() == 1 ? absl::StrCat("expert ", experts.begin, " has")
                                           : absl::StrCat("experts ", experts.ToString(), " have"),
                       " no ready worker (", down, ")"));
      return failure_.ok() ? none
                           : absl::UnavailableError(
                                 absl::StrCat(failure_.message(), "; and ", none.message()));
    }
    assigned_[best].push_back(s);
    load_[best] += plan_.segments()[s].rows();
  }
  pending_.clear();
  return absl::OkStatus();
}

bool Dispatcher::Await(int32_t w, int64_t layer, absl::Time start, WorkerLinks* links) {
  const absl::Duration soft = SoftDeadline(worker_rows_[w].rows());
  if (links->Wait(w, start + soft)) return true;
  std::string why;
  if (soft < options_.step_timeout && Replaceable(w)) {
    why = absl::StrCat("no answer within ", absl::FormatDuration(soft),
                       " (the step's deadline; its rows went to a replica)");
  } else if (links->Wait(w, start + options_.step_timeout)) {
    return true;
  } else {
    why = absl::StrCat("no answer within ", absl::FormatDuration(options_.step_timeout));
  }
  links->Abandon(w);
  Fail(w, layer, why, links);
  return false;
}

void Dispatcher::Store(int32_t w, int64_t layer, WorkerLinks* links) {
  DispatchReport report;
  report.worker = w;
  absl::StatusOr<const void*> answer = links->Answer(w, &report);
  absl::Status stored = answer.status();
  const char* src = stored.ok() ? static_cast<const char*>(*answer) : nullptr;
  for (size_t i = 0; stored.ok() && i < assigned_[w].size(); ++i) {
    const int32_t s = assigned_[w][i];
    const int64_t n = plan_.segments()[s].rows();
    stored = CopyPartialSums(src, n * hidden_, hidden_, &partials_[segment_start_[s] * hidden_]);
    src += n * hidden_ * sizeof(float);
  }
  if (!stored.ok()) return Fail(w, layer, std::string(stored.message()), links);
  const double rows = static_cast<double>(worker_rows_[w].rows());
  if (observer_ != nullptr) {
    links->MessageSizes(w, &report);
    report.assignments = static_cast<int64_t>(worker_rows_[w].assignments.size());
    reports_.push_back(report);
  }
  constexpr double kKeep = 0.9;  // about the last ten answers
  const bool first = recent_rows_ == 0;
  recent_seconds_ = first ? report.seconds : kKeep * recent_seconds_ + (1 - kKeep) * report.seconds;
  recent_rows_ = first ? rows : kKeep * recent_rows_ + (1 - kKeep) * rows;
}

absl::Status Dispatcher::Exchange(int64_t layer, const Routing& routing, const float* x, float* out,
                                  WorkerLinks* links) {
  ++exchanges_;
  seg_ = &segmentation(layer);
  const int64_t segments = static_cast<int64_t>(seg_->segments.size());
  plan_.Build(routing, seg_->segment_of_expert, segments);
  segment_start_.assign(1, 0);
  pending_.clear();
  for (int64_t s = 0; s < segments; ++s) {
    segment_start_.push_back(segment_start_.back() + plan_.segments()[s].rows());
    if (plan_.segments()[s].rows() > 0) pending_.push_back(static_cast<int32_t>(s));
  }
  partials_.resize(static_cast<size_t>(segment_start_.back() * hidden_));
  for (size_t w = 0; w < excluded_.size(); ++w) {
    excluded_[w] = links->Ready(static_cast<int32_t>(w)) ? 0 : 1;
  }
  failure_ = absl::OkStatus();
  reports_.clear();
  // Rounds: send every pending segment to a live host; a worker that fails puts its segments
  // back in pending_ for the next round, without it. Each round excludes at least one more
  // worker or finishes, so there are at most workers + 1 rounds.
  while (!pending_.empty()) {
    MOE_RETURN_IF_ERROR(Choose(links));
    started_.clear();
    const absl::Time now = absl::Now();
    for (size_t w = 0; w < assigned_.size(); ++w) {
      if (assigned_[w].empty()) continue;
      DispatchRows& rows = worker_rows_[w];
      rows.Clear();
      // In segment order, so that a worker's rows of one expert stay in token order.
      std::sort(assigned_[w].begin(), assigned_[w].end());
      for (int32_t s : assigned_[w]) rows.Append(plan_.segments()[s]);
      links->Start(static_cast<int32_t>(w), layer, rows, x);
      started_.push_back(static_cast<int32_t>(w));
    }
    for (int32_t w : started_) {
      if (Await(w, layer, now, links)) Store(w, layer, links);
    }
  }
  // Combine in segment order (see the top of dispatch.h).
  std::fill(out, out + routing.tokens * hidden_, 0.0f);
  for (int64_t s = 0; s < segments; ++s) {
    ScatterAddRows(&partials_[segment_start_[s] * hidden_], hidden_, plan_.segments()[s].tokens,
                   out);
  }
  if (observer_ != nullptr && !reports_.empty()) observer_->OnDispatch(reports_);
  return absl::OkStatus();
}

}  // namespace moe
