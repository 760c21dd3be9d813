// Fuzz target for GGUF files: the header, metadata and tensor infos (ParseGgufImage), the
// dequantization of every accepted tensor's first row, the model config from the metadata and
// the tokenizer rebuilt from its vocabulary (with a short text encoded and decoded).
//
// With clang and -DMOE_FUZZ=ON this links libFuzzer:
//   build-fuzz/tests/gguf_fuzz tests/fuzz/corpus/gguf -max_total_time=60
// Otherwise tests/fuzz/fuzz_main.cc replays the committed corpus (a CTest regression test).
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/gguf.h"
#include "common/gguf_model.h"
#include "common/quant.h"
#include "common/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto header = moe::ParseGgufImage(data, size, "fuzz.gguf");
  if (!header.ok()) return 0;
  std::vector<float> row;
  for (const moe::GgufTensorInfo& t : header->tensors) {
    // Every accepted tensor lies inside the image.
    if (t.file_offset + t.byte_size > size || t.byte_size < t.row_bytes()) __builtin_trap();
    const std::optional<moe::DType> dtype = moe::DTypeOfGgmlType(t.type_id);
    if (!dtype || t.row_elements() > (1 << 20)) continue;
    row.resize(static_cast<size_t>(t.row_elements()));
    moe::DequantizeRow(data + t.file_offset, *dtype, t.row_elements(), row.data());
  }
  auto file = moe::GgufFile::FromImage(data, size, "fuzz.gguf");
  if (!file.ok()) __builtin_trap();  // ParseGgufImage accepted it
  moe::ModelConfigFromGguf(**file).status().IgnoreError();
  auto tokenizer = moe::Tokenizer::FromGguf(**file);
  if (tokenizer.ok()) {
    const std::vector<int32_t> ids = (*tokenizer)->Encode("Hello \xff w\xc3\xb6rld </s>");
    (*tokenizer)->Decode(ids);
  }
  return 0;
}
