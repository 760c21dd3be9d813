#include "common/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moe {
namespace {

// Each dequantizer writes one block of `DTypeBlockElements` values. Products and sums are
// separate statements: the reference rounds each to f32, and a fused multiply-add would not.

void Q8_0Block(const uint8_t* b, float* out) {
  const float d = LoadF16(b);
  const auto* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(q[i]) * d;
}

void Q4_0Block(const uint8_t* b, float* out) {
  const float d = LoadF16(b);
  const uint8_t* qs = b + 2;
  for (int i = 0; i < 16; ++i) {
    out[i] = d * static_cast<float>((qs[i] & 0x0f) - 8);
    out[i + 16] = d * static_cast<float>((qs[i] >> 4) - 8);
  }
}

void Q4_1Block(const uint8_t* b, float* out) {
  const float d = LoadF16(b);
  const float m = LoadF16(b + 2);
  const uint8_t* qs = b + 4;
  for (int i = 0; i < 16; ++i) {
    const float lo = d * static_cast<float>(qs[i] & 0x0f);
    const float hi = d * static_cast<float>(qs[i] >> 4);
    out[i] = lo + m;
    out[i + 16] = hi + m;
  }
}

// The 5-bit values of a Q5 block: low nibbles from qs, the fifth bit j of qh for value j.
void Q5Values(const uint8_t* qh_bytes, const uint8_t* qs, int q[32]) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  for (int i = 0; i < 16; ++i) {
    q[i] = (qs[i] & 0x0f) | static_cast<int>(((qh >> i) & 1u) << 4);
    q[i + 16] = (qs[i] >> 4) | static_cast<int>(((qh >> (i + 16)) & 1u) << 4);
  }
}

void Q5_0Block(const uint8_t* b, float* out) {
  const float d = LoadF16(b);
  int q[32];
  Q5Values(b + 2, b + 6, q);
  for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(q[i] - 16);
}

void Q5_1Block(const uint8_t* b, float* out) {
  const float d = LoadF16(b);
  const float m = LoadF16(b + 2);
  int q[32];
  Q5Values(b + 4, b + 8, q);
  for (int i = 0; i < 32; ++i) {
    const float t = d * static_cast<float>(q[i]);
    out[i] = t + m;
  }
}

// Q4_K and Q5_K (sub-blocks: K4SubBlockOf); Q5_K adds bit j of qh[l] as the fifth bit of value
// l of sub-block j.
void QKBlock(const uint8_t* b, const uint8_t* qh, const uint8_t* qs, float* out) {
  const float d = LoadF16(b);
  const float dmin = LoadF16(b + 2);
  for (int j = 0; j < 8; ++j) {
    const K4SubBlock sub = K4SubBlockOf(b, d, dmin, j);
    for (int l = 0; l < 32; ++l) {
      int v = (qs[sub.offset + l] >> sub.shift) & 0x0f;
      if (qh != nullptr) v |= ((qh[l] >> j) & 1) << 4;
      const float t = sub.scale * static_cast<float>(v);
      out[32 * j + l] = t - sub.min;
    }
  }
}

void Q4_KBlock(const uint8_t* b, float* out) { QKBlock(b, nullptr, b + 16, out); }
void Q5_KBlock(const uint8_t* b, float* out) { QKBlock(b, b + 16, b + 48, out); }

// Q6_K: the layout is in Q6_KParts.
void Q6_KBlock(const uint8_t* b, float* out) {
  const Q6_KParts p(b);
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < 32; ++l) {
        const int e = 128 * h + 32 * k + l;
        const uint8_t low = p.ql[64 * h + 32 * (k % 2) + l];
        const int lo4 = k < 2 ? (low & 0x0f) : (low >> 4);
        const int hi2 = (p.qh[32 * h + l] >> (2 * k)) & 3;
        const float scale = p.d * static_cast<float>(p.scales[e / 16]);
        out[e] = scale * static_cast<float>((lo4 | (hi2 << 4)) - 32);
      }
    }
  }
}

void PutHalf(float f, uint8_t* p) {
  const uint16_t h = F32ToF16(f);
  std::memcpy(p, &h, 2);
}

// ggml's quantize_row_q8_0_ref: the f32 scale quantizes, its half rounding is stored.
void QuantizeQ8_0Block(const float* x, uint8_t* b) {
  float amax = 0;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  PutHalf(d, b);
  for (int i = 0; i < 32; ++i)
    b[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[i] * id)));
}

// `v` in 0..max as the nearest integer, v >= 0.
int RoundClamp(float v, int lo, int hi) {
  return std::clamp(static_cast<int>(std::lround(v)), lo, hi);
}

// The smallest half float >= v (v >= 0, finite): a stored scale that never undershoots.
float HalfAtLeast(float v) {
  uint16_t h = F32ToF16(v);
  if (F16ToF32(h) < v) ++h;  // the next larger half (positive halves order like integers)
  return F16ToF32(h);
}

// The smallest integer n in [0, hi] with n * unit >= v (v >= 0, unit > 0), hi if none.
int CeilSteps(float v, float unit, int hi) {
  int n = std::clamp(static_cast<int>(std::ceil(v / unit)), 0, hi);
  while (n > 0 && static_cast<float>(n - 1) * unit >= v) --n;
  return n;
}

// The weighted least-squares (scale, min) for x ~ scale * q - min over one sub-block, q in
// [0, nmax], min >= 0, error sum_i w_i (scale q_i - min - x_i)^2. Candidates: the range
// [lo, hi] (lo <= 0) split into nmax + t steps for t = -1, -0.9, ..., +1 (more or fewer levels
// across the range moves where the rounding boundaries fall); each candidate's rounded q is
// refitted in closed form, and the best fit is kept. (The search ggml's K-quant reference makes.)
void FitScaleMin(const float* x, const float* w, int n, int nmax, float* scale, float* min) {
  float lo = 0, hi = x[0], sw = 0, swx = 0;
  for (int i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sw += w[i];
    swx += w[i] * x[i];
  }
  *scale = 0;
  *min = -lo;
  if (!(hi > lo)) return;
  // Plain loops over at most 32 floats (the compiler vectorizes them): this runs 22 times per
  // sub-block on every matrix a checkpoint quantizes while it loads.
  float q[32];
  const auto round_all = [&](float steps_per_unit) {
    for (int i = 0; i < n; ++i) {  // x - lo >= 0: truncating v + 0.5 rounds to nearest
      const auto v = static_cast<int>(steps_per_unit * (x[i] - lo) + 0.5f);
      q[i] = static_cast<float>(std::min(v, nmax));
    }
  };
  const auto error = [&](float a, float m) {
    float e = 0;
    for (int i = 0; i < n; ++i) {
      const float r = a * q[i] - m - x[i];
      e += w[i] * r * r;
    }
    return e;
  };
  round_all(static_cast<float>(nmax) / (hi - lo));
  float best_a = (hi - lo) / static_cast<float>(nmax), best_m = -lo;
  float best = error(best_a, best_m);
  for (int t = 0; t <= 20; ++t) {
    round_all((static_cast<float>(nmax) - 1.0f + 0.1f * static_cast<float>(t)) / (hi - lo));
    float swq = 0, swqq = 0, swqx = 0;
    for (int i = 0; i < n; ++i) {
      swq += w[i] * q[i];
      swqq += w[i] * q[i] * q[i];
      swqx += w[i] * q[i] * x[i];
    }
    const float det = sw * swqq - swq * swq;
    if (!(det > 0)) continue;
    float a = (sw * swqx - swx * swq) / det;
    float m = (swq * swqx - swqq * swx) / det;  // x ~ a q - m
    if (m < 0) {                                // min must stay >= 0: fit the scale alone
      m = 0;
      a = swqx / swqq;
    }
    if (!(a > 0)) continue;
    const float e = error(a, m);
    if (e < best) {
      best = e;
      best_a = a;
      best_m = m;
    }
  }
  *scale = best_a;
  *min = best_m;
}

// Sub-block j of 32 values: x ~ (d*sc_j)*q - (dmin*mn_j), q in 0..15, with the least-squares
// (scale, min) of each sub-block quantized to 6 bits against the block's largest.
void QuantizeQ4_KBlock(const float* x, uint8_t* b) {
  float scale[8], min[8];
  float max_scale = 0, max_min = 0;
  // Weights: the block's RMS plus the value's magnitude (large values matter more).
  double sum_sq = 0;
  for (int i = 0; i < 256; ++i) sum_sq += double{x[i]} * x[i];
  const auto rms = static_cast<float>(std::sqrt(sum_sq / 256));
  float w[256];
  for (int i = 0; i < 256; ++i) w[i] = rms + std::fabs(x[i]);
  for (int j = 0; j < 8; ++j) {
    FitScaleMin(x + 32 * j, w + 32 * j, 32, 15, &scale[j], &min[j]);
    max_scale = std::max(max_scale, scale[j]);
    max_min = std::max(max_min, min[j]);
  }
  const float d = HalfAtLeast(max_scale / 63.0f);
  const float dmin = HalfAtLeast(max_min / 63.0f);
  uint8_t sc[8], mn[8];
  for (int j = 0; j < 8; ++j) {
    sc[j] = static_cast<uint8_t>(d > 0 ? RoundClamp(scale[j] / d, 0, 63) : 0);
    mn[j] = static_cast<uint8_t>(dmin > 0 ? RoundClamp(min[j] / dmin, 0, 63) : 0);
  }
  PutHalf(d, b);
  PutHalf(dmin, b + 2);
  uint8_t* s = b + 4;  // the inverse of ScaleMinK4
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4));
  }
  uint8_t* qs = b + 16;
  std::memset(qs, 0, 128);
  for (int j = 0; j < 8; ++j) {
    const float step = d * static_cast<float>(sc[j]);
    const float offset = dmin * static_cast<float>(mn[j]);
    for (int l = 0; l < 32; ++l) {
      const int q = step > 0 ? RoundClamp((x[32 * j + l] + offset) / step, 0, 15) : 0;
      qs[32 * (j / 2) + l] |= static_cast<uint8_t>(q << ((j % 2) * 4));
    }
  }
}

// Sub-block j of 16 values: x ~ (d*sc_j)*(q - 32), q - 32 in -32..31, the sub-block's largest
// magnitude at -32 (its scale's magnitude rounded up, so nothing needs more than 32 steps).
void QuantizeQ6_KBlock(const float* x, uint8_t* b) {
  float big[16];  // each sub-block's value of largest magnitude, with its sign
  float max_big = 0;
  for (int j = 0; j < 16; ++j) {
    big[j] = 0;
    for (int l = 0; l < 16; ++l) {
      if (std::fabs(x[16 * j + l]) > std::fabs(big[j])) big[j] = x[16 * j + l];
    }
    max_big = std::max(max_big, std::fabs(big[j]));
  }
  // |step_j| = |d| * |sc_j| >= |big_j| / 32 with |sc_j| <= 127; the sign of sc_j puts big_j at -32.
  const float d = HalfAtLeast(max_big / 32.0f / 127.0f);
  auto* scales = reinterpret_cast<int8_t*>(b + 192);
  for (int j = 0; j < 16; ++j) {
    const int magnitude = d > 0 ? CeilSteps(std::fabs(big[j]) / 32.0f, d, 127) : 0;
    scales[j] = static_cast<int8_t>(big[j] > 0 ? -magnitude : magnitude);
  }
  PutHalf(d, b + 208);
  uint8_t* ql = b;
  uint8_t* qh = b + 128;
  std::memset(ql, 0, 128);
  std::memset(qh, 0, 64);
  for (int e = 0; e < 256; ++e) {
    const float step = d * static_cast<float>(scales[e / 16]);
    const int q = step != 0 ? RoundClamp(x[e] / step, -32, 31) + 32 : 32;
    const int h = e / 128, k = (e % 128) / 32, l = e % 32;  // the layout Q6_KBlock reads
    ql[64 * h + 32 * (k % 2) + l] |= static_cast<uint8_t>((q & 0x0f) << (k < 2 ? 0 : 4));
    qh[32 * h + l] |= static_cast<uint8_t>((q >> 4) << (2 * k));
  }
}

}  // namespace

void QuantizeRow(const float* x, int64_t n, DType dtype, void* out) {
  auto* p = static_cast<uint8_t*>(out);
  void (*block)(const float*, uint8_t*) = dtype == DType::kQ8_0   ? QuantizeQ8_0Block
                                          : dtype == DType::kQ4_K ? QuantizeQ4_KBlock
                                                                  : QuantizeQ6_KBlock;
  const int64_t per_block = DTypeBlockElements(dtype);
  for (int64_t i = 0; i < n / per_block; ++i) {
    block(x + i * per_block, p + i * DTypeBlockBytes(dtype));
  }
}

void DequantizeRow(const void* src, DType dtype, int64_t n, float* out) {
  const auto* p = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = LoadF16(p + 2 * i);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, p + 2 * i, 2);
        out[i] = BF16ToF32(v);
      }
      return;
    default:
      break;
  }
  void (*block)(const uint8_t*, float*) = nullptr;
  switch (dtype) {
    case DType::kQ8_0:
      block = Q8_0Block;
      break;
    case DType::kQ4_0:
      block = Q4_0Block;
      break;
    case DType::kQ4_1:
      block = Q4_1Block;
      break;
    case DType::kQ5_0:
      block = Q5_0Block;
      break;
    case DType::kQ5_1:
      block = Q5_1Block;
      break;
    case DType::kQ4_K:
      block = Q4_KBlock;
      break;
    case DType::kQ5_K:
      block = Q5_KBlock;
      break;
    case DType::kQ6_K:
      block = Q6_KBlock;
      break;
    default:
      return;
  }
  const int64_t per_block = DTypeBlockElements(dtype);
  const int64_t block_bytes = DTypeBlockBytes(dtype);
  for (int64_t i = 0; i < n / per_block; ++i) block(p + i * block_bytes, out + i * per_block);
}

}  // namespace moe
