// Element types of weights on disk and on the wire, and scalar conversions to float.
// F32, F16 and BF16 are element types (safetensors and GGUF); the others are ggml's block
// quantizations (GGUF only): `DTypeBlockElements` values packed into `DTypeBlockBytes` bytes,
// dequantized by common/quant.h.
#ifndef MOE_COMMON_DTYPE_H_
#define MOE_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kQ8_0,
  kQ4_0,
  kQ4_1,
  kQ5_0,
  kQ5_1,
  kQ4_K,
  kQ5_K,
  kQ6_K,
};

constexpr bool IsQuantized(DType t) { return t >= DType::kQ8_0; }

// Values per block: 1 for element types, 32 or 256 for the quantizations.
constexpr int64_t DTypeBlockElements(DType t) {
  return !IsQuantized(t) ? 1 : (t >= DType::kQ4_K ? 256 : 32);
}

// Bytes per block (ggml-common.h's block_q8_0 etc.).
constexpr int64_t DTypeBlockBytes(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kQ8_0:
      return 34;
    case DType::kQ4_0:
      return 18;
    case DType::kQ4_1:
      return 20;
    case DType::kQ5_0:
      return 22;
    case DType::kQ5_1:
      return 24;
    case DType::kQ4_K:
      return 144;
    case DType::kQ5_K:
      return 176;
    case DType::kQ6_K:
      return 210;
  }
  return 0;
}

// Bytes of `n` consecutive values. REQUIRES: n is a multiple of DTypeBlockElements(t).
constexpr uint64_t DTypeBytes(DType t, int64_t n) {
  return static_cast<uint64_t>(n / DTypeBlockElements(t) * DTypeBlockBytes(t));
}

// Bytes per element of an element type. REQUIRES: !IsQuantized(t).
constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// "F32", "F16", "BF16" (the safetensors spelling), "Q8_0", "Q4_K", ... (ggml's).
std::string_view DTypeName(DType t);

// Parses the safetensors spelling; any other type is INVALID_ARGUMENT naming it.
absl::StatusOr<DType> ParseDType(std::string_view name);

// The types quantize-on-load writes (QuantizeRow in quant.h).
inline constexpr DType kQuantizeTargets[] = {DType::kQ8_0, DType::kQ4_K, DType::kQ6_K};
constexpr bool CanQuantizeTo(DType t) {
  for (DType target : kQuantizeTargets) {
    if (t == target) return true;
  }
  return false;
}

// A --quantize value: "" -> nullopt (keep the stored types), "q8_0" / "q4_k" / "q6_k" (any case)
// -> that type; anything else INVALID_ARGUMENT listing the choices.
absl::StatusOr<std::optional<DType>> ParseQuantizeFlag(std::string_view value);

// The type of every binary's --quantize flag: parsed (and refused with ParseQuantizeFlag's
// message) by the flags library, so mains only read `.type`.
struct QuantizeOption {
  std::optional<DType> type;
};
bool AbslParseFlag(absl::string_view text, QuantizeOption* out, std::string* error);
std::string AbslUnparseFlag(const QuantizeOption& option);

// IEEE binary16 -> float (exact, handles subnormals, inf, NaN).
float F16ToF32(uint16_t h);
// float -> IEEE binary16, round to nearest even.
uint16_t F32ToF16(float f);

// The little-endian half float stored at p (a block scale of a quantized type), as float.
inline float LoadF16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return F16ToF32(h);
}

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
