#include "common/safetensors.h"

#include <cstring>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testutil/checkpoint_writer.h"

namespace moe {
namespace {

using testing::FakeTensor;
using ::testing::HasSubstr;
using testing::RawImage;
using testing::SafetensorsImage;
using testing::TempDir;
using testing::WriteFile;
using testing::WriteText;

std::vector<FakeTensor> TwoTensors() {
  return {{"a", DType::kF32, {2, 3}, {}}, {"b", DType::kBF16, {5}, {}}};
}

absl::Status ParseStatus(const std::vector<uint8_t>& image) {
  return ParseSafetensorsImage(image.data(), image.size(), "x.safetensors").status();
}

TEST(SafetensorsTest, ParsesAndMapsTensors) {
  const std::string dir = TempDir("ok");
  std::vector<FakeTensor> tensors = TwoTensors();
  tensors[0].bytes.resize(24);
  for (int i = 0; i < 6; ++i) {
    const float v = i * 1.5f;
    std::memcpy(&tensors[0].bytes[i * 4], &v, 4);
  }
  WriteFile(dir + "/model.safetensors", SafetensorsImage(tensors));
  auto store = TensorStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_THAT((*store)->TensorNames(), ::testing::ElementsAre("a", "b"));
  const TensorInfo* b = (*store)->Find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kBF16);
  EXPECT_EQ(b->shape, std::vector<int64_t>({5}));
  EXPECT_EQ(b->byte_size, 10u);
  EXPECT_EQ((*store)->mapped_tensor_bytes(), 0u);
  auto a = (*store)->Map("a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(static_cast<const float*>(a->data)[5], 7.5f);
  EXPECT_EQ((*store)->mapped_tensor_bytes(), 24u);
  EXPECT_EQ((*store)->mapped_tensor_count(), 1u);
  EXPECT_EQ((*store)->Map("missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, ShardedIndex) {
  const std::string dir = TempDir("sharded");
  WriteFile(dir + "/s1.safetensors", SafetensorsImage({{"a", DType::kF32, {2}, {}}}));
  WriteFile(dir + "/s2.safetensors", SafetensorsImage({{"b", DType::kF16, {3}, {}}}));
  WriteText(dir + "/model.safetensors.index.json",
            R"({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  auto store = TensorStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_NE((*store)->Find("a"), nullptr);
  EXPECT_EQ((*store)->Find("b")->dtype, DType::kF16);
}

TEST(SafetensorsTest, IndexNamingATensorTheShardLacks) {
  const std::string dir = TempDir("badindex");
  WriteFile(dir + "/s1.safetensors", SafetensorsImage({{"a", DType::kF32, {2}, {}}}));
  WriteText(dir + "/model.safetensors.index.json",
            R"({"weight_map": {"a": "s1.safetensors", "zz": "s1.safetensors"}})");
  absl::Status s = TensorStore::Open(dir).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("zz"));
}

TEST(SafetensorsTest, IndexPathEscapeRejected) {
  const std::string dir = TempDir("escape");
  WriteText(dir + "/model.safetensors.index.json", R"({"weight_map": {"a": "../x.safetensors"}})");
  EXPECT_THAT(TensorStore::Open(dir).status().message(), HasSubstr("plain file name"));
}

TEST(SafetensorsTest, DuplicateTensorAcrossShards) {
  const std::string dir = TempDir("dup");
  WriteFile(dir + "/a.safetensors", SafetensorsImage({{"a", DType::kF32, {2}, {}}}));
  WriteFile(dir + "/b.safetensors", SafetensorsImage({{"a", DType::kF32, {2}, {}}}));
  EXPECT_THAT(TensorStore::Open(dir).status().message(), HasSubstr("appears in both"));
}

TEST(SafetensorsTest, TruncatedFile) {
  const std::string dir = TempDir("trunc");
  std::vector<uint8_t> image = SafetensorsImage(TwoTensors());
  image.resize(image.size() - 3);
  WriteFile(dir + "/model.safetensors", image);
  absl::Status s = TensorStore::Open(dir).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model.safetensors"));
  EXPECT_THAT(s.message(), HasSubstr("truncated"));
}

TEST(SafetensorsTest, HeaderLengthPastEndOfFile) {
  std::vector<uint8_t> image = RawImage("{}", 0);
  image[0] = 0xff;  // claims a 255-byte header in a 10-byte file
  absl::Status s = ParseStatus(image);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("runs past the end of the file"));
  const std::string dir = TempDir("hdr");
  WriteFile(dir + "/model.safetensors", image);
  EXPECT_THAT(TensorStore::Open(dir).status().message(), HasSubstr("runs past the end"));
}

TEST(SafetensorsTest, HeaderOver100MB) {
  std::vector<uint8_t> image(16, 0);
  const uint64_t n = (100ull << 20) + 1;
  for (int i = 0; i < 8; ++i) image[i] = static_cast<uint8_t>(n >> (8 * i));
  EXPECT_THAT(ParseStatus(image).message(), HasSubstr("100 MB"));
}

TEST(SafetensorsTest, TooShort) {
  EXPECT_THAT(ParseStatus({1, 2, 3}).message(), HasSubstr("too short"));
}

struct BadHeader {
  const char* name;
  std::string json;
  size_t data_bytes;
  const char* message;
};

class BadHeaderTest : public ::testing::TestWithParam<BadHeader> {};

TEST_P(BadHeaderTest, RejectedWithClearMessage) {
  const BadHeader& c = GetParam();
  absl::Status s = ParseStatus(RawImage(c.json, c.data_bytes));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr(c.message));
  EXPECT_THAT(s.message(), HasSubstr("x.safetensors"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadHeaderTest,
    ::testing::Values(
        BadHeader{"NotJson", "{not json", 0, "not valid JSON"},
        BadHeader{"NotObject", "[1, 2]", 0, "not a JSON object"},
        BadHeader{"Overlap",
                  R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                  12, "overlap"},
        BadHeader{"Gap",
                  R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                  12, "gap"},
        BadHeader{"SpanMismatch",
                  R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8,
                  "needs 12 bytes"},
        BadHeader{"PastEnd", R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8,
                  "truncated"},
        BadHeader{"UnknownDtype", R"({"a": {"dtype": "I4", "shape": [1], "data_offsets": [0, 1]}})",
                  1, "unsupported dtype"},
        BadHeader{"NegativeDim",
                  R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})", 0,
                  "non-negative"},
        BadHeader{
            "ShapeOverflow",
            R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 0]}})",
            0, "overflow"},
        BadHeader{"EndBeforeBegin",
                  R"({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8,
                  "end < begin"},
        BadHeader{"MissingOffsets", R"({"a": {"dtype": "F32", "shape": [1]}})", 4, "data_offsets"}),
    [](const ::testing::TestParamInfo<BadHeader>& info) { return info.param.name; });

TEST(SafetensorsTest, MissingDirectoryAndFiles) {
  EXPECT_EQ(TensorStore::Open("/nonexistent/dir").status().code(), absl::StatusCode::kNotFound);
  const std::string dir = TempDir("empty");
  absl::Status s = TensorStore::Open(dir).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("no model.safetensors"));
}

TEST(SafetensorsTest, RandomCorruptionNeverCrashes) {
  // A cheap in-test fuzz loop over byte flips of a valid image: every outcome is OK or a clean
  // error (tests/fuzz/ has the libFuzzer target for deeper runs).
  const std::vector<uint8_t> valid = SafetensorsImage(TwoTensors());
  uint32_t seed = 1;
  for (int i = 0; i < 3000; ++i) {
    std::vector<uint8_t> image = valid;
    for (int flips = 0; flips < 3; ++flips) {
      seed = seed * 1664525u + 1013904223u;
      image[seed % image.size()] = static_cast<uint8_t>(seed >> 24);
    }
    seed = seed * 1664525u + 1013904223u;
    if (i % 4 == 0) image.resize(seed % image.size());
    auto r = ParseSafetensorsImage(image.data(), image.size(), "f");
    if (r.ok()) {
      for (const TensorInfo& t : *r) EXPECT_LE(t.file_offset + t.byte_size, image.size());
    }
  }
}

}  // namespace
}  // namespace moe
