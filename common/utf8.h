// UTF-8 validity as SentencePiece checks it, and SentencePiece's special symbols and byte
// pieces, shared by the tokenizers.
#ifndef MOE_COMMON_UTF8_H_
#define MOE_COMMON_UTF8_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace moe {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // "▁" U+2581, SentencePiece's space
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Length of the valid UTF-8 character at the start of `s` (1-4), 0 when `s` is a proper prefix
// of a valid character, -1 when no continuation can make it valid. "Valid" is SentencePiece's
// DecodeUTF8 (util.cc): shortest form, no surrogates, at most U+10FFFF.
inline int Utf8CharLength(std::string_view s) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) return 1;
  int length = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    length = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    length = 3;
    if (b0 == 0xE0) lo = 0xA0;  // overlong below U+0800
    if (b0 == 0xED) hi = 0x9F;  // surrogates U+D800..DFFF
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    length = 4;
    if (b0 == 0xF0) lo = 0x90;  // overlong below U+10000
    if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return -1;
  }
  const size_t present = std::min<size_t>(length, s.size());
  for (size_t i = 1; i < present; ++i) {
    const auto b = static_cast<uint8_t>(s[i]);
    if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xBF)) return -1;
  }
  return s.size() >= static_cast<size_t>(length) ? length : 0;
}

// The offset of the first byte of `s` that does not start a valid character (an incomplete
// character at the end included), or s.size() when all of `s` is valid UTF-8.
inline size_t FirstInvalidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const int n = Utf8CharLength(s.substr(i));
    if (n <= 0) return i;
    i += static_cast<size_t>(n);
  }
  return i;
}

// The byte of a byte-fallback piece "<0xNN>" (SentencePiece's ByteToPiece; either hex case is
// accepted), or -1.
inline int PieceByte(std::string_view piece) {
  if (piece.size() != 6 || !piece.starts_with("<0x") || piece.back() != '>') return -1;
  int value = 0;
  for (const char c : piece.substr(3, 2)) {
    const int digit = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                             : -1;
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}

}  // namespace moe

#endif  // MOE_COMMON_UTF8_H_
