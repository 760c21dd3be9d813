#include "coordinator/kv_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moe {

KvCache::KvCache(const ModelConfig& config, const KvCacheOptions& options)
    : layers_(config.num_hidden_layers),
      kv_dim_(config.kv_dim()),
      block_size_(options.block_size > 0 ? options.block_size : 16) {
  if (options.num_blocks > 0) {
    num_blocks_ = options.num_blocks;
  } else {
    const int64_t per_context = (config.max_position_embeddings + block_size_ - 1) / block_size_;
    const int64_t block_bytes = 2 * layers_ * block_size_ * kv_dim_ * int64_t{sizeof(float)};
    const int64_t by_memory = std::max<int64_t>(options.auto_max_bytes / block_bytes, per_context);
    num_blocks_ = std::min(std::max<int64_t>(options.auto_sequences, 1) * per_context, by_memory);
  }
  const size_t elements = static_cast<size_t>(layers_ * num_blocks_ * block_size_ * kv_dim_);
  keys_.resize(elements);
  values_.resize(elements);
  free_.reserve(num_blocks_);
  for (int64_t b = num_blocks_ - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

absl::Status KvCache::Reserve(BlockTable* table, int64_t tokens) {
  const int64_t needed = (tokens + block_size_ - 1) / block_size_;
  const int64_t have = static_cast<int64_t>(table->blocks.size());
  if (needed <= have) return absl::OkStatus();
  if (needed - have > free_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache full: ", tokens, " positions need ", needed - have,
                     " more blocks but only ", free_blocks(), " of ", num_blocks_, " are free"));
  }
  for (int64_t i = have; i < needed; ++i) {
    table->blocks.push_back(free_.back());
    free_.pop_back();
  }
  return absl::OkStatus();
}

void KvCache::Release(BlockTable* table) {
  for (auto it = table->blocks.rbegin(); it != table->blocks.rend(); ++it) free_.push_back(*it);
  table->blocks.clear();
}

}  // namespace moe
