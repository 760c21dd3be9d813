// CPU kernels (see kernels.h). This file is compiled once per SIMD target: foreach_target.h
// re-includes it with HWY_TARGET set to each target Highway can build for (SSSE3, SSE4, AVX2,
// AVX-512, plus a portable fallback), and HWY_DYNAMIC_DISPATCH picks the best one the running
// CPU supports. No -march flag is needed and the binary runs on any x86-64.
#include "common/kernels.h"

#include <strings.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/kernels_x86.h"
#include "common/quant.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "common/kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// After foreach_target.h, so that they are re-included per target too.
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Every loop below runs full vectors of `df`, then the remaining n % Lanes(df) elements with
// one-lane vectors of `d1`: the same conversions and arithmetic, and no load or store past the
// end of a span (masked loads of 16-bit lanes are emulated by full loads on some targets).
using D1 = hn::CappedTag<float, 1>;

// Loads Lanes(df) weights starting at p, widened to f32.
template <class DF>
HWY_INLINE hn::Vec<DF> LoadWidened(DF df, const float* HWY_RESTRICT p) {
  return hn::LoadU(df, p);
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadWidened(DF df, const hwy::bfloat16_t* HWY_RESTRICT p) {
  const hn::Rebind<hwy::bfloat16_t, DF> dbf;
  return hn::PromoteTo(df, hn::LoadU(dbf, p));
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadWidened(DF df, const hwy::float16_t* HWY_RESTRICT p) {
#if HWY_TARGET >= HWY_SSE4 || defined(HWY_DISABLE_F16C)
  // No F16C: Highway 1.0.3's emulated PromoteTo turns inf/NaN into finite values. Exact
  // widening instead: the 15 magnitude bits shifted into an f32 and scaled by 2^(127-15)
  // give every finite half (subnormals included); exponent 31 becomes inf/NaN.
  const hn::RebindToUnsigned<DF> du;
  const hn::Rebind<uint16_t, DF> du16;
  const auto h = hn::PromoteTo(du, hn::LoadU(du16, reinterpret_cast<const uint16_t*>(p)));
  const auto magnitude = hn::ShiftLeft<13>(hn::And(h, hn::Set(du, 0x7fffu)));
  const auto finite = hn::Mul(hn::BitCast(df, magnitude), hn::Set(df, 0x1.0p112f));
  const auto exp_max = hn::Set(du, 0x7c00u);
  const auto inf_nan = hn::BitCast(df, hn::Or(magnitude, hn::Set(du, 0x7f800000u)));
  const auto is_inf_nan = hn::RebindMask(df, hn::Eq(hn::And(h, exp_max), exp_max));
  const auto sign = hn::BitCast(df, hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000u))));
  return hn::Or(hn::IfThenElse(is_inf_nan, inf_nan, finite), sign);
#else
  const hn::Rebind<hwy::float16_t, DF> dh;
  return hn::PromoteTo(df, hn::LoadU(dh, p));
#endif
}

// The operands of one MatMul, typed. w: [rows, cols] rows w_stride apart. x: [tokens, cols]
// rows x_stride apart. y: [tokens, rows] rows y_stride apart.
template <typename WT>
struct MatMulOperands {
  const WT* w;
  size_t w_stride;
  size_t cols;
  const float* x;
  size_t x_stride;
  float* y;
  size_t y_stride;
};

// One tile: y[t0 + t, r0 + r] = W[r0 + r, :] . x[t0 + t, :] for r < kRows, t < kTokens. Each
// weight vector is loaded and widened once and used for kTokens FMAs; each x vector is used for
// kRows FMAs. kRows * kTokens independent accumulators hide FMA latency.
template <size_t kRows, size_t kTokens, typename WT>
HWY_INLINE void MatMulTile(const MatMulOperands<WT>& op, size_t r0, size_t t0) {
  const WT* HWY_RESTRICT w = op.w + r0 * op.w_stride;
  const float* HWY_RESTRICT x = op.x + t0 * op.x_stride;
  const size_t cols = op.cols;
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  hn::Vec<decltype(df)> acc[kRows][kTokens];
  for (size_t r = 0; r < kRows; ++r) {
    for (size_t t = 0; t < kTokens; ++t) acc[r][t] = hn::Zero(df);
  }
  size_t c = 0;
  for (; c + lanes <= cols; c += lanes) {
    hn::Vec<decltype(df)> wv[kRows];
    for (size_t r = 0; r < kRows; ++r) wv[r] = LoadWidened(df, w + r * op.w_stride + c);
    for (size_t t = 0; t < kTokens; ++t) {
      const auto xv = hn::LoadU(df, x + t * op.x_stride + c);
      for (size_t r = 0; r < kRows; ++r) acc[r][t] = hn::MulAdd(wv[r], xv, acc[r][t]);
    }
  }
  const D1 d1;
  hn::Vec<D1> tail[kRows][kTokens];
  for (size_t r = 0; r < kRows; ++r) {
    for (size_t t = 0; t < kTokens; ++t) tail[r][t] = hn::Zero(d1);
  }
  for (; c < cols; ++c) {
    for (size_t r = 0; r < kRows; ++r) {
      const auto wv = LoadWidened(d1, w + r * op.w_stride + c);
      for (size_t t = 0; t < kTokens; ++t) {
        tail[r][t] = hn::MulAdd(wv, hn::LoadU(d1, x + t * op.x_stride + c), tail[r][t]);
      }
    }
  }
  float* HWY_RESTRICT y = op.y + t0 * op.y_stride + r0;
  for (size_t r = 0; r < kRows; ++r) {
    for (size_t t = 0; t < kTokens; ++t) {
      y[t * op.y_stride + r] = hn::GetLane(hn::SumOfLanes(df, acc[r][t])) + hn::GetLane(tail[r][t]);
    }
  }
}

// Tokens per tile: kTokenTile rows of x (32 KiB at 2048 columns) stay in L1 while a tile runs.
// Tiles of 8 tokens measured slower on AVX-512: x then spills to L2.
constexpr size_t kTokenTile = 4;

// Rows per tile: kRows * kTokens accumulators + kRows weights + 1 x vector must fit in the
// register file (16 vectors up to AVX2, 32 with AVX-512).
template <size_t kTokens>
constexpr size_t TileRows() {
#if HWY_TARGET <= HWY_AVX3
  return 4;
#else
  return kTokens <= 2 ? 4 : 2;
#endif
}

// Rows [row_begin, row_end) for tokens [t0, t0 + kTokens).
template <size_t kTokens, typename WT>
HWY_INLINE void MatMulTokenTile(const MatMulOperands<WT>& op, size_t t0, size_t row_begin,
                                size_t row_end) {
  constexpr size_t kRows = TileRows<kTokens>();
  size_t r = row_begin;
  for (; r + kRows <= row_end; r += kRows) MatMulTile<kRows, kTokens>(op, r, t0);
  for (; r < row_end; ++r) MatMulTile<1, kTokens>(op, r, t0);
}

// MatMulTokenTile<n> for a run-time n <= kTokens.
template <size_t kTokens, typename WT>
HWY_INLINE void MatMulTokenTileN(const MatMulOperands<WT>& op, size_t t0, size_t n,
                                 size_t row_begin, size_t row_end) {
  if constexpr (kTokens > 1) {
    if (n < kTokens) return MatMulTokenTileN<kTokens - 1>(op, t0, n, row_begin, row_end);
  }
  MatMulTokenTile<kTokens>(op, t0, row_begin, row_end);
}

// Rows [row_begin, row_end) for all tokens, kTokenTile tokens at a time. The caller keeps the
// row range small enough to stay in cache, so weights come from memory once per call.
template <typename WT>
HWY_INLINE void MatMulRowsT(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t tokens,
                            float* y, int64_t y_stride, int64_t row_begin, int64_t row_end) {
  const MatMulOperands<WT> op = {.w = static_cast<const WT*>(w.data),
                                 .w_stride = static_cast<size_t>(w.row_stride),
                                 .cols = static_cast<size_t>(w.cols),
                                 .x = x,
                                 .x_stride = static_cast<size_t>(x_stride),
                                 .y = y,
                                 .y_stride = static_cast<size_t>(y_stride)};
  const size_t n = static_cast<size_t>(tokens);
  for (size_t t = 0; t < n; t += kTokenTile) {
    MatMulTokenTileN<kTokenTile>(op, t, std::min(kTokenTile, n - t), static_cast<size_t>(row_begin),
                                 static_cast<size_t>(row_end));
  }
}

void MatMulRows(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t tokens, float* y,
                int64_t y_stride, int64_t row_begin, int64_t row_end) {
  switch (w.dtype) {
    case DType::kF32:
      MatMulRowsT<float>(w, x, x_stride, tokens, y, y_stride, row_begin, row_end);
      break;
    case DType::kF16:
      MatMulRowsT<hwy::float16_t>(w, x, x_stride, tokens, y, y_stride, row_begin, row_end);
      break;
    case DType::kBF16:
      MatMulRowsT<hwy::bfloat16_t>(w, x, x_stride, tokens, y, y_stride, row_begin, row_end);
      break;
    default:  // quantized: MatMul dequantizes a row block and passes it as F32
      break;
  }
}

template <typename ST>
HWY_INLINE void ConvertT(const ST* HWY_RESTRICT src, size_t n, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const D1 d1;
  size_t i = 0;
  for (; i + hn::Lanes(df) <= n; i += hn::Lanes(df)) {
    hn::StoreU(LoadWidened(df, src + i), df, out + i);
  }
  for (; i < n; ++i) hn::StoreU(LoadWidened(d1, src + i), d1, out + i);
}

void Convert16ToF32(const void* src, DType dtype, int64_t n, float* out) {
  if (dtype == DType::kBF16) {
    ConvertT(static_cast<const hwy::bfloat16_t*>(src), static_cast<size_t>(n), out);
  } else {
    ConvertT(static_cast<const hwy::float16_t*>(src), static_cast<size_t>(n), out);
  }
}

// SIMD dequantization of the block types quantized models spend their time in (Q8_0, Q4_K,
// Q6_K; quant.h has the layouts). Same operations in the same order as DequantizeRow, each a
// separate rounding (Mul then Sub, never MulAdd), so the bits are DequantizeRow's. Other types
// use DequantizeRow. Full vectors only: 16 and 32 are multiples of every f32 lane count.
void DequantizeQ8_0Rows(const uint8_t* src, int64_t n, float* out) {
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di;
  const hn::Rebind<int8_t, decltype(df)> d8;
  const size_t lanes = hn::Lanes(df);
  for (int64_t b = 0; b < n / 32; ++b) {
    const uint8_t* block = src + b * 34;
    const auto d = hn::Set(df, LoadF16(block));
    const auto* q = reinterpret_cast<const int8_t*>(block + 2);
    for (size_t i = 0; i < 32; i += lanes) {
      const auto v = hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, q + i)));
      hn::StoreU(hn::Mul(v, d), df, out + b * 32 + i);
    }
  }
}

// Lanes(df) 4-bit values of a Q4_K/Q5_K sub-block from `q` (low nibbles when shift is 0, high
// when 4), as f32.
template <class DF>
HWY_INLINE hn::Vec<DF> Nibbles(DF df, const uint8_t* q, int shift) {
  const hn::RebindToUnsigned<DF> du;
  const hn::Rebind<uint8_t, DF> du8;
  auto v = hn::PromoteTo(du, hn::LoadU(du8, q));
  v = hn::And(shift ? hn::ShiftRight<4>(v) : v, hn::Set(du, 0x0f));
  return hn::ConvertTo(df, hn::BitCast(hn::RebindToSigned<DF>(), v));
}

// Lanes(df) values q - 32 of a Q6_K block at e = 128 h + 32 k + l (layout: Q6_KParts), as f32.
template <class DF>
HWY_INLINE hn::Vec<DF> Q6Values(DF df, const Q6_KParts& p, int h, int k, size_t l) {
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint8_t, DF> du8;
  auto lo = hn::PromoteTo(du, hn::LoadU(du8, p.ql + 64 * h + 32 * (k % 2) + l));
  lo = hn::And(k < 2 ? lo : hn::ShiftRight<4>(lo), hn::Set(du, 0x0f));
  auto hi = hn::PromoteTo(du, hn::LoadU(du8, p.qh + 32 * h + l));
  hi = hn::And(hn::ShiftRightSame(hi, 2 * k), hn::Set(du, 3));
  const auto q = hn::Sub(hn::BitCast(di, hn::Or(lo, hn::ShiftLeft<4>(hi))), hn::Set(di, 32));
  return hn::ConvertTo(df, q);
}

void DequantizeQ4_KRows(const uint8_t* src, int64_t n, float* out) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  for (int64_t b = 0; b < n / 256; ++b) {
    const uint8_t* block = src + b * 144;
    const float d = LoadF16(block), dmin = LoadF16(block + 2);
    const uint8_t* qs = block + 16;
    for (int j = 0; j < 8; ++j) {
      const K4SubBlock sub = K4SubBlockOf(block, d, dmin, j);
      const auto scale = hn::Set(df, sub.scale);
      const auto min = hn::Set(df, sub.min);
      for (size_t l = 0; l < 32; l += lanes) {
        const auto f = Nibbles(df, qs + sub.offset + l, sub.shift);
        hn::StoreU(hn::Sub(hn::Mul(scale, f), min), df, out + b * 256 + 32 * j + l);
      }
    }
  }
}

void DequantizeQ6_KRows(const uint8_t* src, int64_t n, float* out) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  for (int64_t b = 0; b < n / 256; ++b) {
    const Q6_KParts p(src + b * 210);
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 4; ++k) {
        for (size_t l = 0; l < 32; l += lanes) {
          const int e = 128 * h + 32 * k + static_cast<int>(l);
          // lanes <= 16: a vector never straddles two 16-value sub-blocks.
          const auto scale = hn::Set(df, p.d * static_cast<float>(p.scales[e / 16]));
          hn::StoreU(hn::Mul(scale, Q6Values(df, p, h, k, l)), df, out + b * 256 + e);
        }
      }
    }
  }
}

// Few tokens (decode): dequantize-and-dot in registers, no f32 scratch. FusedRows runs the
// rows; a block type's Dot adds one block's products to each token's accumulator: Q8_0 scales
// the block's sum of q*x once, Q4_K uses scale * sum(q x) - min * sum(x) per sub-block, Q6_K
// scales each vector (within one 16-value sub-block). Differs from dequantize-then-dot by
// summation order only.
struct Q8_0Dot {
  static constexpr size_t kElements = 32, kBytes = 34;
  template <size_t kTokens, class DF>
  HWY_INLINE void operator()(DF df, const uint8_t* block, const float* x, size_t x_stride,
                             hn::Vec<DF>* acc) const {
    const hn::RebindToSigned<DF> di;
    const hn::Rebind<int8_t, DF> d8;
    const auto* q = reinterpret_cast<const int8_t*>(block + 2);
    hn::Vec<DF> sum[kTokens];
    for (size_t t = 0; t < kTokens; ++t) sum[t] = hn::Zero(df);
    for (size_t i = 0; i < 32; i += hn::Lanes(df)) {
      const auto qv = hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, q + i)));
      for (size_t t = 0; t < kTokens; ++t) {
        sum[t] = hn::MulAdd(qv, hn::LoadU(df, x + t * x_stride + i), sum[t]);
      }
    }
    const auto d = hn::Set(df, LoadF16(block));
    for (size_t t = 0; t < kTokens; ++t) acc[t] = hn::MulAdd(sum[t], d, acc[t]);
  }
};

struct Q4_KDot {
  static constexpr size_t kElements = 256, kBytes = 144;
  template <size_t kTokens, class DF>
  HWY_INLINE void operator()(DF df, const uint8_t* block, const float* x, size_t x_stride,
                             hn::Vec<DF>* acc) const {
    const float d = LoadF16(block), dmin = LoadF16(block + 2);
    const uint8_t* qs = block + 16;
    for (int j = 0; j < 8; ++j) {
      const K4SubBlock sub = K4SubBlockOf(block, d, dmin, j);
      hn::Vec<DF> qx[kTokens], xs[kTokens];
      for (size_t t = 0; t < kTokens; ++t) qx[t] = xs[t] = hn::Zero(df);
      for (size_t l = 0; l < 32; l += hn::Lanes(df)) {
        const auto qf = Nibbles(df, qs + sub.offset + l, sub.shift);
        for (size_t t = 0; t < kTokens; ++t) {
          const auto xv = hn::LoadU(df, x + t * x_stride + 32 * j + l);
          qx[t] = hn::MulAdd(qf, xv, qx[t]);
          xs[t] = hn::Add(xs[t], xv);
        }
      }
      const auto scale = hn::Set(df, sub.scale);
      const auto min = hn::Set(df, sub.min);
      for (size_t t = 0; t < kTokens; ++t) {
        acc[t] = hn::NegMulAdd(xs[t], min, hn::MulAdd(qx[t], scale, acc[t]));
      }
    }
  }
};

struct Q6_KDot {
  static constexpr size_t kElements = 256, kBytes = 210;
  template <size_t kTokens, class DF>
  HWY_INLINE void operator()(DF df, const uint8_t* block, const float* x, size_t x_stride,
                             hn::Vec<DF>* acc) const {
    const Q6_KParts p(block);
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 4; ++k) {
        for (size_t l = 0; l < 32; l += hn::Lanes(df)) {
          const size_t e = 128 * h + 32 * k + l;
          const auto w = hn::Mul(hn::Set(df, p.d * static_cast<float>(p.scales[e / 16])),
                                 Q6Values(df, p, h, k, l));
          for (size_t t = 0; t < kTokens; ++t) {
            acc[t] = hn::MulAdd(w, hn::LoadU(df, x + t * x_stride + e), acc[t]);
          }
        }
      }
    }
  }
};

template <size_t kTokens, class BlockDot>
HWY_INLINE void FusedRows(const WeightMatrix& w, const float* x, size_t x_stride, float* y,
                          size_t y_stride, int64_t row_begin, int64_t row_end) {
  const hn::ScalableTag<float> df;
  const BlockDot dot;
  const size_t blocks = static_cast<size_t>(w.cols) / BlockDot::kElements;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* row = w.Row(r);
    hn::Vec<decltype(df)> acc[kTokens];
    for (size_t t = 0; t < kTokens; ++t) acc[t] = hn::Zero(df);
    for (size_t b = 0; b < blocks; ++b) {
      dot.template operator()<kTokens>(df, row + b * BlockDot::kBytes, x + b * BlockDot::kElements,
                                       x_stride, acc);
    }
    for (size_t t = 0; t < kTokens; ++t) {
      y[t * y_stride + r] = hn::GetLane(hn::SumOfLanes(df, acc[t]));
    }
  }
}

// Whether MatMulFusedRows handles this matrix at `tokens` tokens.
bool HasFusedPath(DType dtype, int64_t tokens) {
  return tokens >= 1 && tokens <= 4 &&
         (dtype == DType::kQ8_0 || dtype == DType::kQ4_K || dtype == DType::kQ6_K) &&
         hn::Lanes(hn::ScalableTag<float>()) <= 16;
}

template <size_t kTokens>
void FusedRowsT(const WeightMatrix& w, const float* x, int64_t x_stride, float* y, int64_t y_stride,
                int64_t row_begin, int64_t row_end) {
  const size_t xs = static_cast<size_t>(x_stride), ys = static_cast<size_t>(y_stride);
  switch (w.dtype) {
    case DType::kQ8_0:
      return FusedRows<kTokens, Q8_0Dot>(w, x, xs, y, ys, row_begin, row_end);
    case DType::kQ4_K:
      return FusedRows<kTokens, Q4_KDot>(w, x, xs, y, ys, row_begin, row_end);
    default:
      return FusedRows<kTokens, Q6_KDot>(w, x, xs, y, ys, row_begin, row_end);
  }
}

// REQUIRES: HasFusedPath(w.dtype, tokens).
void MatMulFusedRows(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t tokens,
                     float* y, int64_t y_stride, int64_t row_begin, int64_t row_end) {
  switch (tokens) {
    case 1:
      return FusedRowsT<1>(w, x, x_stride, y, y_stride, row_begin, row_end);
    case 2:
      return FusedRowsT<2>(w, x, x_stride, y, y_stride, row_begin, row_end);
    case 3:
      return FusedRowsT<3>(w, x, x_stride, y, y_stride, row_begin, row_end);
    default:
      return FusedRowsT<4>(w, x, x_stride, y, y_stride, row_begin, row_end);
  }
}

void DequantizeRowSimd(const void* src, DType dtype, int64_t n, float* out) {
  const auto* p = static_cast<const uint8_t*>(src);
  if (hn::Lanes(hn::ScalableTag<float>()) > 16) return DequantizeRow(src, dtype, n, out);
  switch (dtype) {
    case DType::kQ8_0:
      return DequantizeQ8_0Rows(p, n, out);
    case DType::kQ4_K:
      return DequantizeQ4_KRows(p, n, out);
    case DType::kQ6_K:
      return DequantizeQ6_KRows(p, n, out);
    default:
      return DequantizeRow(src, dtype, n, out);
  }
}

float DotImpl(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, int64_t n64) {
  const size_t n = static_cast<size_t>(n64);
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  auto sum0 = hn::Zero(df);
  auto sum1 = hn::Zero(df);
  size_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    sum0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), sum0);
    sum1 = hn::MulAdd(hn::LoadU(df, a + i + lanes), hn::LoadU(df, b + i + lanes), sum1);
  }
  for (; i + lanes <= n; i += lanes) {
    sum0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), sum0);
  }
  const D1 d1;
  auto tail = hn::Zero(d1);
  for (; i < n; ++i) tail = hn::MulAdd(hn::LoadU(d1, a + i), hn::LoadU(d1, b + i), tail);
  return hn::GetLane(hn::SumOfLanes(df, hn::Add(sum0, sum1))) + hn::GetLane(tail);
}

void AxpyImpl(float a, const float* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n64) {
  const size_t n = static_cast<size_t>(n64);
  const hn::ScalableTag<float> df;
  const D1 d1;
  const auto va = hn::Set(df, a);
  size_t i = 0;
  for (; i + hn::Lanes(df) <= n; i += hn::Lanes(df)) {
    hn::StoreU(hn::Add(hn::Mul(va, hn::LoadU(df, x + i)), hn::LoadU(df, y + i)), df, y + i);
  }
  for (; i < n; ++i) {
    hn::StoreU(hn::Add(hn::Mul(hn::Set(d1, a), hn::LoadU(d1, x + i)), hn::LoadU(d1, y + i)), d1,
               y + i);
  }
}

// out[i * out_stride + j] = scale * dot(q_i, k_j) with q_i = q + i * d, k_j = k + j * k_stride:
// four queries at a time against each key, so a key is loaded once per four dot products.
void DotRowsImpl(const float* HWY_RESTRICT q, int64_t nq, const float* HWY_RESTRICT k,
                 int64_t k_stride, int64_t nk, int64_t d64, float scale, float* HWY_RESTRICT out,
                 int64_t out_stride) {
  const hn::ScalableTag<float> df;
  const size_t d = static_cast<size_t>(d64);
  const size_t full = d / hn::Lanes(df) * hn::Lanes(df);
  for (int64_t j = 0; j < nk; ++j) {
    const float* kj = k + j * k_stride;
    int64_t i = 0;
    for (; i + 4 <= nq; i += 4) {
      const float* qi = q + i * d64;
      auto s0 = hn::Zero(df);
      auto s1 = hn::Zero(df);
      auto s2 = hn::Zero(df);
      auto s3 = hn::Zero(df);
      for (size_t c = 0; c < full; c += hn::Lanes(df)) {
        const auto kv = hn::LoadU(df, kj + c);
        s0 = hn::MulAdd(hn::LoadU(df, qi + c), kv, s0);
        s1 = hn::MulAdd(hn::LoadU(df, qi + d + c), kv, s1);
        s2 = hn::MulAdd(hn::LoadU(df, qi + 2 * d + c), kv, s2);
        s3 = hn::MulAdd(hn::LoadU(df, qi + 3 * d + c), kv, s3);
      }
      float r[4] = {hn::GetLane(hn::SumOfLanes(df, s0)), hn::GetLane(hn::SumOfLanes(df, s1)),
                    hn::GetLane(hn::SumOfLanes(df, s2)), hn::GetLane(hn::SumOfLanes(df, s3))};
      for (size_t c = full; c < d; ++c) {
        for (int x = 0; x < 4; ++x) r[x] = std::fma(qi[x * d + c], kj[c], r[x]);
      }
      for (int x = 0; x < 4; ++x) out[(i + x) * out_stride + j] = r[x] * scale;
    }
    for (; i < nq; ++i) out[i * out_stride + j] = DotImpl(q + i * d64, kj, d64) * scale;
  }
}

// out_i[c] += sum_j p[i * p_stride + j] * v_j[c] for i < nq, c < d, with out_i = out + i * d and
// v_j = v + j * v_stride; for each element the terms are added in order of j.
void AccumulateRowsImpl(const float* HWY_RESTRICT p, int64_t p_stride, int64_t nq,
                        const float* HWY_RESTRICT v, int64_t v_stride, int64_t nk, int64_t d64,
                        float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  const size_t d = static_cast<size_t>(d64);
  for (int64_t i = 0; i < nq; ++i) {
    const float* pi = p + i * p_stride;
    float* oi = out + i * d64;
    size_t c = 0;
    for (; c + 4 * lanes <= d; c += 4 * lanes) {
      auto a0 = hn::LoadU(df, oi + c);
      auto a1 = hn::LoadU(df, oi + c + lanes);
      auto a2 = hn::LoadU(df, oi + c + 2 * lanes);
      auto a3 = hn::LoadU(df, oi + c + 3 * lanes);
      for (int64_t j = 0; j < nk; ++j) {
        const float* vj = v + j * v_stride + c;
        const auto pj = hn::Set(df, pi[j]);
        a0 = hn::MulAdd(pj, hn::LoadU(df, vj), a0);
        a1 = hn::MulAdd(pj, hn::LoadU(df, vj + lanes), a1);
        a2 = hn::MulAdd(pj, hn::LoadU(df, vj + 2 * lanes), a2);
        a3 = hn::MulAdd(pj, hn::LoadU(df, vj + 3 * lanes), a3);
      }
      hn::StoreU(a0, df, oi + c);
      hn::StoreU(a1, df, oi + c + lanes);
      hn::StoreU(a2, df, oi + c + 2 * lanes);
      hn::StoreU(a3, df, oi + c + 3 * lanes);
    }
    for (; c < d; ++c) {
      float a = oi[c];
      for (int64_t j = 0; j < nk; ++j) a = std::fma(pi[j], v[j * v_stride + c], a);
      oi[c] = a;
    }
  }
}

// out = (x * scale) * weight, the order of LlamaRMSNorm's two multiplies. out may equal x.
void ScaleMulImpl(const float* x, float scale, const float* weight, size_t n, float* out) {
  const hn::ScalableTag<float> df;
  const D1 d1;
  size_t i = 0;
  for (; i + hn::Lanes(df) <= n; i += hn::Lanes(df)) {
    const auto v = hn::Mul(hn::LoadU(df, x + i), hn::Set(df, scale));
    hn::StoreU(hn::Mul(v, hn::LoadU(df, weight + i)), df, out + i);
  }
  for (; i < n; ++i) {
    const auto v = hn::Mul(hn::LoadU(d1, x + i), hn::Set(d1, scale));
    hn::StoreU(hn::Mul(v, hn::LoadU(d1, weight + i)), d1, out + i);
  }
}

void RmsNormImpl(const float* x, const float* weight, int64_t tokens, int64_t n64, float eps,
                 float* out) {
  const size_t n = static_cast<size_t>(n64);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = x + t * n64;
    const float sum_sq = DotImpl(xt, xt, n64);
    // transformers: hidden_states * torch.rsqrt(variance + eps), variance = mean(x^2) in f32.
    const float scale = 1.0f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
    ScaleMulImpl(xt, scale, weight, n, out + t * n64);
  }
}

void RopeSplitHalfImpl(float* HWY_RESTRICT x, int64_t heads, int64_t head_dim,
                       const float* HWY_RESTRICT cos, const float* HWY_RESTRICT sin) {
  const size_t half = static_cast<size_t>(head_dim / 2);
  const auto rotate = [&](auto d, float* lo, float* hi, size_t i) {
    const auto x0 = hn::LoadU(d, lo + i);
    const auto x1 = hn::LoadU(d, hi + i);
    const auto c = hn::LoadU(d, cos + i);
    const auto s = hn::LoadU(d, sin + i);
    hn::StoreU(hn::NegMulAdd(x1, s, hn::Mul(x0, c)), d, lo + i);
    hn::StoreU(hn::MulAdd(x0, s, hn::Mul(x1, c)), d, hi + i);
  };
  const hn::ScalableTag<float> df;
  const D1 d1;
  for (int64_t h = 0; h < heads; ++h) {
    float* lo = x + h * head_dim;
    float* hi = lo + half;
    size_t i = 0;
    for (; i + hn::Lanes(df) <= half; i += hn::Lanes(df)) rotate(df, lo, hi, i);
    for (; i < half; ++i) rotate(d1, lo, hi, i);
  }
}

void SiluMulImpl(float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, int64_t n64) {
  const size_t n = static_cast<size_t>(n64);
  // silu(g) * u = g / (1 + exp(-g)) * u. hn::Exp is only valid up to ~88 (f32 overflow), so
  // -g is clamped there: for g < -88 the result is below 1e-35 * |g * u| instead of 0.
  const auto silu_mul = [&](auto d, size_t i) {
    const auto g = hn::LoadU(d, gate + i);
    const auto e = hn::Exp(d, hn::Min(hn::Neg(g), hn::Set(d, 88.0f)));
    const auto denom = hn::Add(hn::Set(d, 1.0f), e);
    hn::StoreU(hn::Mul(hn::Div(g, denom), hn::LoadU(d, up + i)), d, gate + i);
  };
  const hn::ScalableTag<float> df;
  const D1 d1;
  size_t i = 0;
  for (; i + hn::Lanes(df) <= n; i += hn::Lanes(df)) silu_mul(df, i);
  for (; i < n; ++i) silu_mul(d1, i);
}

void SoftmaxImpl(float* HWY_RESTRICT x, int64_t n64) {
  const size_t n = static_cast<size_t>(n64);
  const hn::ScalableTag<float> df;
  const D1 d1;
  const size_t lanes = hn::Lanes(df);
  size_t i = 0;
  auto vmax = hn::Set(df, -INFINITY);
  for (; i + lanes <= n; i += lanes) vmax = hn::Max(vmax, hn::LoadU(df, x + i));
  float max = hn::GetLane(hn::MaxOfLanes(df, vmax));
  for (; i < n; ++i) max = std::max(max, x[i]);

  // exp(x - max) in place, summed. hn::Exp returns 0 for -inf (and anything below -104).
  auto vsum = hn::Zero(df);
  auto tail_sum = hn::Zero(d1);
  for (i = 0; i + lanes <= n; i += lanes) {
    const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, x + i), hn::Set(df, max)));
    hn::StoreU(e, df, x + i);
    vsum = hn::Add(vsum, e);
  }
  for (; i < n; ++i) {
    const auto e = hn::Exp(d1, hn::Sub(hn::LoadU(d1, x + i), hn::Set(d1, max)));
    hn::StoreU(e, d1, x + i);
    tail_sum = hn::Add(tail_sum, e);
  }
  const float inv_sum = 1.0f / (hn::GetLane(hn::SumOfLanes(df, vsum)) + hn::GetLane(tail_sum));
  for (i = 0; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::Mul(hn::LoadU(df, x + i), hn::Set(df, inv_sum)), df, x + i);
  }
  for (; i < n; ++i) x[i] *= inv_sum;
}

}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace moe::kernels {

HWY_EXPORT(MatMulRows);
HWY_EXPORT(Convert16ToF32);
HWY_EXPORT(DequantizeRowSimd);
HWY_EXPORT(HasFusedPath);
HWY_EXPORT(MatMulFusedRows);
HWY_EXPORT(DotImpl);
HWY_EXPORT(AxpyImpl);
HWY_EXPORT(DotRowsImpl);
HWY_EXPORT(AccumulateRowsImpl);
HWY_EXPORT(RmsNormImpl);
HWY_EXPORT(RopeSplitHalfImpl);
HWY_EXPORT(SiluMulImpl);
HWY_EXPORT(SoftmaxImpl);

namespace {

// Below this many multiply-adds (~50-100 us on one core) a MatMul runs on the calling thread:
// waking the OpenMP team costs microseconds (far more when a core is busy with something
// else), which small (test-sized) matrices don't repay.
constexpr int64_t kMinParallelMacs = int64_t{1} << 20;

// Rows per work item: about this many weight bytes, so that a block stays in L2 while every
// token tile streams over it (the weights are read from memory once), and there are many
// blocks to balance across threads.
constexpr int64_t kBlockBytes = int64_t{64} << 10;
constexpr int64_t kMinBlockRows = 4;  // rows per MatMulTile with few tokens

// Rows per work item for rows of row_bytes bytes (as they sit in the cache while the item
// runs): a multiple of kMinBlockRows, so that items split into whole 4-row tiles.
int64_t BlockRows(int64_t row_bytes) {
  return std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, row_bytes) / kMinBlockRows) *
         kMinBlockRows;
}

// fn(row_begin, row_end) for every item of block_rows rows of [0, rows), on the OpenMP team once
// there are `macs` multiply-adds or more.
template <typename Fn>
void ForEachRowBlock(int64_t rows, int64_t block_rows, int64_t macs, const Fn& fn) {
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const auto run_block = [&](int64_t b) {
    fn(b * block_rows, std::min(rows, (b + 1) * block_rows));
  };
  if (blocks == 1 || macs < kMinParallelMacs) {
    for (int64_t b = 0; b < blocks; ++b) run_block(b);
    return;
  }
  // Static, contiguous shares: each thread streams through the weights in order (round-robin
  // blocks measured far slower: 106 vs 145-173 tok/s decoding a Q4_K_M file).
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) run_block(b);
}

std::atomic<int> g_matmul_mode{-1};  // -1: not set yet, MOE_KERNELS decides

// Quantized weights, exact: the block's rows are dequantized once into an f32 scratch (per
// thread, reused across calls) and multiplied with every token as an F32 matrix, so each
// weight block is read and dequantized once per call however many tokens there are.
void MatMulQuantizedRows(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t tokens,
                         float* y, int64_t y_stride, int64_t row_begin, int64_t row_end) {
  if (HWY_DYNAMIC_DISPATCH(HasFusedPath)(w.dtype, tokens)) {
    HWY_DYNAMIC_DISPATCH(MatMulFusedRows)(w, x, x_stride, tokens, y, y_stride, row_begin, row_end);
    return;
  }
  thread_local std::vector<float> scratch;
  const int64_t n = row_end - row_begin;
  if (scratch.size() < static_cast<size_t>(n * w.cols)) scratch.resize(n * w.cols);
  const auto dequantize = HWY_DYNAMIC_DISPATCH(DequantizeRowSimd);
  for (int64_t r = 0; r < n; ++r) {
    dequantize(w.Row(row_begin + r), w.dtype, w.cols, &scratch[r * w.cols]);
  }
  const WeightMatrix block{scratch.data(), DType::kF32, n, w.cols, w.cols};
  HWY_DYNAMIC_DISPATCH(MatMulRows)(block, x, x_stride, tokens, y + row_begin, y_stride, 0, n);
}

// The fast paths (kernels_x86.h). Returns false where none applies.
bool FastMatMul(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t tokens, float* y,
                int64_t y_stride) {
  const x86::Caps caps = x86::GetCaps();
  const int64_t macs = w.rows * w.cols * tokens;
  if (caps.int8 && x86::HasInt8Kernel(w.dtype) && tokens <= kMaxInt8Tokens) {
    // A reference, not the thread_local's name: inside the lambda that would be each OpenMP
    // thread's own (empty) instance.
    thread_local x86::Q8Activations per_thread;
    x86::Q8Activations& acts = per_thread;
    x86::QuantizeActivations(x, x_stride, tokens, w.cols, &acts);
    ForEachRowBlock(
        w.rows, BlockRows(static_cast<int64_t>(DTypeBytes(w.dtype, w.cols))), macs,
        [&](int64_t r0, int64_t r1) { x86::Int8MatMulRows(w, acts, y, y_stride, r0, r1); });
    return true;
  }
  if (!caps.bf16 || (w.dtype != DType::kBF16 && !IsQuantized(w.dtype))) return false;
  thread_local x86::BF16Activations per_thread;
  x86::BF16Activations& acts = per_thread;
  x86::ConvertActivations(x, x_stride, tokens, w.cols, &acts);
  const int64_t block_rows = BlockRows(w.cols * 2);
  if (w.dtype == DType::kBF16) {
    ForEachRowBlock(w.rows, block_rows, macs, [&](int64_t r0, int64_t r1) {
      x86::BF16MatMulRows(static_cast<const uint16_t*>(w.data), w.row_stride, acts, y, y_stride, r0,
                          r1);
    });
    return true;
  }
  // Quantized: each block of rows dequantized (exactly) and rounded to bf16 once per call.
  ForEachRowBlock(w.rows, block_rows, macs, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> row;
    thread_local std::vector<uint16_t> scratch;
    const int64_t n = r1 - r0;
    row.resize(static_cast<size_t>(w.cols));
    if (scratch.size() < static_cast<size_t>(n * w.cols)) scratch.resize(n * w.cols);
    const auto dequantize = HWY_DYNAMIC_DISPATCH(DequantizeRowSimd);
    for (int64_t r = 0; r < n; ++r) {
      if (x86::DequantizeRowToBF16(w.Row(r0 + r), w.dtype, w.cols, &scratch[r * w.cols])) continue;
      dequantize(w.Row(r0 + r), w.dtype, w.cols, row.data());
      x86::F32ToBF16Row(row.data(), w.cols, &scratch[r * w.cols]);
    }
    x86::BF16MatMulRows(scratch.data(), w.cols, acts, y + r0, y_stride, 0, n);
  });
  return true;
}

}  // namespace

bool ParseMatMulMode(const char* text, MatMulMode* mode) {
  if (strcasecmp(text, "exact") == 0) {
    *mode = MatMulMode::kExact;
  } else if (strcasecmp(text, "fast") == 0) {
    *mode = MatMulMode::kFast;
  } else {
    return false;
  }
  return true;
}

void SetMatMulMode(MatMulMode mode) { g_matmul_mode = static_cast<int>(mode); }

MatMulMode GetMatMulMode() {
  int mode = g_matmul_mode.load(std::memory_order_relaxed);
  if (mode < 0) {
    MatMulMode from_env = MatMulMode::kFast;
    const char* env = std::getenv("MOE_KERNELS");
    if (env != nullptr && !ParseMatMulMode(env, &from_env)) from_env = MatMulMode::kFast;
    int expected = -1;
    g_matmul_mode.compare_exchange_strong(expected, static_cast<int>(from_env));
    mode = g_matmul_mode.load();
  }
  return static_cast<MatMulMode>(mode);
}

void MatMul(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t tokens, float* y,
            int64_t y_stride) {
  if (tokens <= 0 || w.rows <= 0) return;
  if (GetMatMulMode() == MatMulMode::kFast && FastMatMul(w, x, x_stride, tokens, y, y_stride)) {
    return;
  }
  // Bytes a row takes in the cache while its tile runs: f32 once dequantized.
  const int64_t row_bytes =
      IsQuantized(w.dtype) ? w.cols * 4 : static_cast<int64_t>(DTypeBytes(w.dtype, w.cols));
  const auto matmul_rows =
      IsQuantized(w.dtype) ? &MatMulQuantizedRows : HWY_DYNAMIC_DISPATCH(MatMulRows);
  ForEachRowBlock(
      w.rows, BlockRows(row_bytes), w.rows * w.cols * tokens,
      [&](int64_t r0, int64_t r1) { matmul_rows(w, x, x_stride, tokens, y, y_stride, r0, r1); });
}

void ConvertToF32(const void* src, DType dtype, int64_t n, float* out) {
  if (n <= 0) return;
  if (dtype == DType::kF32) {
    std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  if (IsQuantized(dtype)) {
    HWY_DYNAMIC_DISPATCH(DequantizeRowSimd)(src, dtype, n, out);
    return;
  }
  HWY_DYNAMIC_DISPATCH(Convert16ToF32)(src, dtype, n, out);
}

float Dot(const float* a, const float* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotImpl)(a, b, n);
}

void Axpy(float a, const float* x, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AxpyImpl)(a, x, y, n);
}

void DotRows(const float* q, int64_t nq, const float* k, int64_t k_stride, int64_t nk, int64_t d,
             float scale, float* out, int64_t out_stride) {
  HWY_DYNAMIC_DISPATCH(DotRowsImpl)(q, nq, k, k_stride, nk, d, scale, out, out_stride);
}

void AccumulateRows(const float* p, int64_t p_stride, int64_t nq, const float* v, int64_t v_stride,
                    int64_t nk, int64_t d, float* out) {
  HWY_DYNAMIC_DISPATCH(AccumulateRowsImpl)(p, p_stride, nq, v, v_stride, nk, d, out);
}

void RmsNorm(const float* x, const float* weight, int64_t tokens, int64_t n, float eps,
             float* out) {
  HWY_DYNAMIC_DISPATCH(RmsNormImpl)(x, weight, tokens, n, eps, out);
}

void RopeSplitHalf(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin) {
  HWY_DYNAMIC_DISPATCH(RopeSplitHalfImpl)(x, heads, head_dim, cos, sin);
}

void RopeInterleaved(float* x, int64_t heads, int64_t head_dim, const float* cos,
                     const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float x0 = v[2 * i];
      const float x1 = v[2 * i + 1];
      v[2 * i] = x0 * cos[i] - x1 * sin[i];
      v[2 * i + 1] = x1 * cos[i] + x0 * sin[i];
    }
  }
}

void SiluMul(float* gate, const float* up, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SiluMulImpl)(gate, up, n);
}

void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  HWY_DYNAMIC_DISPATCH(SoftmaxImpl)(x, n);
}

void TopK(const float* x, int64_t n, int64_t k, int32_t* indices, float* values) {
  // Insertion into the sorted prefix [0, count): x[i] goes after every kept value >= x[i], so
  // among equal values the earlier index stays first. O(n * k); the router has n = 8, k = 2.
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (count == k && !(v > values[k - 1])) continue;
    int64_t pos = std::min(count, k - 1);
    while (pos > 0 && v > values[pos - 1]) {
      values[pos] = values[pos - 1];
      indices[pos] = indices[pos - 1];
      --pos;
    }
    values[pos] = v;
    indices[pos] = static_cast<int32_t>(i);
    if (count < k) ++count;
  }
}

}  // namespace moe::kernels
#endif  // HWY_ONCE
