#include "coordinator/client_limit.h"

#include <memory>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

TEST(ClientLimitTest, BoundsEachHostAndReleasesWithTheSlot) {
  ClientLimit limit(2);
  std::unique_ptr<ClientLimit::Slot> a, b, c, other;
  ASSERT_TRUE(limit.Acquire("10.0.0.1", &a).ok());
  ASSERT_TRUE(limit.Acquire("10.0.0.1", &b).ok());
  const absl::Status full = limit.Acquire("10.0.0.1", &c);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("client 10.0.0.1 already has 2"));
  EXPECT_THAT(full.message(), HasSubstr("--max-streams-per-client 2"));
  EXPECT_TRUE(limit.Acquire("10.0.0.2", &other).ok());  // another host has its own budget
  a.reset();                                            // released with the slot
  EXPECT_TRUE(limit.Acquire("10.0.0.1", &c).ok());
}

TEST(ClientLimitTest, ZeroMeansNoBound) {
  ClientLimit limit(0);
  std::unique_ptr<ClientLimit::Slot> slots[100];
  for (auto& s : slots) ASSERT_TRUE(limit.Acquire("h", &s).ok());
}

TEST(ClientLimitTest, HostOfDropsThePortAndTheScheme) {
  EXPECT_EQ(ClientLimit::HostOf("ipv4:127.0.0.1:5678"), "127.0.0.1");
  EXPECT_EQ(ClientLimit::HostOf("ipv6:[::1]:5678"), "[::1]");
  EXPECT_EQ(ClientLimit::HostOf("10.1.2.3:80"), "10.1.2.3");
  EXPECT_EQ(ClientLimit::HostOf("unix:/tmp/s"), "unix");
}

}  // namespace
}  // namespace moe
