// Fast MatMul paths with x86-64 intrinsics (see kernels_x86.h). Every function that uses an
// instruction beyond x86-64's baseline carries a target attribute and is called only after
// GetCaps() found the instructions at run time.
#include "common/kernels_x86.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "common/quant.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_KERNELS_X86 1
// GCC 12 reports its own _mm512_undefined_* idiom (`__Y = __Y`) in the intrinsics headers as
// uninitialized once inlined; clang does not.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace moe::kernels::x86 {
namespace {

std::atomic<bool> g_limit_int8{true};
std::atomic<bool> g_limit_bf16{true};

}  // namespace

void LimitCaps(Caps limit) {
  g_limit_int8 = limit.int8;
  g_limit_bf16 = limit.bf16;
}

namespace {

// Values per activation scale. The kernels apply a scale per 4 values (d4), so any multiple
// of 4 costs the same there; smaller groups round less. Measured KL to transformers, decoding
// the K-quant fixtures (median per file; llama.cpp, with 32 or 256 values per scale: 0.0007 -
// 0.004): 32 values 0.0004 - 0.0017 (the Q8_0 file above llama.cpp's), 16: 0.0003 - 0.0014,
// 8: 0.0003 - 0.0009, 4: 0.0002 - 0.0005 (but flips of near-tied expert choices fall
// elsewhere; see gguf_golden_test.cc).
constexpr int kActivationGroup = 8;

void Resize(int64_t tokens, int64_t cols, Q8Activations* out) {
  out->tokens = tokens;
  out->cols = cols;
  const size_t n = static_cast<size_t>(tokens * cols);
  out->q.resize(n);
  out->qu.resize(n);
  out->nsum4.resize(n / 4);
  out->d4.resize(n / 4);
  out->sum32.resize(n / 32);
}

// The definition QuantizeActivationsImpl computes with AVX-512 where the CPU has it.
void QuantizeActivationsScalar(const float* x, int64_t x_stride, int64_t tokens, int64_t cols,
                               Q8Activations* out) {
  Resize(tokens, cols, out);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t b = 0; b < cols / 32; ++b) {
      const size_t e = static_cast<size_t>(t * cols + b * 32);
      float block_sum = 0;
      for (int g = 0; g < 32 / kActivationGroup; ++g) {
        const float* xg = x + t * x_stride + b * 32 + g * kActivationGroup;
        float amax = 0;
        for (int i = 0; i < kActivationGroup; ++i) amax = std::max(amax, std::fabs(xg[i]));
        const float d = amax / 127.0f;
        const float id = d > 0 ? 1.0f / d : 0.0f;
        int32_t group_sum = 0;
        for (int i = 0; i < kActivationGroup; ++i) {
          const float v = std::clamp(xg[i] * id, -127.0f, 127.0f);
          const auto q = static_cast<int8_t>(std::isnan(v) ? 0 : std::nearbyint(v));
          out->q[e + g * kActivationGroup + i] = q;
          out->qu[e + g * kActivationGroup + i] = static_cast<uint8_t>(q + 128);
          group_sum += q;
          if (i % 4 == 3) {
            const size_t four = (e + g * kActivationGroup + i) / 4;
            out->d4[four] = d;
            out->nsum4[four] =
                -(out->q[4 * four] + out->q[4 * four + 1] + out->q[4 * four + 2] + q);
          }
        }
        block_sum = std::fma(d, static_cast<float>(group_sum), block_sum);
      }
      out->sum32[e / 32] = block_sum;
    }
  }
}

void QuantizeActivationsImpl(const float* x, int64_t x_stride, int64_t tokens, int64_t cols,
                             Q8Activations* out);

}  // namespace

void QuantizeActivations(const float* x, int64_t x_stride, int64_t tokens, int64_t cols,
                         Q8Activations* out) {
  if (!GetCaps().int8) return QuantizeActivationsScalar(x, x_stride, tokens, cols, out);
  Resize(tokens, cols, out);
  QuantizeActivationsImpl(x, x_stride, tokens, cols, out);
}

void ConvertActivations(const float* x, int64_t x_stride, int64_t tokens, int64_t cols,
                        BF16Activations* out) {
  out->tokens = tokens;
  out->cols = cols;
  out->x.resize(static_cast<size_t>(tokens * cols));
  for (int64_t t = 0; t < tokens; ++t) F32ToBF16Row(x + t * x_stride, cols, &out->x[t * cols]);
}

#ifdef MOE_KERNELS_X86

#define MOE_TARGET_INT8 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define MOE_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,f16c,fma")))

namespace {

Caps DetectCaps() {
  __builtin_cpu_init();
  Caps c;
  c.int8 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
  // F16C: every AVX-512F CPU has it (and clang 14's __builtin_cpu_supports has no name for it).
  c.bf16 = c.int8 && __builtin_cpu_supports("avx512bf16");
  return c;
}

// One token's activations, as the kernels index them.
struct TokenActs {
  const int8_t* q;
  const uint8_t* qu;
  const int32_t* nsum4;
  const float* d4;
  const float* sum32;
};

MOE_TARGET_INT8 inline float HalfAt(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

MOE_TARGET_INT8 inline float HorizontalSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

MOE_TARGET_INT8 inline float HorizontalSum(__m512 v) {
  return HorizontalSum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

// acc += dot * (w_scale * d4) for the 64 values at e of each token, dot the exact integer
// dot products of the weights' quants wq with the token's int8 activations, per 4-value lane.
// Unsigned wq (0..63): VPDPBUSD(wq, q). Signed wq (kSigned): VPDPBUSD(q + 128, wq) less
// 128 * sum(wq) per lane — that depends on the weights only, so it is computed once for all
// tokens (the activations' offset copy qu is made when they are quantized).
// kOffset: unsigned wq stands for wq - 2^kShift (Q6_K: 32; Q4_0: 8; Q5_0: 16), taken back per
// token from the activations' sums (nsum4 << kShift) — cheaper than the signed form when there
// is one token.
enum class WeightForm { kUnsigned, kSigned, kOffset };
// 64 bytes at p, or with kHalf the first 32 (the rest zero; nothing past them is read).
template <bool kHalf>
MOE_TARGET_INT8 inline __m512i LoadBytes(const void* p) {
  return kHalf ? _mm512_maskz_loadu_epi8(0xffffffffull, p) : _mm512_loadu_si512(p);
}
// 16 4-byte values at p, or with kHalf the first 8.
template <bool kHalf>
MOE_TARGET_INT8 inline __m512i LoadLanes(const void* p) {
  return kHalf ? _mm512_maskz_loadu_epi32(0xff, p) : _mm512_loadu_si512(p);
}

// kHalf: only the lower 256 bits (32 values) are there (masked loads; the upper lanes add 0).
template <int T, WeightForm kForm, bool kHalf = false, int kShift = 5>
MOE_TARGET_INT8 inline void Accumulate(__m512 (&acc)[T], const TokenActs* a, int64_t e, __m512i wq,
                                       __m512 w_scale) {
  __m512i base = _mm512_setzero_si512();
  if constexpr (kForm == WeightForm::kSigned) {
    base = _mm512_sub_epi32(
        base, _mm512_dpbusd_epi32(base, _mm512_set1_epi8(static_cast<char>(0x80)), wq));
  }
  for (int t = 0; t < T; ++t) {
    if constexpr (kForm == WeightForm::kOffset) {
      base = _mm512_slli_epi32(LoadLanes<kHalf>(a[t].nsum4 + e / 4), kShift);
    }
    const __m512i dot = kForm == WeightForm::kSigned
                            ? _mm512_dpbusd_epi32(base, LoadBytes<kHalf>(a[t].qu + e), wq)
                            : _mm512_dpbusd_epi32(base, wq, LoadBytes<kHalf>(a[t].q + e));
    const __m512 d4 = _mm512_castsi512_ps(LoadLanes<kHalf>(a[t].d4 + e / 4));
    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w_scale, d4), acc[t]);
  }
}

// The 32-value block types. Q8_0: d (half), 32 signed quants, x = q * d. Q4_0, Q4_1, Q5_0,
// Q5_1: d (half), [m (half)], [qh (32 bits)], 16 bytes qs; value i is the low nibble of qs[i]
// for i < 16, the high nibble of qs[i - 16] above, the Q5 types with bit i of qh as the fifth
// bit. x = d * (q - 8) (Q4_0), d * (q - 16) (Q5_0), or d * q + m (Q4_1, Q5_1: m * the block's
// sum of the activations is added per token).
template <DType kType>
struct Block32 {
  static constexpr bool kQ8 = kType == DType::kQ8_0;
  static constexpr bool kFive = kType == DType::kQ5_0 || kType == DType::kQ5_1;
  static constexpr bool kMin = kType == DType::kQ4_1 || kType == DType::kQ5_1;
  static constexpr int kQhAt = kMin ? 4 : 2;
  static constexpr int kQsAt = kQhAt + (kFive ? 4 : 0);
  static constexpr int64_t kBytes = kQ8 ? 34 : kQsAt + 16;
  static constexpr int kShift = kFive ? 4 : 3;  // the offset 2^kShift of Q4_0 / Q5_0
};

// The 32 quants of a Block32 block in value order (signed for Q8_0, else unsigned).
template <DType kType>
MOE_TARGET_INT8 inline __m256i Block32Quants(const uint8_t* blk) {
  using L = Block32<kType>;
  if constexpr (L::kQ8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + L::kQsAt));
  const __m128i m4 = _mm_set1_epi8(0x0f);
  __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(raw, m4)),
                                      _mm_and_si128(_mm_srli_epi16(raw, 4), m4), 1);
  if constexpr (L::kFive) {
    uint32_t qh;
    std::memcpy(&qh, blk + L::kQhAt, 4);
    q = _mm256_or_si256(q, _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10)));
  }
  return q;
}

// Blocks b and b + 1 (kHalf: block b alone) of a Block32 row into acc; the minimums' terms
// into mins.
template <int T, DType kType, bool kHalf = false>
MOE_TARGET_INT8 inline void Block32Pair(const uint8_t* row, int64_t b, const TokenActs* a,
                                        __m512 (&acc)[T], float (&mins)[T]) {
  using L = Block32<kType>;
  const uint8_t* blk = row + b * L::kBytes;
  __m512i wq;
  if constexpr (kHalf || L::kQ8) {
    wq = _mm512_zextsi256_si512(Block32Quants<kType>(blk));
    if constexpr (!kHalf) wq = _mm512_inserti64x4(wq, Block32Quants<kType>(blk + L::kBytes), 1);
  } else {  // both blocks' nibbles at once: [lo0 lo1 hi0 hi1] -> [lo0 hi0 lo1 hi1] (128 bits each)
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i both = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + L::kQsAt))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + L::kBytes + L::kQsAt)), 1);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(both, m4)),
                                         _mm256_and_si256(_mm256_srli_epi16(both, 4), m4), 1);
    wq = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0));
    if constexpr (L::kFive) {
      uint32_t qh0, qh1;
      std::memcpy(&qh0, blk + L::kQhAt, 4);
      std::memcpy(&qh1, blk + L::kBytes + L::kQhAt, 4);
      const __mmask64 fifth = qh0 | (uint64_t{qh1} << 32);
      wq = _mm512_or_si512(wq, _mm512_maskz_mov_epi8(fifth, _mm512_set1_epi8(0x10)));
    }
  }
  uint16_t h0, h1 = 0;
  std::memcpy(&h0, blk, 2);
  if constexpr (!kHalf) std::memcpy(&h1, blk + L::kBytes, 2);
  const __m512 dw = _mm512_cvtph_ps(
      _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(static_cast<int16_t>(h0))),
                              _mm_set1_epi16(static_cast<int16_t>(h1)), 1));
  if constexpr (L::kQ8) {
    Accumulate<T, WeightForm::kSigned, kHalf>(acc, a, b * 32, wq, dw);
  } else if constexpr (L::kMin) {
    Accumulate<T, WeightForm::kUnsigned, kHalf>(acc, a, b * 32, wq, dw);
    const float m0 = HalfAt(blk + 2), m1 = kHalf ? 0.0f : HalfAt(blk + L::kBytes + 2);
    for (int t = 0; t < T; ++t) {
      mins[t] = std::fma(m0, a[t].sum32[b], mins[t]);
      if constexpr (!kHalf) mins[t] = std::fma(m1, a[t].sum32[b + 1], mins[t]);
    }
  } else if constexpr (T == 1) {
    Accumulate<T, WeightForm::kOffset, kHalf, L::kShift>(acc, a, b * 32, wq, dw);
  } else {
    const __m512i offset = _mm512_set1_epi8(1 << L::kShift);
    Accumulate<T, WeightForm::kSigned, kHalf>(acc, a, b * 32, _mm512_sub_epi8(wq, offset), dw);
  }
}

// Two blocks per 512-bit vector (an odd last block in the lower half: masked loads, the upper
// lanes add 0); two accumulator chains (blocks 4i, 4i+1 and 4i+2, 4i+3): one is bound by the
// FMA latency.
template <int T, DType kType>
MOE_TARGET_INT8 void Block32Rows(const WeightMatrix& w, const TokenActs* a, float* y, int64_t ys,
                                 int64_t r0, int64_t r1) {
  const int64_t nb = w.cols / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.Row(r);
    __m512 acc[T], acc2[T];
    float mins[T];
    for (int t = 0; t < T; ++t) {
      acc[t] = acc2[t] = _mm512_setzero_ps();
      mins[t] = 0.0f;
    }
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
      Block32Pair<T, kType>(row, b, a, acc, mins);
      Block32Pair<T, kType>(row, b + 2, a, acc2, mins);
    }
    if (b + 2 <= nb) {
      Block32Pair<T, kType>(row, b, a, acc, mins);
      b += 2;
    }
    if (b < nb) Block32Pair<T, kType, /*kHalf=*/true>(row, b, a, acc, mins);
    for (int t = 0; t < T; ++t) {
      y[t * ys + r] = HorizontalSum(_mm512_add_ps(acc[t], acc2[t])) + mins[t];
    }
  }
}

// Q4_K and Q5_K (kFiveBit): sub-blocks 2p (low nibbles) and 2p+1 (high nibbles) of 32 bytes of
// quants per vector, Q5_K with bit 2p / 2p+1 of its 32 qh bytes as the fifth bit;
// d * scale per sub-block in f32, and dmin * min * sum(x) per sub-block subtracted at the end.
template <int T, bool kFiveBit>
MOE_TARGET_INT8 void QK4Rows(const WeightMatrix& w, const TokenActs* a, float* y, int64_t ys,
                             int64_t r0, int64_t r1) {
  constexpr int64_t kBlockBytes = kFiveBit ? 176 : 144;
  const int64_t nb = w.cols / 256;
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const __m512i m1 = _mm512_set1_epi8(0x01);
  __m512i fifth_shift[4];  // 16-bit shift counts 2p (lower 256 bits) and 2p + 1 (upper)
  for (int p = 0; p < 4; ++p) {
    fifth_shift[p] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(2 * p)),
                                        _mm256_set1_epi16(2 * p + 1), 1);
  }
  const __m128i scale_shift = _mm_set_epi32(4, 0, 0, 0);
  const __m128i scale_mask = _mm_set_epi32(0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f);
  const __m128i scale_high = _mm_set_epi32(0x30303030, 0, 0x30303030, 0);
  const __m512i d_dmin_index = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512i pair_index[4];
  for (int p = 0; p < 4; ++p) {
    pair_index[p] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * p)),
                                       _mm256_set1_epi32(2 * p + 1), 1);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.Row(r);
    __m512 accs[2][T];
    __m256 min_acc[T];
    for (int t = 0; t < T; ++t) {
      accs[0][t] = accs[1][t] = _mm512_setzero_ps();
      min_acc[t] = _mm256_setzero_ps();
    }
    int64_t b = 0;
    do {  // nb >= 1 (see BF16Tile on do-while)
      const uint8_t* blk = row + b * kBlockBytes;
      // ScaleMinK4 for all eight sub-blocks at once: the 12 scale bytes as words w0, w1, w2
      // (the 16-byte load also takes 4 bytes of quants, unused); per byte, scales 0-3 =
      // w0 & 63, 4-7 = (w2 & 15) | (w0 >> 6) << 4, mins 0-3 = w1 & 63, 4-7 = (w2 >> 4) |
      // (w1 >> 6) << 4. Lanes of r: scales 0-3, 4-7, mins 0-3, 4-7.
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
      const __m128i w0212 = _mm_shuffle_epi32(v, 0x98), w0011 = _mm_shuffle_epi32(v, 0x50);
      const __m128i r = _mm_or_si128(_mm_and_si128(_mm_srlv_epi32(w0212, scale_shift), scale_mask),
                                     _mm_and_si128(_mm_srli_epi32(w0011, 2), scale_high));
      // d for lanes 0-7, dmin for 8-15.
      uint32_t d_dmin;
      std::memcpy(&d_dmin, blk, 4);
      const __m512 dd = _mm512_permutexvar_ps(
          d_dmin_index,
          _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(d_dmin)))));
      const __m512 scales16 = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(r)));
      const __m256 mins = _mm512_extractf32x8_ps(scales16, 1);
      const uint8_t* qs = blk + (kFiveBit ? 48 : 16);
      __m512i qh = _mm512_setzero_si512();
      if constexpr (kFiveBit) {
        qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
      }
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m512i raw = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * p)));
        __m512i wq = _mm512_and_si512(_mm512_mask_srli_epi16(raw, 0xffff0000u, raw, 4), m4);
        if constexpr (kFiveBit) {
          const __m512i fifth = _mm512_and_si512(_mm512_srlv_epi16(qh, fifth_shift[p]), m1);
          wq = _mm512_or_si512(wq, _mm512_slli_epi16(fifth, 4));
        }
        Accumulate<T, WeightForm::kUnsigned>(accs[p & 1], a, b * 256 + 64 * p, wq,
                                             _mm512_permutexvar_ps(pair_index[p], scales16));
      }
      for (int t = 0; t < T; ++t) {
        min_acc[t] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(a[t].sum32 + b * 8), min_acc[t]);
      }
    } while (++b < nb);
    for (int t = 0; t < T; ++t) {
      y[t * ys + r] =
          HorizontalSum(_mm512_add_ps(accs[0][t], accs[1][t])) - HorizontalSum(min_acc[t]);
    }
  }
}

// Q6_K: for h, m in {0, 1}, one vector holds the values 128h + 64m .. +63: 64 bytes of ql
// (shifted by 4m) and 32 bytes of qh in both halves (shifted by 4m and 4m + 2), as signed
// q - 32. Sixteen-value sub-blocks: four per vector.
template <int T>
MOE_TARGET_INT8 void Q6_KRows(const WeightMatrix& w, const TokenActs* a, float* y, int64_t ys,
                              int64_t r0, int64_t r1) {
  const int64_t nb = w.cols / 256;
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const __m512i m2 = _mm512_set1_epi8(0x03);
  const __m512i m32 = _mm512_set1_epi8(32);
  __m512i high_shift[2];
  for (int m = 0; m < 2; ++m) {
    high_shift[m] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(4 * m)),
                                       _mm256_set1_epi16(4 * m + 2), 1);
  }
  __m512i sub_index[4];
  for (int hm = 0; hm < 4; ++hm) {
    alignas(64) int32_t idx[16];
    for (int i = 0; i < 16; ++i) idx[i] = 4 * hm + i / 4;
    sub_index[hm] = _mm512_load_si512(idx);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.Row(r);
    __m512 accs[2][T];
    for (int t = 0; t < T; ++t) accs[0][t] = accs[1][t] = _mm512_setzero_ps();
    int64_t b = 0;
    do {  // nb >= 1
      const uint8_t* blk = row + b * 210;
      const uint8_t* ql = blk;
      const uint8_t* qh = blk + 128;
      const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(HalfAt(blk + 208)),
                                          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                              reinterpret_cast<const __m128i*>(blk + 192)))));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i high = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h)));
        const __m512i low = _mm512_loadu_si512(ql + 64 * h);
#pragma GCC unroll 2
        for (int m = 0; m < 2; ++m) {
          const __m512i lo = _mm512_and_si512(_mm512_srl_epi16(low, _mm_cvtsi32_si128(4 * m)), m4);
          const __m512i hi =
              _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(high, high_shift[m]), m2), 4);
          const __m512i q6 = _mm512_or_si512(lo, hi);
          const __m512 sp = _mm512_permutexvar_ps(sub_index[2 * h + m], scales);
          if constexpr (T == 1) {
            Accumulate<T, WeightForm::kOffset>(accs[m], a, b * 256 + 128 * h + 64 * m, q6, sp);
          } else {
            Accumulate<T, WeightForm::kSigned>(accs[m], a, b * 256 + 128 * h + 64 * m,
                                               _mm512_sub_epi8(q6, m32), sp);
          }
        }
      }
    } while (++b < nb);
    for (int t = 0; t < T; ++t) {
      y[t * ys + r] = HorizontalSum(_mm512_add_ps(accs[0][t], accs[1][t]));
    }
  }
}

template <int T>
void Int8RowsT(const WeightMatrix& w, const TokenActs* a, float* y, int64_t ys, int64_t r0,
               int64_t r1) {
  switch (w.dtype) {
    case DType::kQ8_0:
      return Block32Rows<T, DType::kQ8_0>(w, a, y, ys, r0, r1);
    case DType::kQ4_K:
      return QK4Rows<T, false>(w, a, y, ys, r0, r1);
    case DType::kQ5_K:
      return QK4Rows<T, true>(w, a, y, ys, r0, r1);
    case DType::kQ4_0:
      return Block32Rows<T, DType::kQ4_0>(w, a, y, ys, r0, r1);
    case DType::kQ4_1:
      return Block32Rows<T, DType::kQ4_1>(w, a, y, ys, r0, r1);
    case DType::kQ5_0:
      return Block32Rows<T, DType::kQ5_0>(w, a, y, ys, r0, r1);
    case DType::kQ5_1:
      return Block32Rows<T, DType::kQ5_1>(w, a, y, ys, r0, r1);
    default:
      return Q6_KRows<T>(w, a, y, ys, r0, r1);
  }
}

// y[t, r] for kRows rows from w and kTokens tokens from x (bf16, rows ws / xs apart). One loop
// with a mask for the partial last 32 columns: the accumulators stay in registers (a separate
// tail step taking them by reference made GCC store them to the stack every iteration).
template <int kRows, int kTokens>
MOE_TARGET_BF16 void BF16Tile(const uint16_t* w, size_t ws, const uint16_t* x, size_t xs,
                              size_t cols, float* y, size_t ys) {
  __m512 acc[kRows][kTokens];
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  // do-while (cols > 0): with a loop that may not run, GCC 12 kept a stack copy of every
  // accumulator and stored to it each iteration.
  size_t c = 0;
  do {
    const __mmask32 mask =
        c + 32 <= cols ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << (cols - c)) - 1);
    __m512bh wv[kRows];
    for (int r = 0; r < kRows; ++r) {
      wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * ws + c);
    }
    for (int t = 0; t < kTokens; ++t) {
      const auto xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * xs + c);
      for (int r = 0; r < kRows; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
    c += 32;
  } while (c < cols);
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) y[t * ys + r] = HorizontalSum(acc[r][t]);
  }
}

// One row and one or two tokens with kChains independent accumulators per token: a single
// chain is bound by VDPBF16PS's latency (64 bytes of weights per ~5 cycles, about what one core
// can stream from memory, so nothing is left for the memory stalls).
template <int kTokens>
MOE_TARGET_BF16 void BF16Row(const uint16_t* w, const uint16_t* x, size_t xs, size_t cols, float* y,
                             size_t ys) {
  constexpr int kChains = kTokens == 1 ? 4 : 2;
  constexpr size_t kStep = 32 * kChains;
  __m512 acc[kChains][kTokens];
  for (int k = 0; k < kChains; ++k) {
    for (int t = 0; t < kTokens; ++t) acc[k][t] = _mm512_setzero_ps();
  }
  size_t c = 0;
  if (cols >= kStep) {
    do {  // see BF16Tile on do-while
      for (int k = 0; k < kChains; ++k) {
        const auto wv = (__m512bh)_mm512_loadu_si512(w + c + 32 * k);
        for (int t = 0; t < kTokens; ++t) {
          const auto xv = (__m512bh)_mm512_loadu_si512(x + t * xs + c + 32 * k);
          acc[k][t] = _mm512_dpbf16_ps(acc[k][t], wv, xv);
        }
      }
      c += kStep;
    } while (c + kStep <= cols);
  }
  for (; c < cols; c += 32) {  // the last < kStep columns, 32 at a time, masked
    const __mmask32 mask =
        c + 32 <= cols ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << (cols - c)) - 1);
    const auto wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + c);
    for (int t = 0; t < kTokens; ++t) {
      const auto xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * xs + c);
      acc[0][t] = _mm512_dpbf16_ps(acc[0][t], wv, xv);
    }
  }
  for (int t = 0; t < kTokens; ++t) {
    __m512 sum = acc[0][t];
    for (int k = 1; k < kChains; ++k) sum = _mm512_add_ps(sum, acc[k][t]);
    y[t * ys] = HorizontalSum(sum);
  }
}

template <int kTokens>
void BF16TokenTile(const uint16_t* w, size_t ws, const uint16_t* x, size_t xs, size_t cols,
                   float* y, size_t ys, int64_t r0, int64_t r1) {
  int64_t r = r0;
  // One or two tokens: row by row. Four interleaved rows measured 28 vs 39 GB/s from memory at
  // one token, 25-35 vs 35-38 at two (the prefetchers follow one sequential stream per thread
  // better than four); at four tokens four rows are faster (20-32 vs 12-15: weights reused).
  if constexpr (kTokens > 2) {
    for (; r + 4 <= r1; r += 4) BF16Tile<4, kTokens>(w + r * ws, ws, x, xs, cols, y + r, ys);
    for (; r < r1; ++r) BF16Tile<1, kTokens>(w + r * ws, ws, x, xs, cols, y + r, ys);
  } else {
    for (; r < r1; ++r) BF16Row<kTokens>(w + r * ws, x, xs, cols, y + r, ys);
  }
}

MOE_TARGET_BF16 void F32ToBF16RowImpl(const float* in, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(in + i));
    std::memcpy(out + i, &v, sizeof(v));
  }
  for (; i < n; ++i) out[i] = F32ToBF16(in[i]);
}

// 32 f32 values (lo: the first 16) as bf16 at out.
MOE_TARGET_BF16 inline void StoreBF16x32(__m512 lo, __m512 hi, uint16_t* out) {
  const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
  std::memcpy(out, &v, sizeof(v));
}

// 32 unsigned bytes as f32: [0, 16) and [16, 32).
MOE_TARGET_BF16 inline __m512 BytesToF32(__m256i q, int half) {
  const __m128i h = half ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(h));
}

// Dequantization straight to bf16: the same f32 operations in the same order as DequantizeRow
// (quant.cc; Mul then Sub, no FMA), then rounded, so each value is bf16(DequantizeRow's).
template <bool kFiveBit>
MOE_TARGET_BF16 void QK4ToBF16(const uint8_t* src, int64_t n, uint16_t* out) {
  constexpr int64_t kBlockBytes = kFiveBit ? 176 : 144;
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  const __m256i m1 = _mm256_set1_epi8(0x01);
  for (int64_t b = 0; b < n / 256; ++b) {
    const uint8_t* blk = src + b * kBlockBytes;
    const float d = HalfAt(blk), dmin = HalfAt(blk + 2);
    const uint8_t* qs = blk + (kFiveBit ? 48 : 16);
    __m256i qh = _mm256_setzero_si256();
    if constexpr (kFiveBit) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
    for (int j = 0; j < 8; ++j) {
      const K4SubBlock sub = K4SubBlockOf(blk, d, dmin, j);
      __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + sub.offset));
      // 16-bit shifts: what crosses from a byte's neighbour is masked off.
      q = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(sub.shift)), m4);
      if constexpr (kFiveBit) {
        const __m256i fifth = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), m1);
        q = _mm256_or_si256(q, _mm256_slli_epi16(fifth, 4));
      }
      const __m512 scale = _mm512_set1_ps(sub.scale), min = _mm512_set1_ps(sub.min);
      StoreBF16x32(_mm512_sub_ps(_mm512_mul_ps(scale, BytesToF32(q, 0)), min),
                   _mm512_sub_ps(_mm512_mul_ps(scale, BytesToF32(q, 1)), min),
                   out + b * 256 + 32 * j);
    }
  }
}

template <DType kType>
MOE_TARGET_BF16 void Block32ToBF16(const uint8_t* src, int64_t n, uint16_t* out) {
  using L = Block32<kType>;
  for (int64_t b = 0; b < n / 32; ++b) {
    const uint8_t* blk = src + b * L::kBytes;
    const __m512 d = _mm512_set1_ps(HalfAt(blk));
    __m256i q = Block32Quants<kType>(blk);
    if constexpr (!L::kQ8 && !L::kMin) q = _mm256_sub_epi8(q, _mm256_set1_epi8(1 << L::kShift));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
    if constexpr (L::kMin) {
      const __m512 m = _mm512_set1_ps(HalfAt(blk + 2));
      StoreBF16x32(_mm512_add_ps(_mm512_mul_ps(d, lo), m), _mm512_add_ps(_mm512_mul_ps(d, hi), m),
                   out + b * 32);
    } else {
      StoreBF16x32(_mm512_mul_ps(d, lo), _mm512_mul_ps(d, hi), out + b * 32);
    }
  }
}

MOE_TARGET_BF16 void Q6_KToBF16(const uint8_t* src, int64_t n, uint16_t* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  const __m256i m2 = _mm256_set1_epi8(0x03);
  const __m256i m32 = _mm256_set1_epi8(32);
  for (int64_t b = 0; b < n / 256; ++b) {
    const Q6_KParts p(src + b * 210);
    for (int h = 0; h < 2; ++h) {
      const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.qh + 32 * h));
      for (int k = 0; k < 4; ++k) {
        const int e = 128 * h + 32 * k;
        const __m256i low =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.ql + 64 * h + 32 * (k % 2)));
        const __m256i lo4 =
            _mm256_and_si256(_mm256_srl_epi16(low, _mm_cvtsi32_si128(k < 2 ? 0 : 4)), m4);
        const __m256i hi2 = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * k)), m2);
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo4, _mm256_slli_epi16(hi2, 4)), m32);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        const __m512 s0 = _mm512_set1_ps(p.d * static_cast<float>(p.scales[e / 16]));
        const __m512 s1 = _mm512_set1_ps(p.d * static_cast<float>(p.scales[e / 16 + 1]));
        StoreBF16x32(_mm512_mul_ps(s0, lo), _mm512_mul_ps(s1, hi), out + b * 256 + e);
      }
    }
  }
}

// clamp(v * id, -127, 127) rounded to nearest even, as int8.
MOE_TARGET_INT8 inline __m128i RoundToInt8(__m512 v, __m512 id) {
  const __m512 lim = _mm512_set1_ps(127.0f);
  v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, id), _mm512_set1_ps(-127.0f)), lim);
  return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v));
}

// Same values as QuantizeActivationsScalar (x * (1 / d) rounded to nearest even, saturated),
// except for NaN inputs (-128 here, 0 there).
MOE_TARGET_INT8 void QuantizeActivationsImpl(const float* x, int64_t x_stride, int64_t tokens,
                                             int64_t cols, Q8Activations* out) {
  static_assert(kActivationGroup == 8);
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m256i ones = _mm256_set1_epi8(1);
  const __m512i first_of_four = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t b = 0; b < cols / 32; ++b) {
      const float* xb = x + t * x_stride + b * 32;
      const size_t e = static_cast<size_t>(t * cols + b * 32);
      __m128i q[2];
      for (int h = 0; h < 2; ++h) {
        const __m512 v = _mm512_loadu_ps(xb + 16 * h);
        // The max of |v| over each 8-lane group, in every lane of the group.
        __m512 m = _mm512_and_ps(v, abs_mask);
        m = _mm512_max_ps(m, _mm512_permute_ps(m, 0xb1));
        m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4e));
        m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xb1));
        const __m512 d = _mm512_div_ps(m, _mm512_set1_ps(127.0f));
        const __mmask16 nonzero = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m512 id = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0f), d);
        q[h] = RoundToInt8(v, id);
        _mm_storeu_ps(&out->d4[e / 4 + 4 * h],
                      _mm512_castps512_ps128(_mm512_permutexvar_ps(first_of_four, d)));
      }
      const __m256i qs = _mm256_set_m128i(q[1], q[0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out->q[e]), qs);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out->qu[e]),
                          _mm256_xor_si256(qs, _mm256_set1_epi8(static_cast<char>(0x80))));
      alignas(32) int32_t sums[8];  // of each 4 values
      const __m256i sums4 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, qs);
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums), sums4);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out->nsum4[e / 4]),
                          _mm256_sub_epi32(_mm256_setzero_si256(), sums4));
      float block_sum = 0;  // as QuantizeActivationsScalar adds it (std::fma in both)
      for (int g = 0; g < 4; ++g) {
        const int32_t group_sum = sums[2 * g] + sums[2 * g + 1];
        block_sum = std::fma(out->d4[e / 4 + 2 * g], static_cast<float>(group_sum), block_sum);
      }
      out->sum32[e / 32] = block_sum;
    }
  }
}

}  // namespace

Caps GetCaps() {
  static const Caps detected = DetectCaps();
  Caps c = detected;
  c.int8 = c.int8 && g_limit_int8;
  c.bf16 = c.bf16 && g_limit_bf16;
  return c;
}

// Tokens per pass over the weights: each weight vector, unpacked once, serves all of them.
// 8 measured slower than two passes of 4 for Q6_K and Q8_0 (accumulators spill), even for Q4_K.
constexpr int kInt8TokensPerPass = 4;

template <int kTokens>
void Int8PassN(int n, const WeightMatrix& w, const TokenActs* acts, float* y, int64_t ys,
               int64_t r0, int64_t r1) {
  if constexpr (kTokens > 1) {
    if (n < kTokens) return Int8PassN<kTokens - 1>(n, w, acts, y, ys, r0, r1);
  }
  Int8RowsT<kTokens>(w, acts, y, ys, r0, r1);
}

void Int8MatMulRows(const WeightMatrix& w, const Q8Activations& a, float* y, int64_t y_stride,
                    int64_t row_begin, int64_t row_end) {
  for (int64_t t0 = 0; t0 < a.tokens; t0 += kInt8TokensPerPass) {
    TokenActs acts[kInt8TokensPerPass];
    const int n = static_cast<int>(std::min<int64_t>(kInt8TokensPerPass, a.tokens - t0));
    for (int t = 0; t < n; ++t) {
      const int64_t e = (t0 + t) * a.cols;
      acts[t] = {&a.q[e], &a.qu[e], &a.nsum4[e / 4], &a.d4[e / 4], &a.sum32[e / 32]};
    }
    Int8PassN<kInt8TokensPerPass>(n, w, acts, y + t0 * y_stride, y_stride, row_begin, row_end);
  }
}

void BF16MatMulRows(const uint16_t* w, int64_t w_stride, const BF16Activations& a, float* y,
                    int64_t y_stride, int64_t row_begin, int64_t row_end) {
  const auto ws = static_cast<size_t>(w_stride), cols = static_cast<size_t>(a.cols);
  const auto ys = static_cast<size_t>(y_stride);
  for (int64_t t0 = 0; t0 < a.tokens; t0 += 4) {
    const uint16_t* x = &a.x[t0 * a.cols];
    float* yt = y + t0 * y_stride;
    switch (std::min<int64_t>(4, a.tokens - t0)) {
      case 1:
        BF16TokenTile<1>(w, ws, x, cols, cols, yt, ys, row_begin, row_end);
        break;
      case 2:
        BF16TokenTile<2>(w, ws, x, cols, cols, yt, ys, row_begin, row_end);
        break;
      case 3:
        BF16TokenTile<3>(w, ws, x, cols, cols, yt, ys, row_begin, row_end);
        break;
      default:
        BF16TokenTile<4>(w, ws, x, cols, cols, yt, ys, row_begin, row_end);
        break;
    }
  }
}

bool DequantizeRowToBF16(const void* row, DType dtype, int64_t n, uint16_t* out) {
  const auto* p = static_cast<const uint8_t*>(row);
  switch (dtype) {
    case DType::kQ8_0:
      Block32ToBF16<DType::kQ8_0>(p, n, out);
      return true;
    case DType::kQ4_K:
      QK4ToBF16<false>(p, n, out);
      return true;
    case DType::kQ5_K:
      QK4ToBF16<true>(p, n, out);
      return true;
    case DType::kQ6_K:
      Q6_KToBF16(p, n, out);
      return true;
    case DType::kQ4_0:
      Block32ToBF16<DType::kQ4_0>(p, n, out);
      return true;
    case DType::kQ4_1:
      Block32ToBF16<DType::kQ4_1>(p, n, out);
      return true;
    case DType::kQ5_0:
      Block32ToBF16<DType::kQ5_0>(p, n, out);
      return true;
    case DType::kQ5_1:
      Block32ToBF16<DType::kQ5_1>(p, n, out);
      return true;
    default:
      return false;
  }
}

void F32ToBF16Row(const float* in, int64_t n, uint16_t* out) {
  if (GetCaps().bf16) return F32ToBF16RowImpl(in, n, out);
  for (int64_t i = 0; i < n; ++i) out[i] = F32ToBF16(in[i]);
}

#else  // !MOE_KERNELS_X86

Caps GetCaps() { return {}; }

namespace {
void QuantizeActivationsImpl(const float* x, int64_t x_stride, int64_t tokens, int64_t cols,
                             Q8Activations* out) {
  QuantizeActivationsScalar(x, x_stride, tokens, cols, out);
}
}  // namespace

void Int8MatMulRows(const WeightMatrix&, const Q8Activations&, float*, int64_t, int64_t, int64_t) {}

void BF16MatMulRows(const uint16_t*, int64_t, const BF16Activations&, float*, int64_t, int64_t,
                    int64_t) {}

bool DequantizeRowToBF16(const void*, DType, int64_t, uint16_t*) { return false; }

void F32ToBF16Row(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = F32ToBF16(in[i]);
}

#endif  // MOE_KERNELS_X86

}  // namespace moe::kernels::x86
