// Paged KV cache: fixed-size blocks of `block_size` token slots per layer, handed to sequences
// through per-sequence block tables, with a hard capacity. Keys and values are f32 (RoPE already
// applied to keys).
#ifndef MOE_COORDINATOR_KV_CACHE_H_
#define MOE_COORDINATOR_KV_CACHE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "common/model_config.h"

namespace moe {

struct KvCacheOptions {
  int64_t block_size = 16;  // token slots per block
  // Capacity in blocks. 0: room for `auto_sequences` full contexts (max_position_embeddings
  // tokens each; the coordinator passes --max-running, so every running sequence can reach its
  // full length), but no more than `auto_max_bytes` of keys and values, and never less than one
  // full context. Beyond it the scheduler preempts (never fails) running sequences.
  int64_t num_blocks = 0;
  int64_t auto_sequences = 8;
  int64_t auto_max_bytes = int64_t{4} << 30;
};

// The blocks of one sequence, in position order: position p lives in block
// blocks[p / block_size], slot p % block_size.
struct BlockTable {
  std::vector<int32_t> blocks;
};

// Not thread-safe: owned and driven by the engine's step loop.
class KvCache {
 public:
  KvCache(const ModelConfig& config, const KvCacheOptions& options);

  // Ensures `table` has room for `tokens` positions. RESOURCE_EXHAUSTED (table unchanged) when
  // the free blocks do not suffice.
  absl::Status Reserve(BlockTable* table, int64_t tokens);
  // Returns every block of `table` to the free list and clears it.
  void Release(BlockTable* table);

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t used_blocks() const { return num_blocks_ - free_blocks(); }

  // Row of kv_dim floats for (layer, position) of a sequence.
  float* Key(int64_t layer, const BlockTable& table, int64_t position) {
    return &keys_[Offset(layer, table, position)];
  }
  float* Value(int64_t layer, const BlockTable& table, int64_t position) {
    return &values_[Offset(layer, table, position)];
  }
  const float* Key(int64_t layer, const BlockTable& table, int64_t position) const {
    return &keys_[Offset(layer, table, position)];
  }
  const float* Value(int64_t layer, const BlockTable& table, int64_t position) const {
    return &values_[Offset(layer, table, position)];
  }

 private:
  int64_t Offset(int64_t layer, const BlockTable& table, int64_t position) const {
    const int64_t block = table.blocks[position / block_size_];
    return ((layer * num_blocks_ + block) * block_size_ + position % block_size_) * kv_dim_;
  }

  // Constant after construction.
  int64_t layers_;
  int64_t kv_dim_;
  int64_t block_size_;
  int64_t num_blocks_;
  // [layers][num_blocks][block_size][kv_dim]
  std::vector<float> keys_;
  std::vector<float> values_;
  std::vector<int32_t> free_;  // free block ids, used as a stack
};

}  // namespace moe

#endif  // MOE_COORDINATOR_KV_CACHE_H_
