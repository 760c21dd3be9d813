#include "tests/testutil/golden_fixture.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testutil/checkpoint_writer.h"

namespace moe::testing {
namespace {

using ::testing::HasSubstr;

// A fixture directory with TinyShape's config (vocab 32) and the given reference files.
std::string Fixture(const std::string& name, const std::string& json,
                    const std::vector<FakeTensor>& tensors) {
  const std::string dir = TempDir(name);
  WriteText(dir + "/config.json", TinyModelConfig(TinyShape{}));
  WriteText(dir + "/expected.json", json);
  WriteFile(dir + "/expected.safetensors", SafetensorsImage(tensors));
  return dir;
}

const char kJson[] = R"({"prompt_ids": [1, 5, 9], "greedy_ids": [4, 2]})";

std::vector<FakeTensor> Tensors(int64_t prompt, int64_t greedy) {
  return {{"logits", DType::kF32, {prompt, 32}, {}},
          {"decode_logits", DType::kF32, {greedy, 32}, {}}};
}

TEST(GoldenFixtureTest, LoadsACommittedFixture) {
  auto e = LoadExpected("tests/testdata/models/llama_dense");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->prompt.size(), 25u);
  EXPECT_EQ(e->greedy.size(), 16u);
  EXPECT_EQ(e->logits.size(), 25u * 1000);
  EXPECT_EQ(e->decode_logits.size(), 16u * 1000);
}

TEST(GoldenFixtureTest, ChecksEveryRead) {
  auto ok = LoadExpected(Fixture("ok", kJson, Tensors(3, 2)));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_THAT(ok->prompt, ::testing::ElementsAre(1, 5, 9));
  EXPECT_EQ(ok->logits.size(), 3u * 32);

  EXPECT_THAT(
      LoadExpected(Fixture("bad_json", "{\"prompt_ids\": [1,", Tensors(3, 2))).status().message(),
      HasSubstr("not a JSON object"));
  EXPECT_THAT(LoadExpected(Fixture("no_greedy", R"({"prompt_ids": [1]})", Tensors(1, 2)))
                  .status()
                  .message(),
              HasSubstr("greedy_ids must be a non-empty list"));
  EXPECT_THAT(
      LoadExpected(Fixture("strings", R"({"prompt_ids": ["a"], "greedy_ids": [1]})", Tensors(1, 1)))
          .status()
          .message(),
      HasSubstr("prompt_ids holds a non-integer"));
  EXPECT_THAT(LoadExpected(Fixture("rows", kJson, Tensors(4, 2))).status().message(),
              HasSubstr("logits must be [3, 32] F32, got [4, 32] F32"));
  EXPECT_THAT(LoadExpected(Fixture("missing", kJson, {{"logits", DType::kF32, {3, 32}, {}}}))
                  .status()
                  .code(),
              absl::StatusCode::kNotFound);
  EXPECT_EQ(LoadExpected(TempDir("empty")).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace moe::testing
