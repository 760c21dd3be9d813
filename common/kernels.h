// CPU compute kernels: Highway SIMD (runtime-dispatched to the best target the CPU has) and
// OpenMP across rows. Weights are read in their stored dtype (F32, F16, BF16) and widened to
// f32 in registers, or (ggml quantizations) dequantized block by block (common/quant.h);
// activations and accumulators are f32 — except in MatMul's fast mode (MatMulMode below;
// kernels_x86.h), which rounds the activations to int8 or bf16 for integer / bf16 dot products.
//
// Contract for every kernel: pointers are non-null unless the size is 0, input and output
// spans do not overlap unless stated, no alignment is required. Kernels never allocate on the
// hot path and never fail: shapes are validated once at model load.
#ifndef MOE_COMMON_KERNELS_H_
#define MOE_COMMON_KERNELS_H_

#include <cstdint>

#include "common/dtype.h"

namespace moe::kernels {

// A weight matrix in row-major order: `rows` rows of `cols` elements of `dtype`, rows
// `row_stride` elements apart (row_stride >= cols; usually == cols). For a quantized dtype,
// cols and row_stride are multiples of its block.
struct WeightMatrix {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;

  // The first byte of row r.
  const uint8_t* Row(int64_t r) const {
    return static_cast<const uint8_t*>(data) + r * DTypeBytes(dtype, row_stride);
  }
  // Bytes of the matrix's values (rows x cols; stride padding excluded).
  uint64_t bytes() const { return static_cast<uint64_t>(rows) * DTypeBytes(dtype, cols); }
};

// y[t, r] = sum_c W[r, c] * x[t, c] for t < tokens, r < W.rows.
// x: [tokens, W.cols] f32, rows x_stride apart. y: [tokens, W.rows] f32, rows y_stride apart.
// Every weight row is read once per call however many tokens there are (decode batches are
// memory-bound); parallel over output rows on OpenMP threads once rows * cols * tokens is large
// enough to repay waking them (small matrices run on the calling thread). y must not overlap x
// or the weights. Thread-safe: concurrent calls share no state (but each may start its own
// OpenMP team, so callers running many MatMuls in parallel should expect oversubscription).
// Accumulates in f32: |error| is about 1e-6 * sum_c |W[r, c] * x[t, c]|.
void MatMul(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t tokens, float* y,
            int64_t y_stride);

// How MatMul treats BF16 and quantized weights (F32 and F16 weights are always exact).
//  - kExact: f32 activations and accumulation, weights widened/dequantized exactly (the error
//    bound above): what the tests against transformers use.
//  - kFast: where the CPU has the instructions (AVX-512 VNNI, AVX512-BF16; kernels_x86.h),
//    activations are rounded as llama.cpp does: quantized weights at up to kMaxInt8Tokens
//    tokens take int8 activations (an f32 scale per 8 values) and int8 dot products; BF16
//    weights, and quantized weights at more tokens (dequantized to bf16 block by block), take
//    bf16 activations and bf16 dot products. Elsewhere it is kExact.
// The default is kFast, or what MOE_KERNELS=exact|fast in the environment says.
enum class MatMulMode { kExact, kFast };
void SetMatMulMode(MatMulMode mode);
MatMulMode GetMatMulMode();
// "exact" / "fast" (any case); false for anything else.
bool ParseMatMulMode(const char* text, MatMulMode* mode);
constexpr int64_t kMaxInt8Tokens = 8;

// Convenience: dense x [tokens, cols] -> y [tokens, rows].
inline void MatMul(const WeightMatrix& w, const float* x, int64_t tokens, float* y) {
  MatMul(w, x, w.cols, tokens, y, w.rows);
}

// out[i] = float(src[i]) for i < n (dequantized for a quantized dtype: then n is a multiple of
// its block).
void ConvertToF32(const void* src, DType dtype, int64_t n, float* out);

// Dot product of two f32 vectors.
float Dot(const float* a, const float* b, int64_t n);

// y[i] += a * x[i], the product rounded to f32 before the add (never fused, on every target):
// so that a sum of weighted expert outputs has the same bits whether its terms were added on
// one worker or as partial sums from two (dispatch.h).
void Axpy(float a, const float* x, float* y, int64_t n);

// Attention scores of nq queries (q: [nq, d], contiguous) against nk keys k_j = k + j * k_stride:
// out[i * out_stride + j] = scale * dot(q_i, k_j).
void DotRows(const float* q, int64_t nq, const float* k, int64_t k_stride, int64_t nk, int64_t d,
             float scale, float* out, int64_t out_stride);

// Attention's weighted sum of values, for nq rows: out[i * d + c] += sum_{j < nk}
// p[i * p_stride + j] * v[j * v_stride + c] (each element's terms added in order of j).
void AccumulateRows(const float* p, int64_t p_stride, int64_t nq, const float* v, int64_t v_stride,
                    int64_t nk, int64_t d, float* out);

// Per row t < tokens of x [tokens, n]: out = x * rsqrt(mean(x^2) + eps) * weight.
// Sum of squares in f32 as transformers' LlamaRMSNorm/MixtralRMSNorm. out may equal x.
void RmsNorm(const float* x, const float* weight, int64_t tokens, int64_t n, float eps, float* out);

// Rotary embedding, split-half layout (transformers' rotate_half): for each of `heads` heads of
// `head_dim` in x (heads contiguous), element i < head_dim/2 pairs with i + head_dim/2:
//   x[i]      = x[i] * cos[i] - x[i + h] * sin[i]
//   x[i + h]  = x[i + h] * cos[i] + x[i] * sin[i]
// cos/sin: [head_dim / 2] for this token's position. In place.
void RopeSplitHalf(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin);

// Rotary embedding, interleaved layout (llama.cpp's; GGUF q/k rows are permuted to match):
// element 2i pairs with 2i + 1 and rotates by the angle of frequency i:
//   x[2i]     = x[2i] * cos[i] - x[2i + 1] * sin[i]
//   x[2i + 1] = x[2i + 1] * cos[i] + x[2i] * sin[i]
// Same arguments as RopeSplitHalf.
void RopeInterleaved(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin);

// gate[i] = silu(gate[i]) * up[i], silu(v) = v / (1 + exp(-v)). In place on gate.
void SiluMul(float* gate, const float* up, int64_t n);

// In-place numerically stable softmax over x[0, n) (the max is subtracted first). -inf entries
// (masked positions) become exactly 0; if every entry is -inf the result is NaN, as in torch.
void Softmax(float* x, int64_t n);

// The k largest values of x[0, n), in descending order; ties go to the lower index (the order
// torch.topk gives on CPU for Mixtral's router). REQUIRES: 1 <= k <= n.
void TopK(const float* x, int64_t n, int64_t k, int32_t* indices, float* values);

}  // namespace moe::kernels

#endif  // MOE_COMMON_KERNELS_H_
