#include "coordinator/placement.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using json = nlohmann::json;

// A layer key of "layers": "N" or the inclusive "A-B", within the model.
absl::StatusOr<ExpertRange> ParseLayers(const std::string& key, int64_t layer_count) {
  absl::StatusOr<ExpertRange> r = ParseExpertRange(key);  // the same "A-B" / "A" grammar
  if (!r.ok() || *r == ExpertRange::All() || r->end > layer_count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layers key \"", key, "\" is not a layer N or inclusive range A-B of the model's layers 0-",
        layer_count - 1));
  }
  return *r;
}

}  // namespace

absl::StatusOr<std::vector<ExpertRange>> ParseExpertSet(std::string_view spelled,
                                                        int64_t expert_count) {
  std::vector<char> mask(expert_count, 0);
  const absl::string_view trimmed =
      absl::StripAsciiWhitespace(absl::string_view(spelled.data(), spelled.size()));
  if (trimmed == "all") return std::vector<ExpertRange>{{0, expert_count}};
  if (trimmed.empty()) return std::vector<ExpertRange>{};
  for (absl::string_view part : absl::StrSplit(trimmed, ',')) {
    part = absl::StripAsciiWhitespace(part);
    absl::StatusOr<ExpertRange> r = ParseExpertRange(std::string_view(part.data(), part.size()));
    if (!r.ok() || *r == ExpertRange::All() || r->end > expert_count) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert set \"", std::string(spelled), "\": \"", std::string(part),
                       "\" is not an expert E or inclusive range A-B of the model's experts 0-",
                       expert_count - 1));
    }
    for (int64_t e = r->begin; e < r->end; ++e) mask[e] = 1;
  }
  return RangesOf(mask);
}

absl::StatusOr<PlacementFile> ParsePlacement(std::string_view text, const ModelConfig& config,
                                             const std::string& source) {
  const int64_t layers = config.num_hidden_layers;
  const int64_t experts = config.num_local_experts;
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("placement ", source, ": ", why));
  };
  json doc = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) return bad("not a JSON object");
  for (const auto& [key, value] : doc.items()) {
    if (key != "workers") return bad(absl::StrCat("unknown key \"", key, "\" (expected workers)"));
  }
  if (!doc.contains("workers") || !doc["workers"].is_array() || doc["workers"].empty()) {
    return bad("\"workers\" must be a non-empty list of {address, experts, layers}");
  }
  PlacementFile out;
  out.placement.layers.assign(layers, {});
  std::set<std::string> seen;
  for (size_t i = 0; i < doc["workers"].size(); ++i) {
    const json& w = doc["workers"][i];
    const std::string who = absl::StrCat("workers[", i, "]");
    if (!w.is_object()) return bad(absl::StrCat(who, " is not an object"));
    for (const auto& [key, value] : w.items()) {
      if (key != "address" && key != "experts" && key != "layers") {
        return bad(
            absl::StrCat(who, ": unknown key \"", key, "\" (expected address, experts, layers)"));
      }
    }
    if (!w.contains("address") || !w["address"].is_string() ||
        w["address"].get<std::string>().empty()) {
      return bad(absl::StrCat(who, ": \"address\" (HOST:PORT) is required"));
    }
    const std::string address = w["address"].get<std::string>();
    if (!seen.insert(address).second) {
      return bad(absl::StrCat(who, ": address ", address, " is listed twice"));
    }
    // served[l]: what this worker serves in layer l.
    std::vector<std::vector<ExpertRange>> served(layers);
    if (w.contains("experts")) {
      if (!w["experts"].is_string()) {
        return bad(absl::StrCat(who, ": \"experts\" must be a string such as \"0-3,6\""));
      }
      absl::StatusOr<std::vector<ExpertRange>> set =
          ParseExpertSet(w["experts"].get<std::string>(), experts);
      if (!set.ok()) return bad(absl::StrCat(who, ": ", set.status().message()));
      served.assign(layers, *set);
    }
    if (w.contains("layers")) {
      if (!w["layers"].is_object()) {
        return bad(absl::StrCat(who, ": \"layers\" must map layers (\"N\" or \"A-B\") to experts"));
      }
      std::vector<char> listed(layers, 0);
      for (const auto& [key, value] : w["layers"].items()) {
        absl::StatusOr<ExpertRange> ls = ParseLayers(key, layers);
        if (!ls.ok()) return bad(absl::StrCat(who, ": ", ls.status().message()));
        if (!value.is_string()) {
          return bad(absl::StrCat(who, ": layers \"", key, "\" must be an expert set string"));
        }
        absl::StatusOr<std::vector<ExpertRange>> set =
            ParseExpertSet(value.get<std::string>(), experts);
        if (!set.ok())
          return bad(absl::StrCat(who, ": layers \"", key, "\": ", set.status().message()));
        for (int64_t l = ls->begin; l < ls->end; ++l) {
          if (listed[l]) {
            return bad(absl::StrCat(who, ": layer ", l, " is listed twice in \"layers\""));
          }
          listed[l] = 1;
          served[l] = *set;
        }
      }
    }
    for (int64_t l = 0; l < layers; ++l) out.placement.layers[l].push_back(served[l]);
    out.addresses.push_back(address);
    out.placement.workers.push_back(out.placement.Span(static_cast<int32_t>(i), layers));
  }
  if (absl::Status s = out.placement.CheckCoverage(layers, experts); !s.ok()) {
    return bad(absl::StrCat(s.message(), " (every expert of every layer needs a worker)"));
  }
  return out;
}

absl::StatusOr<PlacementFile> LoadPlacementFile(const std::string& path,
                                                const ModelConfig& config) {
  MOE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParsePlacement(text, config, path);
}

absl::StatusOr<std::vector<std::vector<int64_t>>> LoadExpertRecord(const std::string& path,
                                                                   const ModelConfig& config) {
  MOE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  const int64_t layers = config.num_hidden_layers;
  const int64_t experts = config.num_local_experts;
  std::vector<std::vector<int64_t>> tokens(layers, std::vector<int64_t>(experts, 0));
  std::vector<std::vector<char>> seen(layers, std::vector<char>(experts, 0));
  int line_number = 0;
  bool header = false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    if (!header) {
      if (line != "layer,expert,tokens") {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ":1: expected the header layer,expert,tokens (moe-cli record-experts)"));
      }
      header = true;
      continue;
    }
    const std::vector<absl::string_view> f = absl::StrSplit(line, ',');
    int64_t l = -1, e = -1, n = -1;
    if (f.size() != 3 || !absl::SimpleAtoi(f[0], &l) || !absl::SimpleAtoi(f[1], &e) ||
        !absl::SimpleAtoi(f[2], &n) || l < 0 || l >= layers || e < 0 || e >= experts || n < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_number, ": expected layer,expert,tokens with a layer in 0-", layers - 1,
          ", an expert in 0-", experts - 1, " and a count >= 0, got \"", std::string(line), "\""));
    }
    if (seen[l][e]) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_number, ": layer ", l, " expert ", e, " is listed twice"));
    }
    seen[l][e] = 1;
    tokens[l][e] = n;
  }
  if (!header) return absl::InvalidArgumentError(absl::StrCat(path, ": empty record"));
  return tokens;
}

absl::StatusOr<Placement> BalancedPlacement(const std::vector<std::vector<int64_t>>& tokens,
                                            std::span<const ExpertRange> loaded) {
  Placement p;
  p.workers.assign(loaded.begin(), loaded.end());
  const size_t workers = loaded.size();
  for (size_t l = 0; l < tokens.size(); ++l) {
    const std::vector<int64_t>& t = tokens[l];
    std::vector<int32_t> order(t.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return t[a] > t[b]; });
    std::vector<int64_t> load(workers, 0);
    std::vector<std::vector<char>> mask(workers, std::vector<char>(t.size(), 0));
    for (int32_t e : order) {
      int32_t best = -1;
      for (size_t w = 0; w < workers; ++w) {
        if (!loaded[w].Contains(e)) continue;
        if (best < 0 || load[w] < load[best]) best = static_cast<int32_t>(w);
      }
      if (best < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("expert ", e, " is loaded by no worker (their --experts)"));
      }
      load[best] += t[e];
      mask[best][e] = 1;
    }
    std::vector<std::vector<ExpertRange>> layer;
    for (size_t w = 0; w < workers; ++w) layer.push_back(RangesOf(mask[w]));
    p.layers.push_back(std::move(layer));
  }
  return p;
}

double MeanImbalance(const Placement& placement, const std::vector<std::vector<int64_t>>& tokens) {
  double sum = 0;
  int64_t counted = 0;
  const int64_t workers = placement.worker_count();
  for (size_t l = 0; l < tokens.size(); ++l) {
    // As the dispatcher sends a step: each segment whole to one of its hosts, the heaviest
    // first, each to its least-loaded host.
    std::vector<std::vector<ExpertRange>> served;
    for (int32_t w = 0; w < workers; ++w) {
      served.push_back(placement.Served(static_cast<int64_t>(l), w));
    }
    const Segmentation seg = Segmentation::Of(served, static_cast<int64_t>(tokens[l].size()));
    std::vector<std::pair<int64_t, size_t>> weights;  // (tokens, segment)
    for (size_t s = 0; s < seg.segments.size(); ++s) {
      int64_t n = 0;
      for (int64_t e = seg.segments[s].begin; e < seg.segments[s].end; ++e) n += tokens[l][e];
      weights.push_back({n, s});
    }
    std::sort(weights.begin(), weights.end(),
              [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<double> load(workers, 0.0);
    for (const auto& [n, s] : weights) {
      int32_t best = -1;
      for (int32_t h : seg.hosts[s]) {
        if (best < 0 || load[h] < load[best]) best = h;
      }
      if (best >= 0) load[best] += static_cast<double>(n);
    }
    const double total = std::accumulate(load.begin(), load.end(), 0.0);
    if (total <= 0) continue;
    sum += *std::max_element(load.begin(), load.end()) / (total / workers);
    ++counted;
  }
  return counted > 0 ? sum / counted : 1.0;
}

}  // namespace moe
