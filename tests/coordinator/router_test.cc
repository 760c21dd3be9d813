#include "coordinator/router.h"

#include <cmath>

#include "coordinator/expert_transport.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::ElementsAre;

TEST(RouterTest, SoftmaxOverAllExpertsTopKRenormalized) {
  // One token, 4 experts, top-2: probabilities over all 4, keep the best 2, renormalize.
  std::vector<float> logits = {1.0f, 3.0f, 0.5f, 2.0f};
  Routing r;
  RouteTokens(logits.data(), 1, 4, 2, &r);
  EXPECT_THAT(r.experts, ElementsAre(1, 3));
  const double e1 = std::exp(3.0), e3 = std::exp(2.0);
  EXPECT_NEAR(r.weights[0], e1 / (e1 + e3), 1e-6);
  EXPECT_NEAR(r.weights[1], e3 / (e1 + e3), 1e-6);
}

TEST(RouterTest, TiesGoToLowestExpertId) {
  std::vector<float> logits = {0.0f, 2.0f, 2.0f, 2.0f, 1.0f};
  Routing r;
  RouteTokens(logits.data(), 1, 5, 2, &r);
  EXPECT_THAT(r.experts, ElementsAre(1, 2));
  EXPECT_FLOAT_EQ(r.weights[0], 0.5f);
}

TEST(RouterTest, SeveralTokensAndTopKEqualsExperts) {
  std::vector<float> logits = {0.f, 1.f, 2.f, /*token 1*/ 5.f, -1.f, 0.f};
  Routing r;
  RouteTokens(logits.data(), 2, 3, 3, &r);
  EXPECT_THAT(r.experts, ElementsAre(2, 1, 0, 0, 2, 1));
  float sum = 0;
  for (int j = 3; j < 6; ++j) sum += r.weights[j];
  EXPECT_NEAR(sum, 1.0f, 1e-6);
}

TEST(RouterTest, DenseIsExpertZeroWeightOne) {
  Routing r;
  RouteDense(3, &r);
  EXPECT_THAT(r.experts, ElementsAre(0, 0, 0));
  EXPECT_THAT(r.weights, ElementsAre(1.f, 1.f, 1.f));
}

TEST(PlacementTest, ContiguousUnevenSplits) {
  Placement p = Placement::Contiguous(3, 2);
  ASSERT_EQ(p.ranges.size(), 2u);
  EXPECT_EQ(p.ranges[0], (std::pair<int64_t, int64_t>{0, 1}));
  EXPECT_EQ(p.ranges[1], (std::pair<int64_t, int64_t>{1, 3}));
  Placement q = Placement::Contiguous(32, 3);
  EXPECT_EQ(q.ranges.back().second, 32);
  for (int64_t e = 0; e < 32; ++e) EXPECT_GE(q.WorkerOf(e), 0);
  EXPECT_EQ(q.WorkerOf(32), -1);
}

TEST(DispatchPlanTest, EachTokenOncePerWorkerWithItsPairs) {
  // 3 tokens, top-2 over 4 experts on 2 workers ([0,2), [2,4)).
  Routing r;
  r.Resize(3, 2);
  r.experts = {0, 1, /*t1*/ 3, 0, /*t2*/ 2, 3};
  r.weights = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f};
  DispatchPlan plan;
  plan.Build(r, Placement::Contiguous(4, 2).WorkerTable(4), 2);
  const WorkerDispatch& w0 = plan.workers()[0];
  const WorkerDispatch& w1 = plan.workers()[1];
  EXPECT_THAT(w0.tokens, ElementsAre(0, 1));
  EXPECT_THAT(w0.offsets, ElementsAre(0, 2, 3));
  EXPECT_EQ(w0.assignments[2].expert, 0);
  EXPECT_FLOAT_EQ(w0.assignments[2].weight, 0.3f);
  EXPECT_THAT(w1.tokens, ElementsAre(1, 2));
  EXPECT_THAT(w1.offsets, ElementsAre(0, 1, 3));
  // Rebuilding reuses the plan and forgets the previous step.
  RouteDense(2, &r);
  plan.Build(r, Placement::Contiguous(1, 1).WorkerTable(1), 1);
  ASSERT_EQ(plan.workers().size(), 1u);
  EXPECT_THAT(plan.workers()[0].tokens, ElementsAre(0, 1));
}

}  // namespace
}  // namespace moe
