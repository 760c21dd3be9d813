#include "common/expert_range.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

TEST(ExpertRangeTest, SizeContainsAndSpelling) {
  const ExpertRange r{2, 5};
  EXPECT_EQ(r.size(), 3);
  EXPECT_FALSE(r.empty());
  EXPECT_FALSE(r.Contains(1));
  EXPECT_TRUE(r.Contains(2));
  EXPECT_TRUE(r.Contains(4));
  EXPECT_FALSE(r.Contains(5));
  EXPECT_EQ(r.ToString(), "[2, 5)");
  EXPECT_EQ(r.InclusiveSpelling(), "2-4");
  EXPECT_EQ((ExpertRange{7, 8}).InclusiveSpelling(), "7");
  EXPECT_TRUE((ExpertRange{}).empty());
  EXPECT_TRUE((ExpertRange{4, 2}).empty());  // reversed counts as empty, never negative
  EXPECT_EQ((ExpertRange{4, 2}).size(), 0);
}

TEST(ExpertRangeTest, ParsesInclusiveRangesSinglesAndAll) {
  struct Case {
    const char* spec;
    int64_t begin, end;
  };
  for (const Case& c : {Case{"0-3", 0, 4}, Case{"5", 5, 6}, Case{"0-31", 0, 32}, Case{"31", 31, 32},
                        Case{"7-7", 7, 8}, Case{"all", 0, 32}}) {
    auto parsed = ParseExpertRange(c.spec);
    ASSERT_TRUE(parsed.ok()) << c.spec << ": " << parsed.status();
    auto resolved = ResolveExpertRange(*parsed, 32);
    ASSERT_TRUE(resolved.ok()) << c.spec << ": " << resolved.status();
    EXPECT_EQ(resolved->begin, c.begin) << c.spec;
    EXPECT_EQ(resolved->end, c.end) << c.spec;
  }
}

TEST(ExpertRangeTest, RejectsGarbageAndReversedRanges) {
  struct Case {
    const char* spec;
    const char* message;
  };
  for (const Case& c :
       {Case{"3-1", "the range is reversed"}, Case{"a-b", "not a range of expert ids"},
        Case{"", "not an expert id"}, Case{"-1", "not a range"}, Case{"1-", "not a range"},
        Case{"+3", "not an expert id"}, Case{" 3", "not an expert id"},
        Case{"0-3-5", "not a range"}, Case{"ALL", "not an expert id"},
        Case{"99999999999", "not an expert id"}}) {
    auto parsed = ParseExpertRange(c.spec);
    ASSERT_FALSE(parsed.ok()) << c.spec;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << c.spec;
    EXPECT_THAT(parsed.status().message(), HasSubstr(c.message)) << c.spec;
    EXPECT_THAT(parsed.status().message(), HasSubstr("--experts")) << c.spec;
  }
}

TEST(ExpertRangeTest, RejectsRangesBeyondTheModel) {
  for (const char* spec : {"0-40", "32", "31-32"}) {
    auto parsed = ParseExpertRange(spec);
    ASSERT_TRUE(parsed.ok()) << spec;  // syntax is fine; the model decides
    auto resolved = ResolveExpertRange(*parsed, 32);
    ASSERT_FALSE(resolved.ok()) << spec;
    EXPECT_EQ(resolved.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(resolved.status().message(),
                HasSubstr(std::string("--experts ") + spec +
                          " is outside the model's 32 experts (ids 0-31)"));
  }
  EXPECT_FALSE(ResolveExpertRange({5, 5}, 32).ok());
}

}  // namespace
}  // namespace moe
