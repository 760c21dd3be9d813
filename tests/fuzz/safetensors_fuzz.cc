// Fuzz target for everything that parses untrusted checkpoint bytes: the safetensors image
// (length prefix, header JSON, offsets) and config.json.
//
// With clang and -DMOE_FUZZ=ON this links libFuzzer:
//   build-fuzz/tests/safetensors_fuzz tests/fuzz/corpus/safetensors -max_total_time=60
// Otherwise tests/fuzz/fuzz_main.cc replays the committed corpus (a CTest regression test).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/model_config.h"
#include "common/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto tensors = moe::ParseSafetensorsImage(data, size, "fuzz.safetensors");
  if (tensors.ok()) {
    // Every accepted tensor lies inside the image: a reader may touch its bytes.
    for (const moe::TensorInfo& t : *tensors) {
      if (t.file_offset + t.byte_size > size) __builtin_trap();
      if (t.byte_size > 0) {
        volatile uint8_t sink = data[t.file_offset + t.byte_size - 1];
        (void)sink;
      }
    }
  }
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  moe::ParseModelConfig(text, "fuzz/config.json").status().IgnoreError();
  return 0;
}
