#include "common/dtype.h"

#include <bit>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moe {

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kQ8_0:
      return "Q8_0";
    case DType::kQ4_0:
      return "Q4_0";
    case DType::kQ4_1:
      return "Q4_1";
    case DType::kQ5_0:
      return "Q5_0";
    case DType::kQ5_1:
      return "Q5_1";
    case DType::kQ4_K:
      return "Q4_K";
    case DType::kQ5_K:
      return "Q5_K";
    case DType::kQ6_K:
      return "Q6_K";
  }
  return "?";
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype \"", std::string(name), "\" (supported: F32, F16, BF16)"));
}

absl::StatusOr<std::optional<DType>> ParseQuantizeFlag(std::string_view value) {
  if (value.empty()) return std::optional<DType>();
  std::vector<std::string> choices;
  for (DType t : kQuantizeTargets) {
    if (absl::EqualsIgnoreCase(std::string(DTypeName(t)), std::string(value))) {
      return std::optional<DType>(t);
    }
    choices.push_back(absl::AsciiStrToLower(std::string(DTypeName(t))));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--quantize \"", std::string(value), "\" is not one of ", absl::StrJoin(choices, ", ")));
}

bool AbslParseFlag(absl::string_view text, QuantizeOption* out, std::string* error) {
  absl::StatusOr<std::optional<DType>> type = ParseQuantizeFlag(std::string(text));
  if (!type.ok()) {
    *error = std::string(type.status().message());
    return false;
  }
  out->type = *type;
  return true;
}

std::string AbslUnparseFlag(const QuantizeOption& option) {
  return option.type.has_value() ? absl::AsciiStrToLower(std::string(DTypeName(*option.type))) : "";
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // Subnormal: normalize.
      int e = -1;
      do {
        ++e;
        mantissa <<= 1;
      } while ((mantissa & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mantissa & 0x3ffu) << 13;
    }
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | mantissa << 13;
  } else {
    bits = sign | (exponent + 127 - 15) << 23 | mantissa << 13;
  }
  return std::bit_cast<float>(bits);
}

uint16_t F32ToF16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (abs >= 0x47800000u) {                      // >= 65536 rounds to inf
    // Values in [65520, 65536) round to inf as well; handled by the normal path below.
    return sign | 0x7c00u;
  }
  if (abs < 0x38800000u) {               // Below the smallest normal half: subnormal or zero.
    if (abs < 0x33000000u) return sign;  // < 2^-25 rounds to zero
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 + (113 - e) - ... : align to 2^-24 units
    uint32_t half = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t bits = abs - (112u << 23);  // rebias exponent 127 -> 15
  const uint32_t rem = bits & 0x1fffu;
  bits >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (bits & 1u))) ++bits;  // may carry into inf
  return sign | static_cast<uint16_t>(bits);
}

}  // namespace moe
