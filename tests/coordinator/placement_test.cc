#include "coordinator/placement.h"

#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

ModelConfig Config(int64_t layers, int64_t experts) {
  ModelConfig c;
  c.num_hidden_layers = layers;
  c.num_local_experts = experts;
  return c;
}

TEST(ExpertSetTest, ListsAndRangesMerge) {
  auto set = ParseExpertSet("6, 0-2,3 ,7", 8);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(*set, (std::vector<ExpertRange>{{0, 4}, {6, 8}}));
  EXPECT_EQ(*ParseExpertSet("all", 8), (std::vector<ExpertRange>{{0, 8}}));
  EXPECT_TRUE(ParseExpertSet("", 8)->empty());
  for (const char* bad : {"0-8", "3-1", "x", "1,,2", "-1", "all,3"}) {
    const auto s = ParseExpertSet(bad, 8);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(s.status().message(), HasSubstr("experts 0-7")) << bad;
  }
}

TEST(PlacementFileTest, PerLayerSetsOverrideTheDefaultAndSpansCoverThem) {
  auto file = ParsePlacement(R"({"workers": [
      {"address": "a:1", "experts": "0-3", "layers": {"1-2": "0-1,6-7"}},
      {"address": "b:1", "experts": "4-7", "layers": {"2": "2-5"}},
      {"address": "c:1", "layers": {"1": "2-5"}}]})",
                             Config(3, 8), "test.json");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->addresses, (std::vector<std::string>{"a:1", "b:1", "c:1"}));
  const Placement& p = file->placement;
  EXPECT_EQ(p.Served(0, 0), (std::vector<ExpertRange>{{0, 4}}));
  EXPECT_EQ(p.Served(1, 0), (std::vector<ExpertRange>{{0, 2}, {6, 8}}));
  EXPECT_EQ(p.Served(2, 1), (std::vector<ExpertRange>{{2, 6}}));
  EXPECT_TRUE(p.Served(0, 2).empty());
  EXPECT_EQ(p.Span(0, 3), (ExpertRange{0, 8}));
  EXPECT_EQ(p.Span(2, 3), (ExpertRange{2, 6}));
  EXPECT_EQ(p.workers[1], (ExpertRange{2, 8}));
  // Layer 1: a has 0-1, 6-7; b 4-7; c 2-5: all covered, 4-5 and 6-7 twice.
  const Segmentation seg = Segmentation::Of(
      std::vector<std::vector<ExpertRange>>{p.Served(1, 0), p.Served(1, 1), p.Served(1, 2)}, 8);
  EXPECT_EQ(seg.segments, (std::vector<ExpertRange>{{0, 2}, {2, 4}, {4, 6}, {6, 8}}));
  EXPECT_EQ(seg.hosts, (std::vector<std::vector<int32_t>>{{0}, {2}, {1, 2}, {0, 1}}));
}

TEST(PlacementFileTest, EveryMistakeIsNamed) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{", "not a JSON object"},
      {R"({"workers": []})", "\"workers\" must be a non-empty list"},
      {R"({"workers": [{"address": "a", "experts": "0-7"}], "x": 1})", "unknown key \"x\""},
      {R"({"workers": [{"experts": "0-7"}]})", "workers[0]: \"address\" (HOST:PORT) is required"},
      {R"({"workers": [{"address": "a", "experts": "0-7"}, {"address": "a"}]})",
       "workers[1]: address a is listed twice"},
      {R"({"workers": [{"address": "a", "experts": 7}]})", "\"experts\" must be a string"},
      {R"({"workers": [{"address": "a", "experts": "0-7", "layers": {"3": "0"}}]})",
       "layers key \"3\" is not a layer N or inclusive range A-B of the model's layers 0-2"},
      {R"({"workers": [{"address": "a", "experts": "0-7", "layers": {"0-1": "0-7", "1": ""}}]})",
       "layer 1 is listed twice"},
      {R"({"workers": [{"address": "a", "experts": "0-6"}]})",
       "expert 7 of layer 0 is served by no worker"},
      {R"({"workers": [{"address": "a", "experts": "0-7", "layers": {"2": "0-3"}}]})",
       "experts [4, 8) of layer 2 are served by no worker"},
      {R"({"workers": [{"address": "a", "experts": "0-7", "wat": 1}]})", "unknown key \"wat\""},
  };
  for (const auto& [json, message] : cases) {
    const auto file = ParsePlacement(json, Config(3, 8), "p.json");
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << json;
    EXPECT_THAT(file.status().message(), HasSubstr("placement p.json: ")) << json;
    EXPECT_THAT(file.status().message(), HasSubstr(message)) << json;
  }
  EXPECT_EQ(LoadPlacementFile("/nonexistent/p.json", Config(3, 8)).status().code(),
            absl::StatusCode::kNotFound);
}

std::string WriteFile(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path) << text;
  return path;
}

TEST(ExpertRecordTest, ReadsTheRecordAndRefusesBadLines) {
  auto tokens = LoadExpertRecord(
      WriteFile("ok.csv", "layer,expert,tokens\n0,1,5\n1,3,7\n\n0,0,2\n"), Config(2, 4));
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(*tokens, (std::vector<std::vector<int64_t>>{{2, 5, 0, 0}, {0, 0, 0, 7}}));
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "empty record"},
      {"l,e,t\n", ":1: expected the header layer,expert,tokens"},
      {"layer,expert,tokens\n2,0,1\n", ":2: expected layer,expert,tokens with a layer in 0-1"},
      {"layer,expert,tokens\n0,4,1\n", "an expert in 0-3"},
      {"layer,expert,tokens\n0,1,-3\n", "a count >= 0, got \"0,1,-3\""},
      {"layer,expert,tokens\n0,1,3\n0,1,4\n", ":3: layer 0 expert 1 is listed twice"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto r = LoadExpertRecord(WriteFile("bad" + std::to_string(i) + ".csv", cases[i].first),
                                    Config(2, 4));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << i;
    EXPECT_THAT(r.status().message(), HasSubstr(cases[i].second)) << i;
  }
}

TEST(BalancedPlacementTest, SpreadsHotExpertsOverTheWorkersThatLoadedThem) {
  // Layer 0: experts 0-3 hot; layer 1: expert 7 alone is hot. Worker 0 loaded 0-5, 1 loaded 2-7.
  const std::vector<std::vector<int64_t>> tokens = {{100, 100, 100, 100, 1, 1, 1, 1},
                                                    {1, 1, 1, 1, 1, 1, 1, 500}};
  const std::vector<ExpertRange> loaded = {{0, 6}, {2, 8}};
  auto p = BalancedPlacement(tokens, loaded);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_TRUE(p->CheckCoverage(2, 8).ok());
  for (int64_t l = 0; l < 2; ++l) {
    for (int32_t w = 0; w < 2; ++w) {
      for (const ExpertRange& r : p->Served(l, w)) {
        EXPECT_TRUE(loaded[w].begin <= r.begin && r.end <= loaded[w].end) << l << " " << w;
      }
    }
  }
  // Layer 0: two hot experts each (0, 1 can only go to worker 0, so 2 and 3 go to 1).
  EXPECT_EQ(p->Served(0, 1).front(), (ExpertRange{2, 4}));
  Placement own;
  own.workers = loaded;
  EXPECT_GT(MeanImbalance(own, tokens), 1.5);
  EXPECT_LT(MeanImbalance(*p, tokens), MeanImbalance(own, tokens));
  // Nobody loaded expert 7.
  const auto none = BalancedPlacement(tokens, std::vector<ExpertRange>{{0, 6}, {2, 7}});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(none.status().message(), HasSubstr("expert 7 is loaded by no worker"));
}

}  // namespace
}  // namespace moe
