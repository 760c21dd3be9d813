// The fast MatMul paths (kernels_x86.h): the int8 activation quantization against its
// definition, and MatMul in MatMulMode::kFast against double-precision loops over exactly the
// rounded operands each path uses (int8 activations; bf16 activations and weights), on awkward
// shapes, strides and token counts, with each combination of the CPU features turned off. On a
// CPU without them, kFast must equal kExact bit for bit (the fallback), which is also checked.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/dtype.h"
#include "common/gguf_model.h"
#include "common/kernels.h"
#include "common/kernels_x86.h"
#include "common/quant.h"
#include "gtest/gtest.h"
#include "tests/testutil/gguf_writer.h"

namespace moe::kernels {
namespace {

std::vector<float> RandomFloats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

class FastKernelTest : public ::testing::TestWithParam<x86::Caps> {
 protected:
  void SetUp() override {
    x86::LimitCaps(GetParam());
    SetMatMulMode(MatMulMode::kFast);
  }
  void TearDown() override {
    x86::LimitCaps({.int8 = true, .bf16 = true});
    SetMatMulMode(MatMulMode::kExact);
  }
};

INSTANTIATE_TEST_SUITE_P(Features, FastKernelTest,
                         ::testing::Values(x86::Caps{.int8 = true, .bf16 = true},
                                           x86::Caps{.int8 = true, .bf16 = false},
                                           x86::Caps{.int8 = false, .bf16 = true},
                                           x86::Caps{.int8 = false, .bf16 = false}),
                         [](const auto& info) {
                           return std::string(info.param.int8 ? "Int8" : "NoInt8") +
                                  (info.param.bf16 ? "Bf16" : "NoBf16");
                         });

TEST_P(FastKernelTest, QuantizeActivationsFollowsItsDefinition) {
  const int64_t tokens = 3, cols = 96, x_stride = 101;
  std::vector<float> x = RandomFloats(tokens * x_stride, 7, 3.0f);
  std::fill_n(&x[x_stride + 32], 12, 0.0f);  // an all-zero group (and a partly zero one)
  x[2 * x_stride + 70] = 1e6f;               // one group dominated by one value
  x86::Q8Activations a;
  x86::QuantizeActivations(x.data(), x_stride, tokens, cols, &a);
  ASSERT_EQ(a.q.size(), static_cast<size_t>(tokens * cols));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t b = 0; b < cols / 32; ++b) {
      float sum = 0;
      for (int g = 0; g < 4; ++g) {
        const float* xg = &x[t * x_stride + b * 32 + g * 8];
        const int64_t e = t * cols + b * 32 + g * 8;
        float amax = 0;
        for (int i = 0; i < 8; ++i) amax = std::max(amax, std::fabs(xg[i]));
        const float d = amax / 127.0f;
        EXPECT_EQ(a.d4[e / 4], d);
        EXPECT_EQ(a.d4[e / 4 + 1], d);
        int max_q = 0, sum_q = 0;
        for (int i = 0; i < 8; ++i) {
          const int q = a.q[e + i];
          max_q = std::max(max_q, std::abs(q));
          sum_q += q;
          EXPECT_LE(std::fabs(xg[i] - q * d), d * 0.5f * (1 + 1e-5f)) << "t=" << t << " e=" << e;
        }
        EXPECT_EQ(max_q, amax > 0 ? 127 : 0);
        for (int i = 0; i < 8; ++i) EXPECT_EQ(a.qu[e + i], a.q[e + i] + 128);
        for (int k = 0; k < 2; ++k) {
          int s4 = 0;
          for (int i = 0; i < 4; ++i) s4 += a.q[e + 4 * k + i];
          EXPECT_EQ(a.nsum4[e / 4 + k], -s4);
        }
        sum = std::fma(d, static_cast<float>(sum_q), sum);
      }
      EXPECT_EQ(a.sum32[(t * cols + b * 32) / 32], sum);
    }
  }
}

// The AVX-512 quantization gives the portable one's values bit for bit.
TEST(QuantizeActivationsTest, SimdEqualsScalar) {
  const int64_t tokens = 4, cols = 2048;
  std::vector<float> x = RandomFloats(tokens * cols, 3, 10.0f);
  std::fill_n(&x[100], 40, 0.0f);
  x86::Q8Activations simd, scalar;
  x86::QuantizeActivations(x.data(), cols, tokens, cols, &simd);
  x86::LimitCaps({.int8 = false, .bf16 = false});
  x86::QuantizeActivations(x.data(), cols, tokens, cols, &scalar);
  x86::LimitCaps({.int8 = true, .bf16 = true});
  EXPECT_EQ(simd.q, scalar.q);
  EXPECT_EQ(simd.d4, scalar.d4);
  EXPECT_EQ(simd.qu, scalar.qu);
  EXPECT_EQ(simd.nsum4, scalar.nsum4);
  EXPECT_EQ(simd.sum32, scalar.sum32);
}

// Checks MatMul (kFast) on one shape. The reference is a double loop over the operands the
// path in use rounds to: int8 activations (x^ = q * d) with the exact weights; bf16 activations
// and bf16 weights. |y - ref| <= 2e-5 * sum|terms|.
void CheckFast(DType dtype, int64_t rows, int64_t blocks, int64_t tokens) {
  const int64_t cols = blocks * DTypeBlockElements(dtype);
  const int64_t row_stride = cols + DTypeBlockElements(dtype);  // one block of padding
  const int64_t x_stride = cols + 3, y_stride = rows + 2;
  SCOPED_TRACE(std::string(DTypeName(dtype)) + " rows=" + std::to_string(rows) +
               " cols=" + std::to_string(cols) + " tokens=" + std::to_string(tokens));
  const std::vector<uint8_t> bytes = testing::PatternTensorBytes(
      GgmlTypeOf(dtype), rows * row_stride, static_cast<uint32_t>(rows * 7 + cols + tokens));
  const WeightMatrix w{bytes.data(), dtype, rows, cols, row_stride};
  const std::vector<float> x = RandomFloats(tokens * x_stride, static_cast<uint32_t>(tokens));
  constexpr float kSentinel = 4321.0f;
  std::vector<float> y(tokens * y_stride, kSentinel);
  MatMul(w, x.data(), x_stride, tokens, y.data(), y_stride);

  const x86::Caps caps = x86::GetCaps();
  const bool int8 = caps.int8 && x86::HasInt8Kernel(dtype) && tokens <= kMaxInt8Tokens;
  const bool bf16 = !int8 && caps.bf16;
  if (!int8 && !bf16) {  // no fast path on this CPU (or turned off): exactly kExact
    std::vector<float> exact(y.size(), kSentinel);
    SetMatMulMode(MatMulMode::kExact);
    MatMul(w, x.data(), x_stride, tokens, exact.data(), y_stride);
    SetMatMulMode(MatMulMode::kFast);
    ASSERT_EQ(std::memcmp(y.data(), exact.data(), y.size() * sizeof(float)), 0);
    return;
  }
  x86::Q8Activations a;
  if (int8) x86::QuantizeActivations(x.data(), x_stride, tokens, cols, &a);
  std::vector<float> row(cols);
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    ConvertToF32(w.Row(r), dtype, cols, row.data());
    for (int64_t t = 0; t < tokens; ++t) {
      double ref = 0, mag = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const float xv = x[t * x_stride + c];
        const double term = int8 ? double{row[c]} * a.q[t * cols + c] * a.d4[(t * cols + c) / 4]
                                 : double{BF16ToF32(F32ToBF16(row[c]))} * BF16ToF32(F32ToBF16(xv));
        ref += term;
        mag += std::fabs(term);
      }
      const double got = y[t * y_stride + r];
      ASSERT_FALSE(std::isnan(got)) << "r=" << r << " t=" << t;
      worst = std::max(worst, std::fabs(got - ref) / (mag + 1e-30));
    }
  }
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = rows; r < y_stride; ++r) ASSERT_EQ(y[t * y_stride + r], kSentinel);
  }
  EXPECT_LE(worst, 2e-5) << (int8 ? "int8 path" : "bf16 path");
}

// The bf16 path dequantizes quantized rows straight to bf16: each value is the bf16 rounding of
// DequantizeRow's (the exact path's) value, bit for bit; other types say no.
TEST(DequantizeRowToBF16Test, EqualsDequantizeThenRound) {
  if (!x86::GetCaps().bf16) GTEST_SKIP() << "this CPU has no AVX512-BF16";
  for (DType dtype : {DType::kQ8_0, DType::kQ4_0, DType::kQ4_1, DType::kQ5_0, DType::kQ5_1,
                      DType::kQ4_K, DType::kQ5_K, DType::kQ6_K}) {
    SCOPED_TRACE(DTypeName(dtype));
    const int64_t n = 8 * 256;
    const std::vector<uint8_t> bytes = testing::PatternTensorBytes(GgmlTypeOf(dtype), n, 11);
    std::vector<float> f32(n);
    DequantizeRow(bytes.data(), dtype, n, f32.data());
    std::vector<uint16_t> bf16(n + 1, 0xdead);
    ASSERT_TRUE(x86::DequantizeRowToBF16(bytes.data(), dtype, n, bf16.data()));
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(bf16[i], F32ToBF16(f32[i])) << i;
    EXPECT_EQ(bf16[n], 0xdead);
  }
  uint16_t untouched[32];
  std::fill(std::begin(untouched), std::end(untouched), 0xdead);
  const std::vector<float> f32(32, 1.0f);
  EXPECT_FALSE(x86::DequantizeRowToBF16(f32.data(), DType::kF32, 32, untouched));
  EXPECT_EQ(untouched[0], 0xdead);
}

TEST_P(FastKernelTest, MatMulEqualsTheRoundedOperandsDot) {
  for (DType dtype : {DType::kQ8_0, DType::kQ4_K, DType::kQ6_K, DType::kBF16, DType::kQ4_0,
                      DType::kQ4_1, DType::kQ5_0, DType::kQ5_1, DType::kQ5_K}) {
    const bool k_quant = DTypeBlockElements(dtype) == 256;
    // Odd block counts (Q8_0's last block alone), one row, many rows (parallel), 1..9 tokens
    // (int8 at <= 8, bf16 above) and prefill-sized token counts.
    for (const auto& [rows, blocks, tokens] :
         std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 1, 1},
                                                            {3, 3, 2},
                                                            {37, 5, 3},
                                                            {5, 11, 4},
                                                            {9, 2, 5},
                                                            {17, 3, 8},
                                                            {6, 1, 9},
                                                            {130, 7, 1},
                                                            {300, 16, 6},
                                                            {33, 2, 40}}) {
      if (dtype == DType::kBF16) {
        CheckFast(dtype, rows, blocks * 37, tokens);  // cols not a multiple of 32
      } else {
        CheckFast(dtype, rows, k_quant ? (blocks + 1) / 2 : blocks, tokens);
      }
      if (HasFailure()) return;
    }
  }
}

// Where the CPU has the instructions (this runs on every CPU; the assertions differ), kFast on
// a larger random matrix stays within the activation rounding of kExact: the relative error of
// int8 activations is about 1/254 per value, of bf16 2^-9.
TEST_P(FastKernelTest, CloseToExactOnModelSizedMatrices) {
  const int64_t rows = 512, cols = 2048;
  for (DType dtype : {DType::kQ8_0, DType::kQ4_0, DType::kQ4_1, DType::kQ5_0, DType::kQ5_1,
                      DType::kQ4_K, DType::kQ5_K, DType::kQ6_K, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    const std::vector<uint8_t> bytes =
        testing::PatternTensorBytes(GgmlTypeOf(dtype), rows * cols, 11);
    const WeightMatrix w{bytes.data(), dtype, rows, cols, cols};
    for (int64_t tokens : {1, 8, 64}) {
      const std::vector<float> x = RandomFloats(tokens * cols, 5);
      std::vector<float> fast(tokens * rows), exact(tokens * rows);
      MatMul(w, x.data(), tokens, fast.data());
      SetMatMulMode(MatMulMode::kExact);
      MatMul(w, x.data(), tokens, exact.data());
      SetMatMulMode(MatMulMode::kFast);
      double err = 0, norm = 0;
      for (size_t i = 0; i < fast.size(); ++i) {
        err += (double{fast[i]} - exact[i]) * (double{fast[i]} - exact[i]);
        norm += double{exact[i]} * exact[i];
      }
      EXPECT_LE(std::sqrt(err / norm), 0.01) << "tokens=" << tokens;
    }
  }
}

TEST(MatMulModeTest, ParsesAndSets) {
  MatMulMode mode = MatMulMode::kFast;
  EXPECT_TRUE(ParseMatMulMode("EXACT", &mode));
  EXPECT_EQ(mode, MatMulMode::kExact);
  EXPECT_TRUE(ParseMatMulMode("fast", &mode));
  EXPECT_EQ(mode, MatMulMode::kFast);
  EXPECT_FALSE(ParseMatMulMode("turbo", &mode));
  EXPECT_EQ(mode, MatMulMode::kFast);
  SetMatMulMode(MatMulMode::kExact);
  EXPECT_EQ(GetMatMulMode(), MatMulMode::kExact);
}

}  // namespace
}  // namespace moe::kernels
