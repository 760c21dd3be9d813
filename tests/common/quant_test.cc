// Dequantization against the `gguf` package's numpy reference (a committed fixture written by
// tools/fixtures/gen_gguf_quant.py), and MatMul on quantized weights against a naive
// dequantize-then-dot loop, under every Highway target the CPU has.
#include "common/quant.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/gguf_model.h"
#include "common/kernels.h"
#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "hwy/targets.h"
#include "tests/testutil/gguf_writer.h"

namespace moe {
namespace {

constexpr char kQuantFixture[] = "tests/testdata/gguf/quant_types.gguf";
constexpr char kQuantExpected[] = "tests/testdata/gguf/quant_types_expected.safetensors";

// Every dtype the engine computes with (ggml ids: GgmlTypeOf).
const DType kTypes[] = {DType::kF32,  DType::kF16,  DType::kBF16, DType::kQ8_0,
                        DType::kQ4_0, DType::kQ4_1, DType::kQ5_0, DType::kQ5_1,
                        DType::kQ4_K, DType::kQ5_K, DType::kQ6_K};

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Every tensor of the fixture, dequantized row by row, equals gguf's dequantization bit for bit.
TEST(QuantTest, DequantizationEqualsTheGgufPackageBitForBit) {
  auto file = GgufFile::Open(kQuantFixture);
  ASSERT_TRUE(file.ok()) << file.status();
  auto expected = TensorStore::OpenFiles({kQuantExpected});
  ASSERT_TRUE(expected.ok()) << expected.status();
  int checked = 0;
  for (const GgufTensorInfo& t : (*file)->header().tensors) {
    SCOPED_TRACE(t.name);
    const std::optional<DType> dtype = DTypeOfGgmlType(t.type_id);
    ASSERT_TRUE(dtype.has_value()) << "fixture tensor of an unexpected type " << t.type->name;
    auto ref = (*expected)->Map(t.name);
    ASSERT_TRUE(ref.ok()) << ref.status();
    ASSERT_EQ(ref->info->num_elements, t.rows() * t.row_elements());
    const float* want = static_cast<const float*>(ref->data);
    std::vector<float> got(t.row_elements());
    int64_t mismatches = 0;
    for (int64_t r = 0; r < t.rows(); ++r) {
      DequantizeRow((*file)->Data(t, r * t.row_bytes()), *dtype, t.row_elements(), got.data());
      for (int64_t i = 0; i < t.row_elements(); ++i) {
        if (Bits(got[i]) != Bits(want[r * t.row_elements() + i]) && mismatches++ < 5) {
          ADD_FAILURE() << "row " << r << " value " << i << ": " << got[i] << " vs "
                        << want[r * t.row_elements() + i];
        }
      }
    }
    EXPECT_EQ(mismatches, 0);
    ++checked;
  }
  EXPECT_GE(checked, 11);  // one tensor per type at least
}

// Layouts written out by hand (independent of the fixture): Q8_0 and Q4_0 blocks.
TEST(QuantTest, HandBuiltBlocks) {
  uint8_t q8[34];
  const uint16_t half = F32ToF16(0.5f);
  std::memcpy(q8, &half, 2);
  for (int i = 0; i < 32; ++i) q8[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(i - 16));
  float out[32];
  DequantizeRow(q8, DType::kQ8_0, 32, out);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(out[i], 0.5f * static_cast<float>(i - 16)) << i;

  uint8_t q4[18];
  std::memcpy(q4, &half, 2);
  for (int i = 0; i < 16; ++i) q4[2 + i] = static_cast<uint8_t>(i | ((15 - i) << 4));
  DequantizeRow(q4, DType::kQ4_0, 32, out);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(out[i], 0.5f * static_cast<float>(i - 8)) << i;            // low nibbles first
    EXPECT_EQ(out[i + 16], 0.5f * static_cast<float>(7 - i)) << i + 16;  // then high nibbles
  }
}

class QuantMatMulTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override { hwy::SetSupportedTargetsForTest(GetParam()); }
  void TearDown() override { hwy::SetSupportedTargetsForTest(0); }
};

// MatMul on quantized weights = the dot of x with the dequantized rows (double reference),
// within f32 accumulation error, on awkward row/token counts and row strides.
TEST_P(QuantMatMulTest, EqualsDequantizeThenDot) {
  for (const DType dtype : kTypes) {
    if (!IsQuantized(dtype)) continue;
    const int64_t block = DTypeBlockElements(dtype);
    for (const auto& [rows, blocks, tokens] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {1, 1, 1}, {3, 2, 2}, {37, 3, 5}, {5, 11, 17}, {130, 1, 4}}) {
      const int64_t cols = blocks * block;
      const int64_t row_stride = cols + block;  // one block of padding per row
      SCOPED_TRACE(std::string(DTypeName(dtype)) + " rows=" + std::to_string(rows) +
                   " cols=" + std::to_string(cols) + " tokens=" + std::to_string(tokens));
      const std::vector<uint8_t> bytes = testing::PatternTensorBytes(
          GgmlTypeOf(dtype), rows * row_stride, static_cast<uint32_t>(rows + cols));
      const kernels::WeightMatrix w{bytes.data(), dtype, rows, cols, row_stride};
      std::mt19937 rng(static_cast<uint32_t>(tokens));
      std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
      std::vector<float> x(tokens * cols);
      for (float& v : x) v = dist(rng);
      std::vector<float> y(tokens * rows, 123.0f);
      kernels::MatMul(w, x.data(), tokens, y.data());
      std::vector<float> row(cols);
      double worst = 0;
      for (int64_t r = 0; r < rows; ++r) {
        DequantizeRow(w.Row(r), dtype, cols, row.data());
        for (int64_t t = 0; t < tokens; ++t) {
          double ref = 0, mag = 0;
          for (int64_t c = 0; c < cols; ++c) {
            ref += double{row[c]} * x[t * cols + c];
            mag += std::abs(double{row[c]} * x[t * cols + c]);
          }
          worst = std::max(worst, std::abs(y[t * rows + r] - ref) / (mag + 1e-30));
        }
      }
      EXPECT_LE(worst, 1e-5);
    }
  }
}

// The SIMD dequantization (ConvertToF32, used by MatMul) gives DequantizeRow's bits on every
// target, for every type, on the gguf fixture and on synthetic blocks.
TEST_P(QuantMatMulTest, SimdDequantizationEqualsTheReferenceBitForBit) {
  auto file = GgufFile::Open(kQuantFixture);
  ASSERT_TRUE(file.ok()) << file.status();
  for (const DType dtype : kTypes) {
    SCOPED_TRACE(DTypeName(dtype));
    std::vector<std::vector<uint8_t>> inputs;
    inputs.push_back(testing::PatternTensorBytes(GgmlTypeOf(dtype), 1024, 3));
    for (const GgufTensorInfo& t : (*file)->header().tensors) {
      if (t.type_id != GgmlTypeOf(dtype)) continue;
      const uint8_t* data = (*file)->Data(t);
      inputs.emplace_back(data, data + t.byte_size);
    }
    for (const std::vector<uint8_t>& bytes : inputs) {
      const int64_t n =
          static_cast<int64_t>(bytes.size()) / DTypeBlockBytes(dtype) * DTypeBlockElements(dtype);
      std::vector<float> simd(n), reference(n);
      kernels::ConvertToF32(bytes.data(), dtype, n, simd.data());
      DequantizeRow(bytes.data(), dtype, n, reference.data());
      ASSERT_EQ(std::memcmp(simd.data(), reference.data(), n * sizeof(float)), 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllTargets, QuantMatMulTest,
                         ::testing::ValuesIn(hwy::SupportedAndGeneratedTargets()),
                         [](const auto& info) { return std::string(hwy::TargetName(info.param)); });

}  // namespace
}  // namespace moe

namespace moe {
namespace {

// Q8_0 quantization is ggml's reference, bit for bit as the gguf package writes it.
TEST(QuantizeTest, Q8_0EqualsTheGgufPackageBitForBit) {
  auto file = GgufFile::Open(kQuantFixture);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufTensorInfo* source = (*file)->FindTensor("source_f32");
  const GgufTensorInfo* want = (*file)->FindTensor("q8_0_from_f32");
  ASSERT_TRUE(source != nullptr && want != nullptr);
  std::vector<float> row(source->row_elements());
  std::vector<uint8_t> got(want->row_bytes());
  for (int64_t r = 0; r < source->rows(); ++r) {
    std::memcpy(row.data(), (*file)->Data(*source, r * source->row_bytes()), row.size() * 4);
    QuantizeRow(row.data(), source->row_elements(), DType::kQ8_0, got.data());
    EXPECT_EQ(std::memcmp(got.data(), (*file)->Data(*want, r * want->row_bytes()), got.size()), 0)
        << "row " << r;
  }
}

// Quantize then dequantize stays within the format's step: per block, |x - x'| <= about half a
// quantization step (of the block's largest magnitude / range), on awkward data.
TEST(QuantizeTest, RoundTripErrorIsBoundedForEveryQuantizeType) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> rows;
  for (float scale : {1.0f, 1e-3f, 50.0f}) {
    std::vector<float> r(512);
    for (float& v : r) v = normal(rng) * scale;
    rows.push_back(r);
  }
  rows.push_back(std::vector<float>(512, 0.0f));    // all zero
  rows.push_back(std::vector<float>(512, -0.25f));  // constant negative
  std::vector<float> spiky(512, 0.01f);
  spiky[7] = 40.0f;
  spiky[300] = -60.0f;
  rows.push_back(spiky);
  // Error per type: Q8_0 half of amax/127; Q4_K half a step of (range + dmin)/15 (plus the
  // scales' rounding up); Q6_K up to one step of amax/32 (a value as large as the sub-block's
  // largest but of the other sign lands on +31).
  const std::pair<DType, float> types[] = {
      {DType::kQ8_0, 0.5f / 127}, {DType::kQ4_K, 0.6f / 15}, {DType::kQ6_K, 1.05f / 32}};
  for (const auto& [dtype, step] : types) {
    SCOPED_TRACE(DTypeName(dtype));
    ASSERT_TRUE(CanQuantizeTo(dtype));
    for (const std::vector<float>& x : rows) {
      std::vector<uint8_t> q(DTypeBytes(dtype, 512));
      QuantizeRow(x.data(), 512, dtype, q.data());
      std::vector<float> back(512);
      DequantizeRow(q.data(), dtype, 512, back.data());
      float amax = 0, worst = 0;
      for (int i = 0; i < 512; ++i) {
        amax = std::max(amax, std::fabs(x[i]));
        worst = std::max(worst, std::fabs(back[i] - x[i]));
      }
      // The bound over the whole row: a block's own largest value is at most amax; Q4_K's
      // range can be twice amax.
      const float range = dtype == DType::kQ4_K ? 2 * amax : amax;
      // Q8_0 stores d = amax / 127 rounded to a half as ggml does: below 2^-14 (the smallest
      // normal half) its rounding error, up to 2^-25, is multiplied by up to 127.
      const float half_rounding = dtype == DType::kQ8_0 ? 127.0f * 0x1.0p-25f : 0.0f;
      EXPECT_LE(worst, step * range * 1.02f + half_rounding + 1e-7f) << "amax " << amax;
    }
  }
  EXPECT_FALSE(CanQuantizeTo(DType::kQ4_0));
  EXPECT_FALSE(CanQuantizeTo(DType::kBF16));
}

TEST(QuantizeTest, ParseQuantizeFlag) {
  EXPECT_EQ(*ParseQuantizeFlag(""), std::nullopt);
  EXPECT_EQ(*ParseQuantizeFlag("q8_0"), DType::kQ8_0);
  EXPECT_EQ(*ParseQuantizeFlag("Q4_K"), DType::kQ4_K);
  EXPECT_EQ(*ParseQuantizeFlag("q6_k"), DType::kQ6_K);
  const auto bad = ParseQuantizeFlag("q5_0");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), ::testing::HasSubstr("not one of q8_0, q4_k, q6_k"));
}

}  // namespace
}  // namespace moe
