#include "coordinator/transport/dispatch.h"

#include <cstring>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::ElementsAre;
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

TEST(AssignExpertsToWorkersTest, FirstListedReplicaWinsAndDownWorkersAreSkipped) {
  // Worker 1 replicates worker 0's [0, 4); worker 2 hosts [4, 8).
  std::vector<ExpertRange> hosted = {{0, 4}, {0, 4}, {4, 8}};
  std::vector<int32_t> table = {42};  // stale content is replaced
  AssignExpertsToWorkers(hosted, 8, &table);
  EXPECT_THAT(table, ElementsAre(0, 0, 0, 0, 2, 2, 2, 2));
  hosted[0] = {};  // worker 0 down: its replica takes over
  AssignExpertsToWorkers(hosted, 8, &table);
  EXPECT_THAT(table, ElementsAre(1, 1, 1, 1, 2, 2, 2, 2));
  hosted[2] = {};  // nobody for [4, 8)
  AssignExpertsToWorkers(hosted, 8, &table);
  EXPECT_THAT(table, ElementsAre(1, 1, 1, 1, -1, -1, -1, -1));
}

TEST(AssignExpertsToWorkersTest, RangesBeyondTheModelAreClipped) {
  std::vector<int32_t> table;
  AssignExpertsToWorkers(std::vector<ExpertRange>{{-3, 2}, {1, 99}}, 4, &table);
  EXPECT_THAT(table, ElementsAre(0, 0, 1, 1));
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
  std::vector<WorkerSnapshot> workers = {
      {"a", true, {0, 4}, ""}, {"b", true, {4, 8}, ""}, {"c", false, {4, 8}, "down"}};
  EXPECT_TRUE(AllExpertsServed(workers, 8));
  workers[1].ready = false;  // b down, c (its replica) down too
  EXPECT_FALSE(AllExpertsServed(workers, 8));
  workers[2].ready = true;
  EXPECT_TRUE(AllExpertsServed(workers, 8));
  EXPECT_FALSE(AllExpertsServed(workers, 9));  // expert 8 hosted by nobody
}

TEST(DispatchPlanTest, EachTokenOncePerWorkerWithItsPairs) {
  // 3 tokens, top-2 over 4 experts on 2 workers ([0,2), [2,4)).
  Routing r;
  r.Resize(3, 2);
  r.experts = {0, 1, /*t1*/ 3, 0, /*t2*/ 2, 3};
  r.weights = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f};
  std::vector<int32_t> table;
  AssignExpertsToWorkers(Placement::Contiguous(4, 2).workers, 4, &table);
  DispatchPlan plan;
  plan.Build(r, table, 2);
  const WorkerDispatch& w0 = plan.workers()[0];
  const WorkerDispatch& w1 = plan.workers()[1];
  EXPECT_THAT(w0.tokens, ElementsAre(0, 1));
  EXPECT_THAT(w0.offsets, ElementsAre(0, 2, 3));
  ASSERT_EQ(w0.assignments.size(), 3u);
  EXPECT_EQ(w0.assignments[0].expert, 0);
  EXPECT_EQ(w0.assignments[1].expert, 1);
  EXPECT_EQ(w0.assignments[2].expert, 0);
  EXPECT_FLOAT_EQ(w0.assignments[2].weight, 0.3f);
  EXPECT_THAT(w1.tokens, ElementsAre(1, 2));
  EXPECT_THAT(w1.offsets, ElementsAre(0, 1, 3));
  EXPECT_EQ(w1.assignments[0].expert, 3);
  EXPECT_FLOAT_EQ(w1.assignments[0].weight, 0.7f);
  // Rebuilding reuses the plan and forgets the previous step.
  RouteDense(2, &r);
  AssignExpertsToWorkers(Placement::Contiguous(1, 1).workers, 1, &table);
  plan.Build(r, table, 1);
  ASSERT_EQ(plan.workers().size(), 1u);
  EXPECT_THAT(plan.workers()[0].tokens, ElementsAre(0, 1));
  EXPECT_THAT(plan.workers()[0].offsets, ElementsAre(0, 1, 2));
}

TEST(DispatchPlanTest, ReplicaTableSendsToTheChosenWorkerOnly) {
  Routing r;
  r.Resize(2, 2);
  r.experts = {0, 3, 1, 2};
  r.weights = {0.5f, 0.5f, 0.9f, 0.1f};
  std::vector<int32_t> table;
  // Workers 0 and 1 both host everything; worker 0 is down.
  AssignExpertsToWorkers(std::vector<ExpertRange>{{}, {0, 4}}, 4, &table);
  DispatchPlan plan;
  plan.Build(r, table, 2);
  EXPECT_EQ(plan.workers()[0].rows(), 0);
  EXPECT_THAT(plan.workers()[0].offsets, ElementsAre(0));
  EXPECT_THAT(plan.workers()[1].tokens, ElementsAre(0, 1));
  EXPECT_THAT(plan.workers()[1].offsets, ElementsAre(0, 2, 4));
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

}  // namespace
}  // namespace moe
