// Every kernel against a naive scalar (mostly double-precision) loop, on awkward sizes,
// strides and unaligned pointers.
#include "common/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "hwy/targets.h"

namespace moe::kernels {
namespace {

using ::testing::ElementsAre;

constexpr float kInf = std::numeric_limits<float>::infinity();

// Sizes that are not multiples of any vector width, plus model-like ones.
const std::vector<int64_t> kSizes = {1, 3, 100, 200, 3200, 5632};
const std::vector<int64_t> kTokenCounts = {1, 2, 3, 5, 8, 17};

std::vector<float> RandomFloats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

// A weight matrix stored in `dtype`, plus its values decoded to f32 for the reference.
// `offset` elements of padding in front make the data pointer unaligned.
struct TestMatrix {
  std::vector<uint8_t> bytes;
  std::vector<float> values;  // [rows, row_stride], decoded
  WeightMatrix w;
};

TestMatrix MakeMatrix(DType dtype, int64_t rows, int64_t cols, int64_t row_stride, int64_t offset,
                      uint32_t seed) {
  TestMatrix m;
  const size_t n = static_cast<size_t>(rows * row_stride);
  const size_t elem = DTypeSize(dtype);
  m.values = RandomFloats(n, seed);
  m.bytes.assign((n + offset) * elem, 0);
  uint8_t* base = m.bytes.data() + offset * elem;
  for (size_t i = 0; i < n; ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(base + i * 4, &m.values[i], 4);
      continue;
    }
    const uint16_t bits = dtype == DType::kBF16 ? F32ToBF16(m.values[i]) : F32ToF16(m.values[i]);
    m.values[i] = dtype == DType::kBF16 ? BF16ToF32(bits) : F16ToF32(bits);
    std::memcpy(base + i * 2, &bits, 2);
  }
  m.w = {.data = base, .dtype = dtype, .rows = rows, .cols = cols, .row_stride = row_stride};
  return m;
}

// Checks MatMul on one shape against a double-accumulated loop: |y - ref| <= 1e-5 * sum|w*x|.
// `strided` pads every stride and offsets every pointer by one element.
void CheckMatMul(DType dtype, int64_t rows, int64_t cols, int64_t tokens, bool strided) {
  SCOPED_TRACE(std::string(DTypeName(dtype)) + " rows=" + std::to_string(rows) +
               " cols=" + std::to_string(cols) + " tokens=" + std::to_string(tokens) +
               (strided ? " strided" : " dense"));
  const int64_t pad = strided ? 1 : 0;
  const int64_t row_stride = cols + 5 * pad;
  const int64_t x_stride = cols + 3 * pad;
  const int64_t y_stride = rows + 2 * pad;
  const TestMatrix m =
      MakeMatrix(dtype, rows, cols, row_stride, pad, static_cast<uint32_t>(rows * 31 + cols));
  const std::vector<float> x_buf =
      RandomFloats(static_cast<size_t>(tokens * x_stride + pad), static_cast<uint32_t>(tokens));
  const float* x = x_buf.data() + pad;
  constexpr float kSentinel = 12345.0f;
  std::vector<float> y_buf(static_cast<size_t>(tokens * y_stride + pad), kSentinel);
  float* y = y_buf.data() + pad;

  MatMul(m.w, x, x_stride, tokens, y, y_stride);

  double worst = 0;  // max |y - ref| / sum|w*x|
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      double ref = 0, mag = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double p = double{m.values[r * row_stride + c]} * x[t * x_stride + c];
        ref += p;
        mag += std::abs(p);
      }
      worst = std::max(worst, std::abs(y[t * y_stride + r] - ref) / (mag + 1e-30));
    }
    for (int64_t r = rows; r < y_stride; ++r) {
      ASSERT_EQ(y[t * y_stride + r], kSentinel) << "wrote past row " << rows;
    }
  }
  if (strided) {
    ASSERT_EQ(y_buf[0], kSentinel) << "wrote before y";
  }
  EXPECT_LE(worst, 1e-5);
}

// Runs a test once per SIMD target that the binary has code for and the CPU supports, so the
// SSSE3/SSE4/AVX2/portable paths are checked on an AVX-512 machine too.
class KernelTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override { hwy::SetSupportedTargetsForTest(GetParam()); }
  void TearDown() override { hwy::SetSupportedTargetsForTest(0); }
};

INSTANTIATE_TEST_SUITE_P(AllTargets, KernelTest,
                         ::testing::ValuesIn(hwy::SupportedAndGeneratedTargets()),
                         [](const auto& info) { return std::string(hwy::TargetName(info.param)); });

TEST_P(KernelTest, MatMulSmallShapes) {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (bool strided : {false, true}) {
      for (int64_t cols : {1, 3, 100, 200, 1000}) {
        for (int64_t rows : {1, 3, 100}) {  // 100 x 1000 x 17 runs in parallel
          for (int64_t tokens : kTokenCounts) CheckMatMul(dtype, rows, cols, tokens, strided);
        }
      }
    }
  }
}

// The full sweep on the best target only.
class MatMulTest : public ::testing::TestWithParam<std::tuple<DType, bool>> {};

TEST_P(MatMulTest, MatchesNaiveLoop) {
  const auto [dtype, strided] = GetParam();
  // Every shape with every token count (serial and parallel paths, every token tile).
  for (int64_t cols : kSizes) {
    for (int64_t rows : {1, 3, 100, 200}) {
      if (cols >= 3200 && rows == 200) continue;  // 100 rows already span several row blocks
      for (int64_t tokens : kTokenCounts) CheckMatMul(dtype, rows, cols, tokens, strided);
    }
  }
  // Tall and large matrices with a few token counts.
  if (strided) {
    for (int64_t tokens : {1, 5, 17}) CheckMatMul(dtype, 5632, 100, tokens, strided);
    CheckMatMul(dtype, 3200, 200, 8, strided);
  } else {
    CheckMatMul(dtype, 5632, 1000, 1, strided);
    CheckMatMul(dtype, 2048, 2048, 5, strided);
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, MatMulTest,
                         ::testing::Combine(::testing::Values(DType::kF32, DType::kF16,
                                                              DType::kBF16),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(DTypeName(std::get<0>(info.param))) +
                                  (std::get<1>(info.param) ? "Strided" : "Dense");
                         });

TEST_P(KernelTest, MatMulDenseOverloadAndExactValues) {
  // W = [[1, 2, 3], [-1, 0.5, 4]] in BF16 (exact); x = [[1, 1, 1], [2, 0, -1]].
  const std::vector<uint16_t> w_bits = {F32ToBF16(1),  F32ToBF16(2),   F32ToBF16(3),
                                        F32ToBF16(-1), F32ToBF16(0.5), F32ToBF16(4)};
  const WeightMatrix w{
      .data = w_bits.data(), .dtype = DType::kBF16, .rows = 2, .cols = 3, .row_stride = 3};
  const std::vector<float> x = {1, 1, 1, 2, 0, -1};
  std::vector<float> y(4, 0);
  MatMul(w, x.data(), 2, y.data());
  EXPECT_THAT(y, ElementsAre(6, 3.5, -1, -6));
}

TEST_P(KernelTest, MatMulZeroTokensWritesNothing) {
  const TestMatrix m = MakeMatrix(DType::kF32, 4, 4, 4, 0, 1);
  float y = 7;
  MatMul(m.w, nullptr, 4, 0, &y, 4);
  EXPECT_EQ(y, 7);
}

TEST_P(KernelTest, ConvertToF32EveryBF16AndF16BitPatternIsExact) {
  std::vector<uint16_t> all(65536 + 1);
  for (uint32_t i = 0; i < 65536; ++i) all[i + 1] = static_cast<uint16_t>(i);
  std::vector<float> out(65536);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    ConvertToF32(all.data() + 1, dtype, 65536, out.data());  // unaligned source
    for (uint32_t i = 0; i < 65536; ++i) {
      const float ref = dtype == DType::kBF16 ? BF16ToF32(static_cast<uint16_t>(i))
                                              : F16ToF32(static_cast<uint16_t>(i));
      if (std::isnan(ref)) {
        ASSERT_TRUE(std::isnan(out[i])) << "bits " << i;
      } else {
        ASSERT_EQ(std::signbit(out[i]), std::signbit(ref)) << "bits " << i;
        ASSERT_EQ(out[i], ref) << "bits " << i;
      }
    }
  }
}

TEST_P(KernelTest, ConvertToF32AwkwardLengthsStopAtN) {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + " n=" + std::to_string(n));
      const TestMatrix m = MakeMatrix(dtype, 1, n, n, 1, static_cast<uint32_t>(n));
      std::vector<float> out(static_cast<size_t>(n + 2), -7.0f);
      ConvertToF32(m.w.data, dtype, n, out.data() + 1);
      EXPECT_EQ(out[0], -7.0f);
      EXPECT_EQ(out[n + 1], -7.0f);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i + 1], m.values[i]) << i;
    }
  }
}

TEST_P(KernelTest, DotMatchesDoubleLoop) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE(n);
    const std::vector<float> a = RandomFloats(static_cast<size_t>(n + 1), 1);
    const std::vector<float> b = RandomFloats(static_cast<size_t>(n + 1), 2);
    double ref = 0, mag = 0;
    for (int64_t i = 0; i < n; ++i) {
      ref += double{a[i + 1]} * b[i + 1];
      mag += std::abs(double{a[i + 1]} * b[i + 1]);
    }
    EXPECT_NEAR(Dot(a.data() + 1, b.data() + 1, n), ref, 1e-5 * mag);
  }
  EXPECT_EQ(Dot(nullptr, nullptr, 0), 0.0f);
}

// Attention's score tile: nq queries against nk keys a stride apart, written a stride apart;
// entries between the rows' ends and the next row stay untouched.
TEST_P(KernelTest, DotRowsMatchesDoubleLoop) {
  for (int64_t d : {1, 15, 16, 64, 100, 128}) {
    for (int64_t nq : {1, 3, 4, 8, 9}) {
      for (int64_t nk : {1, 5, 16}) {
        SCOPED_TRACE(testing::Message() << "d " << d << " nq " << nq << " nk " << nk);
        const int64_t k_stride = d + 7;
        const int64_t out_stride = nk + 2;
        const std::vector<float> q = RandomFloats(static_cast<size_t>(nq * d), 5);
        const std::vector<float> k = RandomFloats(static_cast<size_t>(nk * k_stride), 6);
        std::vector<float> out(static_cast<size_t>(nq * out_stride), -7.0f);
        DotRows(q.data(), nq, k.data(), k_stride, nk, d, 0.125f, out.data(), out_stride);
        for (int64_t i = 0; i < nq; ++i) {
          for (int64_t j = 0; j < nk; ++j) {
            double ref = 0, mag = 0;
            for (int64_t c = 0; c < d; ++c) {
              ref += double{q[i * d + c]} * k[j * k_stride + c];
              mag += std::abs(double{q[i * d + c]} * k[j * k_stride + c]);
            }
            ASSERT_NEAR(out[i * out_stride + j], 0.125 * ref, 1e-6 * mag) << i << " " << j;
          }
          for (int64_t j = nk; j < out_stride; ++j) ASSERT_EQ(out[i * out_stride + j], -7.0f);
        }
      }
    }
  }
}

// Attention's weighted sum of values: adds into out, values a stride apart.
TEST_P(KernelTest, AccumulateRowsMatchesDoubleLoop) {
  for (int64_t d : {1, 15, 16, 64, 100, 128}) {
    for (int64_t nq : {1, 3, 8}) {
      for (int64_t nk : {1, 5, 16}) {
        SCOPED_TRACE(testing::Message() << "d " << d << " nq " << nq << " nk " << nk);
        const int64_t v_stride = d + 3;
        const int64_t p_stride = nk + 1;
        const std::vector<float> p = RandomFloats(static_cast<size_t>(nq * p_stride), 7, 0, 1);
        const std::vector<float> v = RandomFloats(static_cast<size_t>(nk * v_stride), 8);
        const std::vector<float> out0 = RandomFloats(static_cast<size_t>(nq * d + 1), 9);
        std::vector<float> out = out0;
        AccumulateRows(p.data(), p_stride, nq, v.data(), v_stride, nk, d, out.data());
        for (int64_t i = 0; i < nq; ++i) {
          for (int64_t c = 0; c < d; ++c) {
            double ref = out0[i * d + c], mag = std::abs(ref);
            for (int64_t j = 0; j < nk; ++j) {
              ref += double{p[i * p_stride + j]} * v[j * v_stride + c];
              mag += std::abs(double{p[i * p_stride + j]} * v[j * v_stride + c]);
            }
            ASSERT_NEAR(out[i * d + c], ref, 1e-6 * mag) << i << " " << c;
          }
        }
        EXPECT_EQ(out[nq * d], out0[nq * d]);
      }
    }
  }
}

TEST_P(KernelTest, AxpyMatchesScalarLoop) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE(n);
    const std::vector<float> x = RandomFloats(static_cast<size_t>(n + 1), 3);
    std::vector<float> y = RandomFloats(static_cast<size_t>(n + 2), 4);
    const std::vector<float> y0 = y;
    Axpy(-1.5f, x.data() + 1, y.data() + 1, n);
    EXPECT_EQ(y[0], y0[0]);
    EXPECT_EQ(y[n + 1], y0[n + 1]);
    for (int64_t i = 1; i <= n; ++i) {
      // The product rounded, then the sum: never one fused rounding.
      volatile float product = -1.5f * x[i];
      ASSERT_EQ(y[i], y0[i] + product) << i;
    }
  }
}

// transformers' MixtralRMSNorm in double.
std::vector<double> RmsNormRef(const float* x, const float* weight, int64_t n, float eps) {
  double sum_sq = 0;
  for (int64_t i = 0; i < n; ++i) sum_sq += double{x[i]} * x[i];
  const double scale = 1.0 / std::sqrt(sum_sq / n + eps);
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
  return out;
}

TEST_P(KernelTest, RmsNormMatchesReferenceOutOfPlaceAndInPlace) {
  constexpr float kEps = 1e-5f;
  constexpr int64_t kTokens = 3;
  for (int64_t n : kSizes) {
    SCOPED_TRACE(n);
    const std::vector<float> x = RandomFloats(static_cast<size_t>(kTokens * n + 1), 5, -3, 3);
    const std::vector<float> weight = RandomFloats(static_cast<size_t>(n + 1), 6, 0.5, 1.5);
    std::vector<float> out(static_cast<size_t>(kTokens * n + 1));
    RmsNorm(x.data() + 1, weight.data() + 1, kTokens, n, kEps, out.data() + 1);
    std::vector<float> in_place = x;
    RmsNorm(in_place.data() + 1, weight.data() + 1, kTokens, n, kEps, in_place.data() + 1);
    for (int64_t t = 0; t < kTokens; ++t) {
      const std::vector<double> ref = RmsNormRef(&x[1 + t * n], &weight[1], n, kEps);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_NEAR(out[1 + t * n + i], ref[i], 1e-5 * std::abs(ref[i]) + 1e-7);
        ASSERT_EQ(in_place[1 + t * n + i], out[1 + t * n + i]);
      }
    }
  }
}

TEST_P(KernelTest, RmsNormZeroRowStaysZeroAndEpsMatters) {
  const std::vector<float> x = {0, 0, 0, 0};
  const std::vector<float> weight = {1, 1, 1, 1};
  std::vector<float> out(4, 9);
  RmsNorm(x.data(), weight.data(), 1, 4, 1e-6f, out.data());
  EXPECT_THAT(out, ElementsAre(0, 0, 0, 0));
  // mean(x^2) = 1, eps = 3: scale = 1/2.
  const std::vector<float> ones = {1, -1, 1, -1};
  RmsNorm(ones.data(), weight.data(), 1, 4, 3.0f, out.data());
  EXPECT_THAT(out, ElementsAre(0.5, -0.5, 0.5, -0.5));
}

TEST_P(KernelTest, RopeSplitHalfMatchesRotateHalf) {
  for (int64_t head_dim : {2, 6, 64, 128, 200}) {
    for (int64_t heads : {1, 3, 8}) {
      SCOPED_TRACE("head_dim=" + std::to_string(head_dim) + " heads=" + std::to_string(heads));
      const int64_t half = head_dim / 2;
      std::vector<float> angle = RandomFloats(static_cast<size_t>(half), 7, -10, 10);
      std::vector<float> cos(static_cast<size_t>(half + 1)), sin(static_cast<size_t>(half + 1));
      for (int64_t i = 0; i < half; ++i) {
        cos[i + 1] = std::cos(angle[i]);
        sin[i + 1] = std::sin(angle[i]);
      }
      const std::vector<float> x0 = RandomFloats(static_cast<size_t>(heads * head_dim + 1), 8);
      std::vector<float> x = x0;
      RopeSplitHalf(x.data() + 1, heads, head_dim, cos.data() + 1, sin.data() + 1);
      EXPECT_EQ(x[0], x0[0]);
      for (int64_t h = 0; h < heads; ++h) {
        const float* in = &x0[1 + h * head_dim];
        const float* out = &x[1 + h * head_dim];
        for (int64_t i = 0; i < half; ++i) {
          const double c = cos[i + 1], s = sin[i + 1];
          ASSERT_NEAR(out[i], in[i] * c - in[i + half] * s, 1e-6) << h << " " << i;
          ASSERT_NEAR(out[i + half], in[i + half] * c + in[i] * s, 1e-6) << h << " " << i;
        }
      }
    }
  }
}

// llama.cpp's converter permutes each head's q/k rows so that HF's split-half pair
// (i, i + hd/2) lands at (2i, 2i + 1): interleaved RoPE on the permuted vector equals the
// permuted split-half RoPE.
TEST(RopeInterleavedTest, EqualsSplitHalfUnderTheConverterPermutation) {
  for (int64_t head_dim : {2, 16, 100}) {
    const int64_t heads = 3, half = head_dim / 2;
    std::vector<float> cos(half), sin(half);
    for (int64_t i = 0; i < half; ++i) {
      cos[i] = std::cos(0.3f * static_cast<float>(i + 1));
      sin[i] = std::sin(0.3f * static_cast<float>(i + 1));
    }
    std::vector<float> hf = RandomFloats(static_cast<size_t>(heads * head_dim), 11);
    std::vector<float> gguf(hf.size());
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < half; ++i) {
        gguf[h * head_dim + 2 * i] = hf[h * head_dim + i];
        gguf[h * head_dim + 2 * i + 1] = hf[h * head_dim + i + half];
      }
    }
    RopeSplitHalf(hf.data(), heads, head_dim, cos.data(), sin.data());
    RopeInterleaved(gguf.data(), heads, head_dim, cos.data(), sin.data());
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < half; ++i) {
        EXPECT_NEAR(gguf[h * head_dim + 2 * i], hf[h * head_dim + i], 1e-6);
        EXPECT_NEAR(gguf[h * head_dim + 2 * i + 1], hf[h * head_dim + i + half], 1e-6);
      }
    }
  }
}

TEST_P(KernelTest, SiluMulMatchesReferenceIncludingExtremes) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE(n);
    std::vector<float> gate = RandomFloats(static_cast<size_t>(n + 1), 9, -12, 12);
    const std::vector<float> up = RandomFloats(static_cast<size_t>(n + 1), 10, -2, 2);
    const float extremes[] = {0.0f, -0.0f, 100.0f, -100.0f, 1000.0f, -1000.0f, 88.0f, -88.5f};
    for (size_t i = 0; i < std::size(extremes) && i < static_cast<size_t>(n); ++i) {
      gate[1 + (i * 37) % n] = extremes[i];
    }
    const std::vector<float> gate0 = gate;
    SiluMul(gate.data() + 1, up.data() + 1, n);
    EXPECT_EQ(gate[0], gate0[0]);
    for (int64_t i = 1; i <= n; ++i) {
      const double g = gate0[i];
      const double ref = g / (1.0 + std::exp(-g)) * up[i];
      ASSERT_TRUE(std::isfinite(gate[i])) << "g=" << g;
      ASSERT_NEAR(gate[i], ref, 4e-6 * std::abs(ref) + 1e-30) << "g=" << g << " u=" << up[i];
    }
  }
}

// Softmax in double, max-subtracted.
std::vector<double> SoftmaxRef(const std::vector<float>& x) {
  const double max = *std::max_element(x.begin(), x.end());
  std::vector<double> out(x.size());
  double sum = 0;
  for (size_t i = 0; i < x.size(); ++i) sum += out[i] = std::exp(x[i] - max);
  for (double& v : out) v /= sum;
  return out;
}

void CheckSoftmax(const std::vector<float>& x) {
  std::vector<float> buf(x.size() + 2, -3.0f);
  std::copy(x.begin(), x.end(), buf.begin() + 1);
  Softmax(buf.data() + 1, static_cast<int64_t>(x.size()));
  EXPECT_EQ(buf.front(), -3.0f);
  EXPECT_EQ(buf.back(), -3.0f);
  const std::vector<double> ref = SoftmaxRef(x);
  double sum = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    // hn::Exp is good to a few ulp with FMA, ~30 ulp without (the portable SCALAR target).
    ASSERT_NEAR(buf[i + 1], ref[i], 1e-5 * ref[i] + 1e-12) << i;
    if (x[i] == -kInf) {
      ASSERT_EQ(buf[i + 1], 0.0f) << i;
    }
    sum += buf[i + 1];
  }
  EXPECT_NEAR(sum, 1.0, 1e-5);
}

TEST_P(KernelTest, SoftmaxRandomLargeAndMaskedInputs) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE(n);
    std::vector<float> x = RandomFloats(static_cast<size_t>(n), 11, -8, 8);
    CheckSoftmax(x);
    // Large values: a naive exp overflows.
    for (float& v : x) v += 1000.0f;
    CheckSoftmax(x);
    // Masked (causal attention) entries; at least one stays finite.
    for (int64_t i = 1; i < n; i += 2) x[i] = -kInf;
    CheckSoftmax(x);
  }
}

TEST_P(KernelTest, SoftmaxSmallCases) {
  std::vector<float> one = {42.0f};
  Softmax(one.data(), 1);
  EXPECT_EQ(one[0], 1.0f);
  std::vector<float> equal(5, 1000.0f);
  Softmax(equal.data(), 5);
  for (float v : equal) EXPECT_FLOAT_EQ(v, 0.2f);
  std::vector<float> masked = {-kInf, 3.0f, -kInf};
  Softmax(masked.data(), 3);
  EXPECT_THAT(masked, ElementsAre(0.0f, 1.0f, 0.0f));
  std::vector<float> all_masked(3, -kInf);  // NaN, as torch.softmax gives
  Softmax(all_masked.data(), 3);
  for (float v : all_masked) EXPECT_TRUE(std::isnan(v));
}

// Reference: stable sort of indices by descending value keeps ties in index order.
void CheckTopK(const std::vector<float>& x, int64_t k) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<int32_t> order(x.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return x[a] > x[b]; });
  std::vector<int32_t> indices(static_cast<size_t>(k), -1);
  std::vector<float> values(static_cast<size_t>(k), 0);
  TopK(x.data(), n, k, indices.data(), values.data());
  for (int64_t i = 0; i < k; ++i) {
    ASSERT_EQ(indices[i], order[i]) << "n=" << n << " k=" << k << " i=" << i;
    ASSERT_EQ(values[i], x[order[i]]) << "n=" << n << " k=" << k << " i=" << i;
  }
}

TEST_P(KernelTest, TopKTiesGoToLowerIndex) {
  const std::vector<float> x = {1, 3, 3, 2, 3};
  std::vector<int32_t> indices(2);
  std::vector<float> values(2);
  TopK(x.data(), 5, 2, indices.data(), values.data());
  EXPECT_THAT(indices, ElementsAre(1, 2));
  EXPECT_THAT(values, ElementsAre(3, 3));
  CheckTopK(x, 5);
  CheckTopK({-kInf, -kInf, -1, 0}, 4);
  CheckTopK({5, 5, 5, 5}, 2);
}

TEST_P(KernelTest, TopKMatchesStableSortForManySizes) {
  std::mt19937 rng(12);
  for (int64_t n : {1, 2, 3, 8, 100, 200, 3200}) {
    // Few distinct values, so there are many ties.
    std::uniform_int_distribution<int> dist(-2, 2);
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = static_cast<float>(dist(rng)) * 0.5f;
    for (int64_t k : {int64_t{1}, int64_t{2}, (n + 1) / 2, n}) {
      if (k <= n) CheckTopK(x, k);
    }
    CheckTopK(RandomFloats(static_cast<size_t>(n), 13), std::min<int64_t>(n, 2));
  }
}

}  // namespace
}  // namespace moe::kernels
