#include "common/rpc/rpc_util.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

namespace pb = moecluster::v1;

// F32 rows round-trip exactly; BF16 rows come back rounded to nearest even (ties to even, NaN
// and infinities kept), in half the bytes.
TEST(RpcUtilTest, RowsTensorsInF32AndBf16) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> x = {1.0f,
                                -2.5f,
                                1.00390625f /* 1 + 2^-8: a tie, to 1 */,
                                1.01171875f /* 1 + 3 * 2^-8: a tie, up to 1 + 2^-6 */,
                                3.14159265f,
                                inf,
                                -0.0f,
                                1e-40f};
  pb::Tensor t;
  std::vector<float> back(x.size());
  EncodeRowsTensor(x.data(), 2, 4, pb::DTYPE_F32, &t);
  ASSERT_TRUE(CheckRowsTensor(t, 2, 4, "rows").ok());
  EXPECT_EQ(t.dtype(), pb::DTYPE_F32);
  EXPECT_EQ(t.data().size(), x.size() * 4);
  DecodeRowsTensor(t, back.data());
  EXPECT_EQ(back, x);

  EncodeRowsTensor(x.data(), 2, 4, pb::DTYPE_BF16, &t);
  EXPECT_EQ(t.data().size(), x.size() * 2);
  ASSERT_TRUE(CheckRowsTensor(t, 2, 4, "rows").ok());
  EXPECT_EQ(t.dtype(), pb::DTYPE_BF16);
  DecodeRowsTensor(t, back.data());
  const std::vector<float> rounded = {1.0f, -2.5f, 1.0f, 1.015625f, 3.140625f, inf, -0.0f, back[7]};
  EXPECT_EQ(back, rounded);
  EXPECT_TRUE(std::signbit(back[6]));
  EXPECT_LE(std::fabs(back[7] - 1e-40f), std::ldexp(1.0f, -134));  // half a bf16 subnormal step

  t.mutable_data()->resize(15);
  EXPECT_THAT(std::string(CheckRowsTensor(t, 2, 4, "rows").message()),
              ::testing::HasSubstr("rows: 15 bytes for shape [2, 4] BF16, expected 16"));
  t.set_dtype(pb::DTYPE_F16);
  EXPECT_THAT(std::string(CheckRowsTensor(t, 2, 4, "rows").message()),
              ::testing::HasSubstr("rows: dtype must be F32 or BF16, got DTYPE_F16"));
}

TEST(RpcUtilTest, LoopbackAddresses) {
  for (const char* a : {"127.0.0.1:50051", "127.1.2.3:0", "localhost:8000", "[::1]:9400"}) {
    EXPECT_TRUE(IsLoopbackAddress(a)) << a;
  }
  for (const char* a :
       {"0.0.0.0:50061", "10.0.0.5:50061", "[::]:8000", "example.com:80", "128.0.0.1:1"}) {
    EXPECT_FALSE(IsLoopbackAddress(a)) << a;
  }
}

TEST(RpcUtilTest, ListenAddressesAreChecked) {
  EXPECT_TRUE(ValidateListenAddress("0.0.0.0:50061", "listen").ok());
  EXPECT_FALSE(ValidateListenAddress("50061", "listen").ok());
  EXPECT_FALSE(ValidateListenAddress("host:99999", "listen").ok());
}

}  // namespace
}  // namespace moe
