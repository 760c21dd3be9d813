// Builds GGUF images in memory for tests, including malformed ones (explicit offsets, raw
// bytes), so every check of the GGUF reader can be hit on purpose.
#ifndef MOE_TESTS_TESTUTIL_GGUF_WRITER_H_
#define MOE_TESTS_TESTUTIL_GGUF_WRITER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moe::testing {

class GgufBuilder {
 public:
  GgufBuilder& Version(uint32_t version);
  // Writes general.alignment (UINT32) and lays tensors out at multiples of it.
  GgufBuilder& Alignment(uint32_t alignment);

  GgufBuilder& U32(const std::string& key, uint32_t v);
  GgufBuilder& I32(const std::string& key, int32_t v);
  GgufBuilder& U64(const std::string& key, uint64_t v);
  GgufBuilder& F32(const std::string& key, float v);
  GgufBuilder& Bool(const std::string& key, bool v);
  GgufBuilder& String(const std::string& key, const std::string& v);
  GgufBuilder& StringArray(const std::string& key, const std::vector<std::string>& v);
  GgufBuilder& F32Array(const std::string& key, const std::vector<float>& v);
  GgufBuilder& I32Array(const std::string& key, const std::vector<int32_t>& v);
  // A metadata entry of type `type` whose value bytes are given verbatim.
  GgufBuilder& RawValue(const std::string& key, uint32_t type, const std::vector<uint8_t>& bytes);

  // A tensor of ggml type `type_id` with ggml dims (dims[0] = row length). `data` is its bytes
  // (may be any length, for malformed files). `offset`: the data-relative offset to declare;
  // default: the next aligned position after the previous tensor. A declared offset past the
  // bytes written so far gets no data (for files whose tensors run past their end).
  GgufBuilder& Tensor(const std::string& name, const std::vector<uint64_t>& dims, uint32_t type_id,
                      const std::vector<uint8_t>& data,
                      std::optional<uint64_t> offset = std::nullopt);

  // Whether a metadata entry `key` was added.
  bool Has(const std::string& key) const;

  std::vector<uint8_t> Build() const;

 private:
  struct Kv {
    std::string key;
    uint32_t type;
    std::vector<uint8_t> value;
  };
  struct TensorEntry {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type_id;
    std::vector<uint8_t> data;
    std::optional<uint64_t> offset;
  };
  uint32_t version_ = 3;
  uint32_t alignment_ = 32;
  std::vector<Kv> kvs_;
  std::vector<TensorEntry> tensors_;
};

// Bytes of `n` values of ggml type `type_id` filled with a deterministic pattern whose half
// floats (scales) are finite, for dequantization tests on synthetic data.
std::vector<uint8_t> PatternTensorBytes(uint32_t type_id, int64_t n, uint32_t seed);

}  // namespace moe::testing

#endif  // MOE_TESTS_TESTUTIL_GGUF_WRITER_H_
