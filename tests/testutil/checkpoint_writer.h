// Test helpers that write safetensors files and small synthetic checkpoints, so tests can
// corrupt them in controlled ways.
#ifndef MOE_TESTS_TESTUTIL_CHECKPOINT_WRITER_H_
#define MOE_TESTS_TESTUTIL_CHECKPOINT_WRITER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace moe::testing {

struct FakeTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // filled with a deterministic pattern when empty
};

// Serializes tensors (data in the given order) into a safetensors image.
std::vector<uint8_t> SafetensorsImage(const std::vector<FakeTensor>& tensors);
// An image with this exact header JSON followed by `data_bytes` zero bytes.
std::vector<uint8_t> RawImage(const std::string& header_json, size_t data_bytes);
void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes);
void WriteText(const std::string& path, const std::string& text);

// A fresh empty directory under the test's temp dir.
std::string TempDir(const std::string& name);

// Tensors of a tiny Mixtral (classic layout) or dense Llama for the given shape.
struct TinyShape {
  int64_t vocab = 32, hidden = 8, ffn = 12, layers = 2, heads = 2, kv_heads = 1, experts = 4,
          top_k = 2;
  DType dtype = DType::kF32;
};
std::vector<FakeTensor> TinyModelTensors(const TinyShape& shape);
std::string TinyModelConfig(const TinyShape& shape);
// Writes config.json and model.safetensors (after `mutate` edits the tensor list) into `dir`.
void WriteTinyModel(const std::string& dir, const TinyShape& shape,
                    const std::function<void(std::vector<FakeTensor>*)>& mutate = nullptr);

}  // namespace moe::testing

#endif  // MOE_TESTS_TESTUTIL_CHECKPOINT_WRITER_H_
