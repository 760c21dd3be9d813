// Element types of weights on disk and on the wire, and scalar conversions to float.
#ifndef MOE_COMMON_DTYPE_H_
#define MOE_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace moe {

enum class DType : uint8_t { kF32, kF16, kBF16 };

// Bytes per element.
constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// "F32", "F16", "BF16" (the safetensors spelling).
std::string_view DTypeName(DType t);

// Parses the safetensors spelling; any other type is INVALID_ARGUMENT naming it.
absl::StatusOr<DType> ParseDType(std::string_view name);

// IEEE binary16 -> float (exact, handles subnormals, inf, NaN).
float F16ToF32(uint16_t h);
// float -> IEEE binary16, round to nearest even.
uint16_t F32ToF16(float f);

inline float BF16ToF32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
// float -> bfloat16, round to nearest even (NaN stays NaN), as torch does.
inline uint16_t F32ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace moe

#endif  // MOE_COMMON_DTYPE_H_
