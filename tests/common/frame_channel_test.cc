#include "common/frame_channel.h"

#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

TEST(MemoryChannelTest, FramesArriveInOrderBothWays) {
  auto [a, b] = MemoryChannelPair();
  EXPECT_EQ(a->kind(), "memory");
  ASSERT_TRUE(a->Send("one").ok());
  ASSERT_TRUE(a->Send("").ok());
  ASSERT_TRUE(a->Send(std::string(1000, 'x')).ok());
  std::string f;
  ASSERT_TRUE(b->Receive(1000, &f).ok());
  EXPECT_EQ(f, "one");
  ASSERT_TRUE(b->Receive(1000, &f).ok());
  EXPECT_EQ(f, "");
  ASSERT_TRUE(b->Receive(1000, &f).ok());
  EXPECT_EQ(f, std::string(1000, 'x'));
  ASSERT_TRUE(b->Send("back").ok());
  ASSERT_TRUE(a->Receive(10, &f).ok());
  EXPECT_EQ(f, "back");
}

TEST(MemoryChannelTest, AnOversizedFrameIsRefusedAndEndsTheChannel) {
  auto [a, b] = MemoryChannelPair();
  ASSERT_TRUE(a->Send(std::string(11, 'x')).ok());
  std::string f;
  const absl::Status s = b->Receive(10, &f);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("a frame of 11 bytes exceeds the limit of 10"));
  EXPECT_EQ(a->Send("more").code(), absl::StatusCode::kUnavailable);
}

TEST(MemoryChannelTest, AbortUnblocksAWaitingReceiveOnEitherEnd) {
  auto [a, b] = MemoryChannelPair();
  absl::Status received;
  std::thread waiter([&, end = b.get()] {
    std::string f;
    received = end->Receive(100, &f);
  });
  a->Abort();
  waiter.join();
  EXPECT_EQ(received.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(b->Send("x").code(), absl::StatusCode::kUnavailable);
  // Dropping an end aborts the pair too.
  auto [c, d] = MemoryChannelPair();
  c.reset();
  std::string f;
  EXPECT_EQ(d->Receive(100, &f).code(), absl::StatusCode::kUnavailable);
}

TEST(MemoryChannelTest, AnOfferedEndIsTakenOnce) {
  auto [a, b] = MemoryChannelPair();
  OfferMemoryChannel("test-end", std::move(b));
  auto taken = TakeMemoryChannel("test-end");
  ASSERT_TRUE(taken.ok()) << taken.status();
  ASSERT_TRUE(a->Send("hi").ok());
  std::string f;
  ASSERT_TRUE((*taken)->Receive(10, &f).ok());
  EXPECT_EQ(f, "hi");
  const auto again = TakeMemoryChannel("test-end");
  EXPECT_EQ(again.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(again.status().message(), HasSubstr("tests only"));
}

}  // namespace
}  // namespace moe
