#include "common/rpc/rpc_util.h"

#include "gtest/gtest.h"

namespace moe {
namespace {

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
