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

}  // namespace moe

#endif  // MOE_COMMON_QUANT_H_
