#include "coordinator/router.h"

#include <cmath>

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

// Per-row K (a request's experts_per_token): the row's own top-K renormalized over the K, the
// other slots -1 with weight 0; other rows untouched.
TEST(RouterTest, RowsWithTheirOwnKLeaveTheRestOfTheirSlotsUnused) {
  std::vector<float> logits = {1.0f, 3.0f, 0.5f, 2.0f, /*token 1*/ 1.0f, 3.0f, 0.5f, 2.0f};
  const std::vector<int32_t> row_k = {1, 2};
  Routing r;
  RouteTokens(logits.data(), 2, 4, 2, &r, row_k);
  EXPECT_THAT(r.experts, ElementsAre(1, -1, 1, 3));
  EXPECT_THAT(r.weights[0], 1.0f);
  EXPECT_THAT(r.weights[1], 0.0f);
  const double e1 = std::exp(3.0), e3 = std::exp(2.0);
  EXPECT_NEAR(r.weights[2], e1 / (e1 + e3), 1e-6);
}

TEST(RouterTest, DenseIsExpertZeroWeightOne) {
  Routing r;
  RouteDense(3, &r);
  EXPECT_THAT(r.experts, ElementsAre(0, 0, 0));
  EXPECT_THAT(r.weights, ElementsAre(1.f, 1.f, 1.f));
}

}  // namespace
}  // namespace moe
