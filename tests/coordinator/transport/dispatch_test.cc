#include "coordinator/transport/dispatch.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

TEST(PlacementTest, ContiguousUnevenSplits) {
  const Placement p = Placement::Contiguous(3, 2);
  EXPECT_THAT(p.workers, ElementsAre(ExpertRange{0, 1}, ExpertRange{1, 3}));
  const Placement q = Placement::Contiguous(32, 3);
  EXPECT_THAT(q.workers, ElementsAre(ExpertRange{0, 10}, ExpertRange{10, 21}, ExpertRange{21, 32}));
  // More workers than experts: some host nothing, every expert is still hosted once.
  const Placement r = Placement::Contiguous(2, 4);
  EXPECT_THAT(r.workers, ElementsAre(ExpertRange{0, 0}, ExpertRange{0, 1}, ExpertRange{1, 1},
                                     ExpertRange{1, 2}));
  EXPECT_THAT(UncoveredExperts(r.workers, 2), IsEmpty());
}

TEST(SegmentationTest, CutsAtEveryBoundaryAndListsHostsInWorkerOrder) {
  // Workers 0 and 1 replicate [0, 4); worker 2 hosts [2, 8) (overlapping); worker 3 nothing.
  const std::vector<ExpertRange> hosted = {{0, 4}, {0, 4}, {2, 8}, {}};
  const Segmentation s = Segmentation::Of(hosted, 8);
  EXPECT_THAT(s.segments, ElementsAre(ExpertRange{0, 2}, ExpertRange{2, 4}, ExpertRange{4, 8}));
  EXPECT_THAT(s.segment_of_expert, ElementsAre(0, 0, 1, 1, 2, 2, 2, 2));
  ASSERT_EQ(s.hosts.size(), 3u);
  EXPECT_THAT(s.hosts[0], ElementsAre(0, 1));
  EXPECT_THAT(s.hosts[1], ElementsAre(0, 1, 2));
  EXPECT_THAT(s.hosts[2], ElementsAre(2));
  // Ranges beyond the model are clipped; an unhosted run is a segment with no host.
  const Segmentation t = Segmentation::Of(std::vector<ExpertRange>{{-3, 2}, {3, 99}}, 4);
  EXPECT_THAT(t.segments, ElementsAre(ExpertRange{0, 2}, ExpertRange{2, 3}, ExpertRange{3, 4}));
  EXPECT_THAT(t.hosts[1], IsEmpty());
}

TEST(UncoveredExpertsTest, ReportsMaximalRunsInOrder) {
  EXPECT_THAT(UncoveredExperts(std::vector<ExpertRange>{{0, 8}}, 8), IsEmpty());
  EXPECT_THAT(UncoveredExperts(std::vector<ExpertRange>{{2, 3}, {5, 6}}, 8),
              ElementsAre(ExpertRange{0, 2}, ExpertRange{3, 5}, ExpertRange{6, 8}));
  EXPECT_THAT(UncoveredExperts(std::vector<ExpertRange>{}, 3), ElementsAre(ExpertRange{0, 3}));
  // Overlaps cover as well as disjoint ranges.
  EXPECT_THAT(UncoveredExperts(std::vector<ExpertRange>{{0, 5}, {3, 7}}, 8),
              ElementsAre(ExpertRange{7, 8}));
}

TEST(AllExpertsServedTest, CountsOnlyReadyWorkers) {
  std::vector<WorkerSnapshot> workers = {{"a", true, {0, 4}, "", false, "cpu", "grpc", {}},
                                         {"b", true, {4, 8}, "", false, "cpu", "grpc", {}},
                                         {"c", false, {4, 8}, "down", false, "cpu", "grpc", {}}};
  EXPECT_TRUE(AllExpertsServed(workers, 8));
  workers[1].ready = false;  // b down, c (its replica) down too
  EXPECT_FALSE(AllExpertsServed(workers, 8));
  workers[2].ready = true;
  EXPECT_TRUE(AllExpertsServed(workers, 8));
  EXPECT_FALSE(AllExpertsServed(workers, 9));  // expert 8 hosted by nobody
}

// A token routed to fewer experts than top_k (a request's experts_per_token) has -1 slots:
// they go nowhere, and a token with only such slots in a segment has no row there.
TEST(DispatchPlanTest, UnusedSlotsAreNotDispatched) {
  Routing r;
  r.Resize(2, 2);
  r.experts = {3, -1, /*t1*/ 0, 2};
  r.weights = {1.0f, 0.0f, 0.5f, 0.5f};
  const Segmentation seg = Segmentation::Of(Placement::Contiguous(4, 2).workers, 4);
  DispatchPlan plan;
  plan.Build(r, seg.segment_of_expert, 2);
  EXPECT_THAT(plan.segments()[0].tokens, ElementsAre(1));
  EXPECT_THAT(plan.segments()[0].offsets, ElementsAre(0, 1));
  EXPECT_THAT(plan.segments()[1].tokens, ElementsAre(0, 1));
  EXPECT_THAT(plan.segments()[1].offsets, ElementsAre(0, 1, 2));
  EXPECT_EQ(plan.segments()[1].assignments[0].expert, 3);
  EXPECT_FLOAT_EQ(plan.segments()[1].assignments[0].weight, 1.0f);
}

TEST(DispatchPlanTest, EachTokenOncePerSegmentWithItsPairs) {
  // 3 tokens, top-2 over 4 experts in 2 segments ([0,2), [2,4)).
  Routing r;
  r.Resize(3, 2);
  r.experts = {0, 1, /*t1*/ 3, 0, /*t2*/ 2, 3};
  r.weights = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f};
  const Segmentation seg = Segmentation::Of(Placement::Contiguous(4, 2).workers, 4);
  DispatchPlan plan;
  plan.Build(r, seg.segment_of_expert, 2);
  const DispatchRows& s0 = plan.segments()[0];
  const DispatchRows& s1 = plan.segments()[1];
  EXPECT_THAT(s0.tokens, ElementsAre(0, 1));
  EXPECT_THAT(s0.offsets, ElementsAre(0, 2, 3));
  ASSERT_EQ(s0.assignments.size(), 3u);
  EXPECT_EQ(s0.assignments[0].expert, 0);
  EXPECT_EQ(s0.assignments[1].expert, 1);
  EXPECT_EQ(s0.assignments[2].expert, 0);
  EXPECT_FLOAT_EQ(s0.assignments[2].weight, 0.3f);
  EXPECT_THAT(s1.tokens, ElementsAre(1, 2));
  EXPECT_THAT(s1.offsets, ElementsAre(0, 1, 3));
  EXPECT_EQ(s1.assignments[0].expert, 3);
  EXPECT_FLOAT_EQ(s1.assignments[0].weight, 0.7f);
  // Appending rebases the offsets.
  DispatchRows both;
  both.Clear();
  both.Append(s0);
  both.Append(s1);
  EXPECT_THAT(both.tokens, ElementsAre(0, 1, 1, 2));
  EXPECT_THAT(both.offsets, ElementsAre(0, 2, 3, 4, 6));
  // Rebuilding reuses the plan and forgets the previous step.
  RouteDense(2, &r);
  plan.Build(r, std::vector<int32_t>{0}, 1);
  ASSERT_EQ(plan.segments().size(), 1u);
  EXPECT_THAT(plan.segments()[0].tokens, ElementsAre(0, 1));
  EXPECT_THAT(plan.segments()[0].offsets, ElementsAre(0, 1, 2));
}

TEST(GatherScatterTest, GatherCopiesRowsToAnUnalignedBuffer) {
  const int64_t hidden = 3;
  const std::vector<float> x = {0, 1, 2, 10, 11, 12, 20, 21, 22};
  std::vector<char> wire(1 + 2 * hidden * sizeof(float));
  const std::vector<int32_t> tokens = {2, 0};
  GatherRows(x.data(), hidden, tokens, wire.data() + 1);
  std::vector<float> rows(2 * hidden);
  std::memcpy(rows.data(), wire.data() + 1, rows.size() * sizeof(float));
  EXPECT_THAT(rows, ElementsAre(20, 21, 22, 0, 1, 2));
}

TEST(GatherScatterTest, ScatterAddsIntoTheTokensRowsFromAnUnalignedBuffer) {
  const int64_t hidden = 2;
  const std::vector<float> partial = {1, 2, 3, 4};
  std::vector<char> wire(3 + partial.size() * sizeof(float));
  std::memcpy(wire.data() + 3, partial.data(), partial.size() * sizeof(float));
  std::vector<float> out = {100, 100, 200, 200, 300, 300};
  ScatterAddRows(wire.data() + 3, hidden, std::vector<int32_t>{2, 0}, out.data());
  EXPECT_THAT(out, ElementsAre(103, 104, 200, 200, 301, 302));
}

// The fixed combine order: partial sums land in the order they are added (worker order in the
// transports), with no reassociation. With 1, 1e8 and -1e8 float addition is not associative:
// (1 + 1e8) - 1e8 = 0 in f32, while 1 + (1e8 - 1e8) = 1.
TEST(GatherScatterTest, PartialsAddInCallOrder) {
  const std::vector<int32_t> token = {0};
  float out = 0.0f;
  const float w0 = 1.0f, w1 = 1e8f, w2 = -1e8f;
  ScatterAddRows(&w0, 1, token, &out);
  ScatterAddRows(&w1, 1, token, &out);
  ScatterAddRows(&w2, 1, token, &out);
  EXPECT_EQ(out, 0.0f);
  out = 0.0f;
  ScatterAddRows(&w1, 1, token, &out);
  ScatterAddRows(&w2, 1, token, &out);
  ScatterAddRows(&w0, 1, token, &out);
  EXPECT_EQ(out, 1.0f);
}

// --- Dispatcher over fake links: replica choice, failover and the combine order. ---

constexpr int64_t kHidden = 3;

enum class Fault { kNone, kError, kHang, kNaN };

// Workers in this process. Expert e maps x to x * (1 + e / 7) rounded in f32; a row's
// partial sum accumulates its pairs with fused multiply-adds, as the real kernels do, so the
// grouping of a sum changes its bits.
class FakeLinks : public WorkerLinks {
 public:
  explicit FakeLinks(std::vector<ExpertRange> hosted)
      : hosted_(std::move(hosted)),
        fault_(hosted_.size(), Fault::kNone),
        down_(hosted_.size(), 0),
        rows_(hosted_.size(), 0),
        out_(hosted_.size()) {}

  void set_fault(int32_t w, Fault f) { fault_[w] = f; }
  void set_down(int32_t w, bool down) { down_[w] = down; }
  int64_t rows(int32_t w) const { return rows_[w]; }
  std::vector<std::string> marked;  // "w: why" for each MarkDown
  int abandoned = 0;

  bool Ready(int32_t w) override { return !down_[w]; }
  void Start(int32_t w, int64_t, const DispatchRows& rows, const float* x) override {
    rows_[w] += rows.rows();
    out_[w].assign(rows.rows() * kHidden, 0.0f);
    for (int64_t r = 0; r < rows.rows(); ++r) {
      for (int32_t i = rows.offsets[r]; i < rows.offsets[r + 1]; ++i) {
        const ExpertAssignment& a = rows.assignments[i];
        EXPECT_TRUE(hosted_[w].Contains(a.expert)) << "worker " << w << " got expert " << a.expert;
        for (int64_t k = 0; k < kHidden; ++k) {
          const float y = x[rows.tokens[r] * kHidden + k] * (1.0f + a.expert / 7.0f);
          out_[w][r * kHidden + k] = std::fma(a.weight, y, out_[w][r * kHidden + k]);
        }
      }
    }
    if (fault_[w] == Fault::kNaN && !out_[w].empty()) out_[w][1] = std::nanf("");
  }
  bool Wait(int32_t w, absl::Time) override { return fault_[w] != Fault::kHang; }
  void Abandon(int32_t) override { ++abandoned; }
  absl::StatusOr<const void*> Answer(int32_t w, DispatchReport* report) override {
    report->seconds = 0.001;
    if (fault_[w] == Fault::kError) return absl::UnavailableError("stream closed");
    return static_cast<const void*>(out_[w].data());
  }
  void MarkDown(int32_t w, const std::string& why) override {
    marked.push_back(absl::StrCat(w, ": ", why));
    down_[w] = 1;
  }
  std::string Name(int32_t w) override { return absl::StrCat("worker ", w); }
  std::string DownReason(int32_t w) override { return down_[w] ? "down" : ""; }

 private:
  std::vector<ExpertRange> hosted_;
  std::vector<Fault> fault_;
  std::vector<char> down_;
  std::vector<int64_t> rows_;
  std::vector<std::vector<float>> out_;
};

// 16 tokens, top-3 over 8 experts, with weights and inputs whose sums round differently when
// regrouped.
Routing Routed16() {
  Routing r;
  r.Resize(16, 3);
  for (int64_t t = 0; t < 16; ++t) {
    for (int64_t j = 0; j < 3; ++j) {
      r.experts[t * 3 + j] = static_cast<int32_t>((t * 5 + j * 3) % 8);
      r.weights[t * 3 + j] = 0.1f + 0.37f * static_cast<float>(j) + 0.013f * static_cast<float>(t);
    }
  }
  return r;
}

std::vector<float> Inputs16() {
  std::vector<float> x(16 * kHidden);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 1.0f / static_cast<float>(i + 3) - 0.21f;
  return x;
}

std::vector<float> ExchangeOnce(const std::vector<ExpertRange>& hosted, FakeLinks* links,
                                absl::Status* status = nullptr, DispatchOptions options = {}) {
  Dispatcher d(Placement{hosted, {}}, 1, 8, kHidden, options);
  const Routing r = Routed16();
  const std::vector<float> x = Inputs16();
  std::vector<float> out(16 * kHidden, -1.0f);
  const absl::Status s = d.Exchange(0, r, x.data(), out.data(), links);
  if (status != nullptr) *status = s;
  EXPECT_TRUE(status != nullptr || s.ok()) << s;
  return out;
}

TEST(DispatcherTest, ReplicasAndFailoverGiveTheSameBitsAsOneCopyPerSegment) {
  const std::vector<ExpertRange> single = {{0, 4}, {4, 8}};
  FakeLinks reference_links(single);
  const std::vector<float> reference = ExchangeOnce(single, &reference_links);
  // The grouping matters: one worker hosting all 8 experts sums each token differently.
  FakeLinks one_links({{0, 8}});
  EXPECT_NE(ExchangeOnce({{0, 8}}, &one_links), reference);

  // Every segment on 2 workers: replicas chosen by load, a failed one, a NaN one, a hung one.
  const std::vector<ExpertRange> replicated = {{0, 4}, {4, 8}, {0, 4}, {4, 8}};
  for (const Fault fault : {Fault::kNone, Fault::kError, Fault::kNaN, Fault::kHang}) {
    for (int32_t faulty = 0; faulty < 4; ++faulty) {
      FakeLinks links(replicated);
      links.set_fault(faulty, fault);
      absl::Status s;
      const std::vector<float> out = ExchangeOnce(replicated, &links, &s);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(out, reference) << "fault " << static_cast<int>(fault) << " on " << faulty;
      if (fault == Fault::kNone) {
        EXPECT_THAT(links.marked, IsEmpty());
        continue;
      }
      if (links.rows(faulty) == 0) continue;  // it was not chosen this step
      ASSERT_EQ(links.marked.size(), 1u);
      EXPECT_THAT(links.marked[0], ::testing::StartsWith(absl::StrCat(faulty, ": layer 0: ")));
    }
  }
}

TEST(DispatcherTest, FailedWorkersRowsGoToTheReplicaInTheSameStep) {
  const std::vector<ExpertRange> hosted = {{0, 8}, {0, 8}};
  FakeLinks reference_links({{0, 8}});
  const std::vector<float> reference = ExchangeOnce({{0, 8}}, &reference_links);
  for (const Fault fault : {Fault::kError, Fault::kNaN, Fault::kHang}) {
    for (int32_t faulty : {0, 1}) {
      FakeLinks l(hosted);
      Dispatcher d(Placement{hosted, {}}, 1, 8, kHidden, DispatchOptions{});
      const Routing r = Routed16();
      const std::vector<float> x = Inputs16();
      std::vector<float> out(16 * kHidden);
      ASSERT_TRUE(d.Exchange(0, r, x.data(), out.data(), &l).ok());  // measures the answer time
      const int64_t healthy_before = l.rows(1 - faulty);
      l.set_fault(faulty, fault);
      // Replicas alternate, so one of the next two steps picks the faulty worker.
      for (int step = 0; step < 2; ++step) {
        ASSERT_TRUE(d.Exchange(0, r, x.data(), out.data(), &l).ok());
        EXPECT_EQ(out, reference);
      }
      ASSERT_EQ(l.marked.size(), 1u) << "fault " << static_cast<int>(fault);
      EXPECT_EQ(d.failovers(), 1);
      EXPECT_EQ(l.rows(1 - faulty) - healthy_before, 32);  // both steps' 16 rows
      EXPECT_EQ(l.abandoned, fault == Fault::kHang ? 1 : 0);
      if (fault == Fault::kNaN) {
        EXPECT_THAT(l.marked[0], HasSubstr("output row 0 holds nan"));
      }
      if (fault == Fault::kError) {
        EXPECT_THAT(l.marked[0], HasSubstr("stream closed"));
      }
      if (fault == Fault::kHang) {
        EXPECT_THAT(l.marked[0], HasSubstr("no answer within 500ms (the step's deadline; its "
                                           "rows went to a replica)"));
      }
    }
  }
}

TEST(DispatcherTest, ReplicasShareTheRows) {
  const std::vector<ExpertRange> hosted = {{0, 4}, {4, 8}, {0, 4}, {4, 8}};
  FakeLinks links(hosted);
  Dispatcher d(Placement{hosted, {}}, 1, 8, kHidden, DispatchOptions{});
  const Routing r = Routed16();
  const std::vector<float> x = Inputs16();
  std::vector<float> out(16 * kHidden);
  for (int step = 0; step < 10; ++step)
    ASSERT_TRUE(d.Exchange(0, r, x.data(), out.data(), &links).ok());
  // Each segment alternates between its two hosts.
  EXPECT_EQ(links.rows(0), links.rows(2));
  EXPECT_EQ(links.rows(1), links.rows(3));
  EXPECT_GT(links.rows(0), 0);
  EXPECT_GT(links.rows(1), 0);
}

TEST(DispatcherTest, NoLiveReplicaFailsNamingTheWorkers) {
  const std::vector<ExpertRange> hosted = {{0, 4}, {4, 8}, {4, 8}};
  // A hung worker with no replica is waited for up to the step timeout, then named.
  FakeLinks hung(hosted);
  hung.set_fault(0, Fault::kHang);
  absl::Status s;
  ExchangeOnce(hosted, &hung, &s);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("worker 0 failed at layer 0: no answer within 10s"));
  EXPECT_THAT(s.message(), HasSubstr("experts [0, 4) have no ready worker (worker 0: down)"));
  EXPECT_EQ(hung.abandoned, 1);
  // Both copies of [4, 8) fail in one step: the rows move once, then the step fails.
  FakeLinks both(hosted);
  both.set_fault(1, Fault::kError);
  both.set_fault(2, Fault::kError);
  ExchangeOnce(hosted, &both, &s);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("stream closed"));
  EXPECT_THAT(s.message(), HasSubstr("worker 1: down; worker 2: down"));
  EXPECT_EQ(both.marked.size(), 2u);
  // Down before the step: nothing is sent.
  FakeLinks down(hosted);
  down.set_down(0, true);
  ExchangeOnce(hosted, &down, &s);
  EXPECT_THAT(s.message(), HasSubstr("experts [0, 4) have no ready worker (worker 0: down)"));
  EXPECT_EQ(down.rows(1) + down.rows(2), 0);
}

TEST(DispatcherTest, SoftDeadlineFollowsTheMeasuredAnswerTime) {
  // A hung worker with a replica is given the floor, not the step timeout: the fake's Wait
  // returns at once, so check the message names the floor.
  const std::vector<ExpertRange> hosted = {{0, 8}, {0, 8}};
  DispatchOptions options;
  options.deadline_floor = absl::Milliseconds(250);
  Dispatcher d(Placement{hosted, {}}, 1, 8, kHidden, options);
  FakeLinks links(hosted);
  const Routing r = Routed16();
  const std::vector<float> x = Inputs16();
  std::vector<float> out(16 * kHidden);
  ASSERT_TRUE(d.Exchange(0, r, x.data(), out.data(), &links).ok());  // measures 1 ms
  links.set_fault(0, Fault::kHang);
  links.set_fault(1, Fault::kHang);
  // Whichever is chosen first hangs and fails over after the floor; the other then hangs
  // with no replica left and is waited for up to the step timeout.
  const absl::Status s = d.Exchange(0, r, x.data(), out.data(), &links);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("no answer within 250ms (the step's deadline"));
  ASSERT_EQ(links.marked.size(), 2u);
  EXPECT_THAT(links.marked[1], HasSubstr("no answer within 10s"));
}

}  // namespace
}  // namespace moe
