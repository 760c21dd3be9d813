#include "coordinator/kv_cache.h"

#include "gtest/gtest.h"

namespace moe {
namespace {

ModelConfig TinyConfig() {
  ModelConfig c;
  c.num_hidden_layers = 2;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.max_position_embeddings = 64;
  return c;
}

TEST(KvCacheTest, ReserveGrowsByBlocksAndReleaseReturnsThem) {
  KvCache cache(TinyConfig(), {.block_size = 4, .num_blocks = 5});
  BlockTable a, b;
  ASSERT_TRUE(cache.Reserve(&a, 5).ok());  // 2 blocks
  EXPECT_EQ(a.blocks.size(), 2u);
  ASSERT_TRUE(cache.Reserve(&a, 8).ok());  // still 2
  EXPECT_EQ(cache.free_blocks(), 3);
  ASSERT_TRUE(cache.Reserve(&b, 12).ok());
  EXPECT_EQ(cache.free_blocks(), 0);
  absl::Status full = cache.Reserve(&a, 9);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a.blocks.size(), 2u);  // unchanged on failure
  cache.Release(&b);
  EXPECT_EQ(cache.free_blocks(), 3);
  EXPECT_TRUE(b.blocks.empty());
  EXPECT_TRUE(cache.Reserve(&a, 9).ok());
  EXPECT_EQ(cache.used_blocks(), 3);
}

TEST(KvCacheTest, RowsOfDifferentSequencesAndLayersDoNotAlias) {
  KvCache cache(TinyConfig(), {.block_size = 2, .num_blocks = 4});
  BlockTable a, b;
  ASSERT_TRUE(cache.Reserve(&a, 3).ok());
  ASSERT_TRUE(cache.Reserve(&b, 3).ok());
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (int64_t p = 0; p < 3; ++p) {
      cache.Key(layer, a, p)[0] = static_cast<float>(100 * layer + p);
      cache.Key(layer, b, p)[0] = static_cast<float>(1000 + 100 * layer + p);
      cache.Value(layer, a, p)[7] = -static_cast<float>(100 * layer + p);
    }
  }
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (int64_t p = 0; p < 3; ++p) {
      EXPECT_EQ(cache.Key(layer, a, p)[0], 100 * layer + p);
      EXPECT_EQ(cache.Key(layer, b, p)[0], 1000 + 100 * layer + p);
      EXPECT_EQ(cache.Value(layer, a, p)[7], -(100 * layer + p));
    }
  }
}

TEST(KvCacheTest, AutoCapacityHoldsTheRunningSequencesFullContextsWithinTheMemoryBound) {
  KvCache eight(TinyConfig(), {});
  EXPECT_EQ(eight.num_blocks() * eight.block_size(), 8 * 64);
  // As many full contexts as sequences run (the coordinator passes --max-running).
  KvCache sixteen(TinyConfig(), {.auto_sequences = 16});
  EXPECT_EQ(sixteen.num_blocks() * sixteen.block_size(), 16 * 64);
  // A block of 16 positions holds 2 layers x 16 x kv_dim 8 x 4 bytes x (K, V) = 2 KiB: a 10 KiB
  // bound gives 5 blocks, but never less than one full context (4 blocks here is less, so 5).
  KvCache bounded(TinyConfig(), {.auto_sequences = 16, .auto_max_bytes = 10 << 10});
  EXPECT_EQ(bounded.num_blocks(), 5);
  KvCache one_context(TinyConfig(), {.auto_sequences = 16, .auto_max_bytes = 1});
  EXPECT_EQ(one_context.num_blocks() * one_context.block_size(), 64);
  // An explicit capacity wins.
  KvCache explicit_blocks(TinyConfig(), {.num_blocks = 3, .auto_sequences = 16});
  EXPECT_EQ(explicit_blocks.num_blocks(), 3);
}

}  // namespace
}  // namespace moe
