#include "common/api_tokens.h"

#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

std::string WriteTokens(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path) << text;
  return path;
}

TEST(ApiTokensTest, AcceptsOnlyItsBearerTokens) {
  auto tokens = ApiTokens::Load(
      WriteTokens("tokens", "# team A\n  0123456789abcdef0123  \n\nfedcba9876543210fedc\n"));
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_TRUE(tokens->Accepts("Bearer 0123456789abcdef0123"));
  EXPECT_TRUE(tokens->Accepts("bearer fedcba9876543210fedc"));  // scheme case-insensitive
  EXPECT_FALSE(tokens->Accepts(""));
  EXPECT_FALSE(tokens->Accepts("Bearer "));
  EXPECT_FALSE(tokens->Accepts("0123456789abcdef0123"));  // no scheme
  EXPECT_FALSE(tokens->Accepts("Basic 0123456789abcdef0123"));
  EXPECT_FALSE(tokens->Accepts("Bearer 0123456789abcdef012"));    // a prefix
  EXPECT_FALSE(tokens->Accepts("Bearer 0123456789abcdef01234"));  // longer
  EXPECT_FALSE(tokens->Accepts("Bearer 0123456789abcdef0124"));   // last character
  EXPECT_FALSE(tokens->Accepts("Bearer # team A"));               // comments are not tokens
  auto first =
      ApiTokens::LoadFirst(WriteTokens("first", "# x\nabcdefghijklmnopq\nzzzzzzzzzzzzzzzz\n"));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, "abcdefghijklmnopq");
}

TEST(ApiTokensTest, RefusesFilesWithoutUsableTokens) {
  EXPECT_EQ(ApiTokens::Load("/nonexistent/tokens").status().code(), absl::StatusCode::kNotFound);
  auto empty = ApiTokens::Load(WriteTokens("empty", "# only a comment\n\n"));
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.status().message(), HasSubstr("holds no token"));
  auto short_token = ApiTokens::Load(WriteTokens("short", "abc\n"));
  EXPECT_THAT(short_token.status().message(), HasSubstr(":1: a token must be at least 16"));
  auto spaced = ApiTokens::Load(WriteTokens("spaced", "0123456789 abcdef0123\n"));
  EXPECT_EQ(spaced.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moe
