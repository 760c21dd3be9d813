// The fast MatMul paths (internal to kernels.cc): x86-64 intrinsics for instructions Highway
// 1.0.3 has no portable op for, compiled with per-function target attributes and chosen at run
// time from CPUID, so the binary still runs on any x86-64 (and the functions are absent
// elsewhere: Caps() then reports nothing).
//
//  - int8 (AVX-512 VNNI): activations quantized to int8 with an f32 scale per 8 values
//    (Q8Activations; llama.cpp uses one per 32 or 256), weights' integer quants multiplied with
//    VPDPBUSD, block scales applied in f32. For quantized weights (every type) at few tokens
//    (decode).
//  - bf16 (AVX512-BF16): activations rounded to bf16, products with VDPBF16PS. For BF16 weights,
//    and for quantized weights at many tokens (prefill), dequantized block by block into bf16.
//
// Both round the activations (and, for quantized weights on the bf16 path, the dequantized
// weights), so they are not bit-identical to the exact f32 path; the bounds are in
// kernels_test.cc.
#ifndef MOE_COMMON_KERNELS_X86_H_
#define MOE_COMMON_KERNELS_X86_H_

#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/kernels.h"

namespace moe::kernels::x86 {

struct Caps {
  bool int8 = false;  // AVX-512 F/BW/VL + VNNI, F16C
  bool bf16 = false;  // the above + AVX512-BF16
};

// What this CPU has, limited by LimitCaps.
Caps GetCaps();
// Tests: run as if the CPU lacked the paths that are false in `limit`.
void LimitCaps(Caps limit);

// Weight types with an int8 kernel.
inline bool HasInt8Kernel(DType dtype) { return IsQuantized(dtype); }

// Activations x [tokens, cols] (cols a multiple of 32) as int8 with an f32 scale per group of 8
// values: per token, q[c] = round(x[c] / d), d = max|x| / 127 over c's group; d4[c / 4] = d;
// qu[c] = q[c] + 128 (as unsigned, for signed weights); nsum4[c / 4] = -(q[c..c+3] summed);
// sum32[c / 32] = the 32-value block's sum of
// the rounded values d * q, group by group with std::fma (Q4_K's minimums are multiplied with it:
// with the exact sum of x instead, the error grows with the minimum rather than with the weight,
// measured 0.011 vs 0.0005 KL on a Q4_K_M file).
struct Q8Activations {
  int64_t tokens = 0;
  int64_t cols = 0;
  std::vector<int8_t> q;
  std::vector<float> d4;
  std::vector<uint8_t> qu;
  std::vector<int32_t> nsum4;
  std::vector<float> sum32;
};
void QuantizeActivations(const float* x, int64_t x_stride, int64_t tokens, int64_t cols,
                         Q8Activations* out);

// REQUIRES: GetCaps().int8, HasInt8Kernel(w.dtype), a.cols == w.cols.
// y[t, r] for all tokens of `a` and rows [row_begin, row_end).
void Int8MatMulRows(const WeightMatrix& w, const Q8Activations& a, float* y, int64_t y_stride,
                    int64_t row_begin, int64_t row_end);

// Activations as bf16 (round to nearest even): x[t * cols + c].
struct BF16Activations {
  int64_t tokens = 0;
  int64_t cols = 0;
  std::vector<uint16_t> x;
};
void ConvertActivations(const float* x, int64_t x_stride, int64_t tokens, int64_t cols,
                        BF16Activations* out);

// REQUIRES: GetCaps().bf16. w: rows [row_begin, row_end) of bf16 values, rows w_stride
// elements apart, a.cols columns; y[t, r] for every token of `a`.
void BF16MatMulRows(const uint16_t* w, int64_t w_stride, const BF16Activations& a, float* y,
                    int64_t y_stride, int64_t row_begin, int64_t row_end);

// REQUIRES: GetCaps().bf16; n a multiple of dtype's block. For a quantized dtype: out[i] = bf16
// of value i of the row as DequantizeRow gives it (bit for bit), and true; false (nothing
// written) for other types.
bool DequantizeRowToBF16(const void* row, DType dtype, int64_t n, uint16_t* out);

// out[i] = bf16(in[i]) for i < n (round to nearest even).
void F32ToBF16Row(const float* in, int64_t n, uint16_t* out);

}  // namespace moe::kernels::x86

#endif  // MOE_COMMON_KERNELS_X86_H_
