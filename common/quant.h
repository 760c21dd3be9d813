// ggml's block quantizations: dequantization (bit-exact with the `gguf` Python package's numpy
// reference and llama.cpp's dequantize_row_*) and quantization of f32 rows (quantize-on-load).
//
// Block layouts (ggml-common.h), `d`/`dmin`/`m` are IEEE half floats:
//   Q8_0  {d, int8 q[32]}                        x = q * d
//   Q4_0  {d, u8 qs[16]}                         x = (nibble - 8) * d; low nibbles are values
//                                                0..15, high nibbles 16..31
//   Q4_1  {d, m, u8 qs[16]}                      x = nibble * d + m
//   Q5_0  {d, u32 qh, u8 qs[16]}                 x = (nibble | bit << 4) - 16) * d
//   Q5_1  {d, m, u32 qh, u8 qs[16]}              x = (nibble | bit << 4) * d + m
//   Q4_K  {d, dmin, u8 scales[12], u8 qs[128]}   8 sub-blocks of 32 with 6-bit scale and min:
//                                                x = (d * sc) * q - (dmin * mn)
//   Q5_K  {d, dmin, scales[12], qh[32], qs[128]} as Q4_K with a fifth bit from qh
//   Q6_K  {ql[128], qh[64], int8 scales[16], d}  16 sub-blocks of 16: x = (d * sc) * (q - 32)
// The operations are done in the reference's order, each rounded to f32 (no fused multiply-add).
#ifndef MOE_COMMON_QUANT_H_
#define MOE_COMMON_QUANT_H_

#include <cstdint>

#include "common/dtype.h"

namespace moe {

// out[i] = value i of the `n` values at `src` for any dtype (element types are widened).
// REQUIRES: n is a multiple of DTypeBlockElements(dtype).
void DequantizeRow(const void* src, DType dtype, int64_t n, float* out);

// Sub-block j's (0..7) 6-bit scale and min of a Q4_K/Q5_K block's 12 packed bytes `s`
// (llama.cpp's get_scale_min_k4).
inline void ScaleMinK4(const uint8_t* s, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Sub-block j (0..7, 32 values) of a Q4_K/Q5_K block `b` whose d and dmin are given: its scale
// d * sc and min dmin * m, and where its 4-bit values are — the low (shift 0, j even) or high
// (shift 4) nibbles of the 32 bytes at qs + offset.
struct K4SubBlock {
  float scale;
  float min;
  int offset;
  int shift;
};
inline K4SubBlock K4SubBlockOf(const uint8_t* b, float d, float dmin, int j) {
  int sc = 0, mn = 0;
  ScaleMinK4(b + 4, j, &sc, &mn);
  return {d * static_cast<float>(sc), dmin * static_cast<float>(mn), 32 * (j / 2), (j % 2) * 4};
}

// The parts of a Q6_K block (210 bytes): value e = 128 h + 32 k + l (h < 2, k < 4, l < 32) has
// its low 4 bits in ql[64 h + 32 (k % 2) + l] (low nibble for k < 2, high for k >= 2), its high
// 2 bits in qh[32 h + l] >> 2k, and the int8 scale scales[e / 16] (times d).
struct Q6_KParts {
  explicit Q6_KParts(const uint8_t* b)
      : ql(b), qh(b + 128), scales(reinterpret_cast<const int8_t*>(b + 192)), d(LoadF16(b + 208)) {}
  const uint8_t* ql;
  const uint8_t* qh;
  const int8_t* scales;
  float d;
};

// Writes the `n` finite values of `x` as DTypeBytes(dtype, n) bytes of `dtype` at `out`.
//   Q8_0: ggml's reference (d = amax / 127, q = round(x / d)), bit-exact with the gguf package.
//   Q4_K: per 32-value sub-block the weighted least-squares (scale, min) for x ~ scale*q - min
//         (weights: the block's RMS + |x|; the best of 21 candidate roundings of the range, each
//         refitted), both as 6-bit multiples of half-float block scales; each value to the
//         nearest of 0..15.
//   Q6_K: per 16-value sub-block a step with 32 steps covering its largest magnitude (an int8
//         multiple of the block scale, rounded up); each value to the nearest of -32..31
//         (error <= half a step, one step for a value of the opposite sign as large).
// (ggml's reference also searches candidate Q6_K scales and refines the 6-bit Q4_K scales
// themselves.)
// REQUIRES: CanQuantizeTo(dtype), n a multiple of its block.
void QuantizeRow(const float* x, int64_t n, DType dtype, void* out);

}  // namespace moe

#endif  // MOE_COMMON_QUANT_H_
