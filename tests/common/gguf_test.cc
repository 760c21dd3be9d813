#include "common/gguf.h"

#include <cstring>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testutil/checkpoint_writer.h"
#include "tests/testutil/gguf_writer.h"

namespace moe {
namespace {

using ::testing::ElementsAre;
using testing::GgufBuilder;
using ::testing::HasSubstr;

constexpr uint32_t kF32 = 0, kF16 = 1, kQ8_0 = 8, kQ4_K = 12;

std::vector<uint8_t> Bytes(size_t n, uint8_t fill = 0) { return std::vector<uint8_t>(n, fill); }

GgufBuilder ValidBuilder() {
  GgufBuilder b;
  b.String("general.architecture", "llama")
      .U32("llama.block_count", 2)
      .F32("llama.rope.freq_base", 10000.0f)
      .Bool("tokenizer.ggml.add_bos_token", true)
      .StringArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "\xe2\x96\x81the"})
      .F32Array("tokenizer.ggml.scores", {0.0f, 0.0f, 0.0f, -1.5f})
      .I32Array("tokenizer.ggml.token_type", {2, 3, 3, 1})
      .Tensor("token_embd.weight", {64, 4}, kF16, Bytes(64 * 4 * 2, 1))
      .Tensor("blk.0.ffn_gate_exps.weight", {256, 3, 2}, kQ4_K, Bytes(3 * 2 * 144, 2))
      .Tensor("output_norm.weight", {64}, kF32, Bytes(256, 3));
  return b;
}

absl::StatusOr<GgufHeader> Parse(const std::vector<uint8_t>& image) {
  return ParseGgufImage(image.data(), image.size(), "test.gguf");
}

TEST(GgufTest, ParsesMetadataAndTensors) {
  const std::vector<uint8_t> image = ValidBuilder().Build();
  auto h = Parse(image);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->version, 3u);
  EXPECT_EQ(h->alignment, 32u);
  EXPECT_EQ(h->data_offset % 32, 0u);
  ASSERT_EQ(h->tensors.size(), 3u);
  const GgufTensorInfo& experts = h->tensors[1];
  EXPECT_EQ(experts.name, "blk.0.ffn_gate_exps.weight");
  EXPECT_THAT(experts.dims, ElementsAre(256, 3, 2));
  EXPECT_EQ(experts.type->name, "Q4_K");
  EXPECT_EQ(experts.rows(), 6);
  EXPECT_EQ(experts.row_bytes(), 144u);
  EXPECT_EQ(experts.byte_size, 6u * 144);
  // Tensors are packed at aligned offsets in order; their bytes are where the file says.
  EXPECT_EQ(h->tensors[0].file_offset, h->data_offset);
  EXPECT_EQ(experts.file_offset, h->data_offset + 512);
  EXPECT_EQ(image[experts.file_offset], 2);
  EXPECT_EQ(image[h->tensors[2].file_offset], 3);
  EXPECT_EQ(h->metadata.at("llama.block_count").u, 2u);
  EXPECT_EQ(h->metadata.at("tokenizer.ggml.tokens").array.size(), 4u);
}

TEST(GgufTest, FileGettersCheckTypesAndNameTheKey) {
  const std::string dir = testing::TempDir("gguf_getters");
  testing::WriteFile(dir + "/m.gguf", ValidBuilder().Version(2).Build());
  auto f = GgufFile::Open(dir + "/m.gguf");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->header().version, 2u);
  EXPECT_EQ(*(*f)->GetString("general.architecture"), "llama");
  EXPECT_EQ(*(*f)->GetUint("llama.block_count"), 2u);
  EXPECT_EQ(*(*f)->GetInt("llama.block_count"), 2);
  EXPECT_EQ(*(*f)->GetFloat("llama.rope.freq_base"), 10000.0);
  EXPECT_TRUE(*(*f)->GetBool("tokenizer.ggml.add_bos_token"));
  EXPECT_THAT(*(*f)->GetStringArray("tokenizer.ggml.tokens"),
              ElementsAre("<unk>", "<s>", "</s>", "\xe2\x96\x81the"));
  EXPECT_THAT(*(*f)->GetFloatArray("tokenizer.ggml.scores"), ElementsAre(0, 0, 0, -1.5));
  EXPECT_THAT(*(*f)->GetIntArray("tokenizer.ggml.token_type"), ElementsAre(2, 3, 3, 1));
  const auto missing = (*f)->GetUint("llama.expert_count");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("llama.expert_count is missing"));
  const auto wrong = (*f)->GetUint("general.architecture");
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong.status().message(),
              HasSubstr("general.architecture is STRING, expected a non-negative integer"));
  EXPECT_FALSE((*f)->GetStringArray("tokenizer.ggml.scores").ok());
  const GgufTensorInfo* t = (*f)->FindTensor("output_norm.weight");
  ASSERT_NE(t, nullptr);
  const uint8_t* data = (*f)->Data(*t);
  EXPECT_THAT(std::vector<uint8_t>(data, data + 4), ::testing::ElementsAre(3, 3, 3, 3));
  EXPECT_EQ((*f)->FindTensor("nope"), nullptr);
  EXPECT_EQ(GgufFile::Open(dir + "/absent.gguf").status().code(), absl::StatusCode::kNotFound);
}

TEST(GgufTest, NonDefaultAlignmentIsHonoured) {
  GgufBuilder b;
  b.Alignment(64).Tensor("a", {32}, kQ8_0, Bytes(34)).Tensor("b", {32}, kQ8_0, Bytes(34));
  auto h = Parse(b.Build());
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->alignment, 64u);
  EXPECT_EQ(h->data_offset % 64, 0u);
  EXPECT_EQ(h->tensors[1].file_offset - h->tensors[0].file_offset, 64u);
}

struct BadCase {
  const char* name;
  std::vector<uint8_t> image;
  const char* message;
};

std::vector<BadCase> BadCases() {
  std::vector<BadCase> cases;
  const std::vector<uint8_t> valid = ValidBuilder().Build();
  std::vector<uint8_t> v = valid;
  v[0] = 'X';
  cases.push_back({"magic", v, "not a GGUF file"});
  cases.push_back(
      {"version 1", GgufBuilder().Version(1).Build(), "GGUF version 1 is not supported"});
  cases.push_back({"version 4", GgufBuilder().Version(4).Build(), "GGUF version 4"});
  cases.push_back({"empty", {}, "not a GGUF file"});
  cases.push_back({"header only", std::vector<uint8_t>(valid.begin(), valid.begin() + 12),
                   "truncated at byte 8 while reading the tensor count"});
  cases.push_back({"truncated data", std::vector<uint8_t>(valid.begin(), valid.end() - 10),
                   "tensor output_norm.weight: bytes ["});
  // Counts far beyond what the bytes can hold.
  v = GgufBuilder().Build();
  const uint64_t huge = uint64_t{1} << 60;
  std::memcpy(v.data() + 16, &huge, 8);
  cases.push_back({"metadata count", v, "cannot fit in a file of"});
  v = GgufBuilder().Build();
  std::memcpy(v.data() + 8, &huge, 8);
  cases.push_back({"tensor count", v, "cannot fit in a file of"});
  // A string length past the end of the file.
  std::vector<uint8_t> long_string(8);
  const uint64_t len = uint64_t{1} << 50;
  std::memcpy(long_string.data(), &len, 8);
  cases.push_back({"string length", GgufBuilder().RawValue("k", 8, long_string).Build(),
                   "string length 1125899906842624"});
  std::vector<uint8_t> long_array = {8, 0, 0, 0};  // array of strings
  long_array.resize(12);
  std::memcpy(long_array.data() + 4, &len, 8);
  cases.push_back({"array count", GgufBuilder().RawValue("k", 9, long_array).Build(),
                   "array of 1125899906842624 elements cannot fit"});
  std::vector<uint8_t> nested;
  for (int d = 0; d < 5; ++d) {
    const std::vector<uint8_t> level = {9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0};  // 1 array
    nested.insert(nested.end(), level.begin(), level.end());
  }
  cases.push_back(
      {"nesting", GgufBuilder().RawValue("k", 9, nested).Build(), "arrays nested deeper than 3"});
  // Arrays of uint8 (1 byte each) that fit in the file but together pass the element budget.
  const auto u8_array = [](uint64_t n) {
    std::vector<uint8_t> raw = {0, 0, 0, 0};  // element type UINT8
    for (int i = 0; i < 8; ++i) raw.push_back(static_cast<uint8_t>(n >> (8 * i)));
    raw.resize(raw.size() + n, 1);
    return raw;
  };
  cases.push_back({"array budget",
                   GgufBuilder()
                       .RawValue("a", 9, u8_array(kMaxGgufArrayElements / 2))
                       .RawValue("b", 9, u8_array(kMaxGgufArrayElements / 2 + 1))
                       .Build(),
                   "metadata b: array of 2097153 elements: the metadata's arrays hold more than "
                   "4194304 elements in all"});
  cases.push_back({"value type", GgufBuilder().RawValue("k", 13, {0}).Build(),
                   "metadata k: unknown value type 13"});
  cases.push_back({"bool 2", GgufBuilder().RawValue("k", 7, {2}).Build(), "bool value 2"});
  cases.push_back({"duplicate key", GgufBuilder().U32("k", 1).U32("k", 2).Build(),
                   "metadata key k appears twice"});
  cases.push_back({"alignment 3", GgufBuilder().U32("general.alignment", 3).Build(),
                   "general.alignment must be a UINT32 power of two"});
  cases.push_back({"alignment type", GgufBuilder().String("general.alignment", "32").Build(),
                   "general.alignment must be a UINT32 power of two"});
  cases.push_back({"unknown type", GgufBuilder().Tensor("w", {32}, 99, Bytes(64)).Build(),
                   "tensor w: unknown ggml type 99"});
  cases.push_back({"row not a block multiple",
                   GgufBuilder().Tensor("w", {48, 2}, kQ8_0, Bytes(200)).Build(),
                   "tensor w: row length 48 is not a multiple of Q8_0's block of 32"});
  cases.push_back({"zero dim", GgufBuilder().Tensor("w", {32, 0}, kF32, {}).Build(),
                   "tensor w: dimension 1 = 0"});
  cases.push_back({"five dims", GgufBuilder().Tensor("w", {1, 1, 1, 1, 1}, kF32, Bytes(4)).Build(),
                   "tensor w: 5 dimensions"});
  cases.push_back(
      {"huge dims",
       GgufBuilder().Tensor("w", {uint64_t{1} << 30, uint64_t{1} << 30}, kF32, Bytes(4)).Build(),
       "impossibly large"});
  cases.push_back({"overlap",
                   GgufBuilder()
                       .Tensor("a", {64}, kF32, Bytes(256))
                       .Tensor("b", {8}, kF32, Bytes(32), 32)
                       .Build(),
                   "tensors a and b overlap"});
  cases.push_back({"misaligned", GgufBuilder().Tensor("a", {8}, kF32, Bytes(32), 4).Build(),
                   "tensor a: offset 4 is not a multiple of the alignment 32"});
  cases.push_back({"past the end",
                   GgufBuilder().Tensor("a", {8}, kF32, Bytes(32), uint64_t{1} << 40).Build(),
                   "run past the end of the data section"});
  cases.push_back({"short tensor", GgufBuilder().Tensor("a", {1024}, kF32, Bytes(16)).Build(),
                   "tensor a: bytes [0, +4096) run past the end"});
  cases.push_back(
      {"duplicate tensor",
       GgufBuilder().Tensor("a", {8}, kF32, Bytes(32)).Tensor("a", {8}, kF32, Bytes(32)).Build(),
       "tensor a appears twice"});
  return cases;
}

TEST(GgufTest, MalformedFilesGiveClearErrors) {
  for (const BadCase& c : BadCases()) {
    auto h = Parse(c.image);
    ASSERT_FALSE(h.ok()) << c.name;
    EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(h.status().message(), HasSubstr(c.message)) << c.name;
    EXPECT_THAT(h.status().message(), HasSubstr("test.gguf")) << c.name;
  }
}

TEST(GgufTest, EveryTruncationOfAValidFileIsRejected) {
  const std::vector<uint8_t> valid = ValidBuilder().Build();
  for (size_t n = 0; n < valid.size(); ++n) {
    EXPECT_FALSE(ParseGgufImage(valid.data(), n, "t").ok()) << n;
  }
  EXPECT_TRUE(ParseGgufImage(valid.data(), valid.size(), "t").ok());
}

// A file written by the `gguf` package's GGUFWriter: every metadata value type (nested arrays
// too), alignment 64, every weight type; what the package's GGUFReader reported is in the JSON.
TEST(GgufTest, ReadsWhatTheGgufPackageWroteAsItsReaderDoes) {
  auto f = GgufFile::Open("tests/testdata/gguf/quant_types.gguf");
  ASSERT_TRUE(f.ok()) << f.status();
  auto text = ReadFileToString("tests/testdata/gguf/quant_types_expected.json");
  ASSERT_TRUE(text.ok()) << text.status();
  const nlohmann::json j = nlohmann::json::parse(*text);
  const GgufHeader& h = (*f)->header();
  EXPECT_EQ(h.version, j["gguf_version"].get<uint32_t>());
  EXPECT_EQ(h.alignment, j["alignment"].get<uint32_t>());
  EXPECT_EQ(h.data_offset, j["tensor_data_start"].get<uint64_t>());
  ASSERT_EQ(h.metadata.size(), j["metadata"].size());
  for (const nlohmann::json& m : j["metadata"]) {
    const std::string key = m["key"];
    SCOPED_TRACE(key);
    const GgufValue* v = (*f)->FindValue(key);
    ASSERT_NE(v, nullptr);
    ASSERT_EQ(static_cast<uint32_t>(v->type), m["type_id"].get<uint32_t>());
    const nlohmann::json& want = m["value"];
    switch (v->type) {
      case GgufValueType::kString:
        EXPECT_EQ(v->s, want.get<std::string>());
        break;
      case GgufValueType::kBool:
        EXPECT_EQ(v->b, want.get<bool>());
        break;
      case GgufValueType::kFloat32:
      case GgufValueType::kFloat64:
        EXPECT_EQ(v->f, want.get<double>());
        break;
      case GgufValueType::kUint8:
      case GgufValueType::kUint16:
      case GgufValueType::kUint32:
      case GgufValueType::kUint64:
        EXPECT_EQ(v->u, want.get<uint64_t>());
        break;
      case GgufValueType::kArray:
        ASSERT_EQ(static_cast<uint32_t>(v->array_type), m["element_type_id"].get<uint32_t>());
        ASSERT_EQ(v->array.size(), want.size());
        for (size_t i = 0; i < want.size(); ++i) {
          if (v->array_type == GgufValueType::kString) {
            EXPECT_EQ(v->array[i].s, want[i].get<std::string>());
          } else if (v->array_type == GgufValueType::kInt32) {
            EXPECT_EQ(v->array[i].i, want[i].get<int64_t>());
          } else {  // array of arrays of uint8
            ASSERT_EQ(v->array[i].array.size(), want[i].size());
            for (size_t k = 0; k < want[i].size(); ++k) {
              EXPECT_EQ(v->array[i].array[k].u, want[i][k].get<uint64_t>());
            }
          }
        }
        break;
      default:
        EXPECT_EQ(v->i, want.get<int64_t>());
    }
  }
  ASSERT_EQ(h.tensors.size(), j["tensors"].size());
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const nlohmann::json& want = j["tensors"][i];
    const GgufTensorInfo& t = h.tensors[i];
    EXPECT_EQ(t.name, want["name"].get<std::string>());
    EXPECT_EQ(t.type_id, want["ggml_type"].get<uint32_t>());
    EXPECT_EQ(t.dims, want["dims"].get<std::vector<int64_t>>());
    EXPECT_EQ(t.file_offset, want["data_offset"].get<uint64_t>());
    EXPECT_EQ(t.byte_size, want["n_bytes"].get<uint64_t>());
    EXPECT_EQ(t.row_bytes(), want["row_bytes"].get<uint64_t>());
  }
}

TEST(GgufSplitNameTest, FirstSplitPath) {
  EXPECT_EQ(GgufFile::FirstSplitPath("/m/q4-00002-of-00003.gguf"), "/m/q4-00001-of-00003.gguf");
  EXPECT_EQ(GgufFile::FirstSplitPath("a-00001-of-00012.gguf"), "a-00001-of-00012.gguf");
  EXPECT_EQ(GgufFile::FirstSplitPath("model.gguf"), "");
  EXPECT_EQ(GgufFile::FirstSplitPath("m-0001-of-0003.gguf"), "");
  EXPECT_EQ(GgufFile::FirstSplitPath("m-000x1-of-00003.gguf"), "");
}

TEST(GgufSplitTest, InconsistentSetsAreRefused) {
  const std::string dir = testing::TempDir("split_bad");
  const auto shard = [](uint16_t no, uint16_t count, int32_t total, const std::string& tensor) {
    GgufBuilder b;
    b.RawValue("split.no", 2, {static_cast<uint8_t>(no), 0})
        .RawValue("split.count", 2, {static_cast<uint8_t>(count), 0})
        .I32("split.tensors.count", total)
        .Tensor(tensor, {8}, kF32, Bytes(32));
    return b.Build();
  };
  // A missing second file is named.
  testing::WriteFile(dir + "/m-00001-of-00002.gguf", shard(0, 2, 2, "a"));
  auto missing = GgufFile::Open(dir + "/m-00001-of-00002.gguf");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("m-00002-of-00002.gguf"));
  // Opened from the second file: the whole set, in order.
  testing::WriteFile(dir + "/m-00002-of-00002.gguf", shard(1, 2, 2, "b"));
  auto ok = GgufFile::Open(dir + "/m-00002-of-00002.gguf");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->parts(), 2u);
  ASSERT_EQ((*ok)->header().tensors.size(), 2u);
  EXPECT_EQ((*ok)->FindTensor("b")->part, 1u);
  // The same tensor in two files; a wrong tensor total; split.no not matching the name.
  testing::WriteFile(dir + "/m-00002-of-00002.gguf", shard(1, 2, 2, "a"));
  EXPECT_THAT(GgufFile::Open(dir + "/m-00001-of-00002.gguf").status().message(),
              HasSubstr("tensor a appears in two split files"));
  testing::WriteFile(dir + "/m-00002-of-00002.gguf", shard(1, 2, 3, "b"));
  testing::WriteFile(dir + "/m-00001-of-00002.gguf", shard(0, 2, 3, "a"));
  EXPECT_THAT(GgufFile::Open(dir + "/m-00001-of-00002.gguf").status().message(),
              HasSubstr("split.tensors.count is 3 but the 2 files hold 2 tensors"));
  testing::WriteFile(dir + "/m-00002-of-00002.gguf", shard(0, 2, 2, "b"));
  testing::WriteFile(dir + "/m-00001-of-00002.gguf", shard(0, 2, 2, "a"));
  EXPECT_THAT(GgufFile::Open(dir + "/m-00001-of-00002.gguf").status().message(),
              HasSubstr("m-00002-of-00002.gguf: split.no is not 1"));
  testing::WriteFile(dir + "/m-00001-of-00002.gguf", shard(0, 3, 2, "a"));
  EXPECT_THAT(GgufFile::Open(dir + "/m-00001-of-00002.gguf").status().message(),
              HasSubstr("named as the first of 2 split files"));
  // The split keys in other integer types than llama.cpp's (u16, u16, i32) read the same.
  const auto shard32 = [](uint32_t no, const std::string& tensor) {
    GgufBuilder b;
    b.U32("split.no", no).U32("split.count", 2).U64("split.tensors.count", 2);
    return b.Tensor(tensor, {8}, kF32, Bytes(32)).Build();
  };
  testing::WriteFile(dir + "/m-00001-of-00002.gguf", shard32(0, "a"));
  testing::WriteFile(dir + "/m-00002-of-00002.gguf", shard32(1, "b"));
  auto wide = GgufFile::Open(dir + "/m-00001-of-00002.gguf");
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ((*wide)->header().tensors.size(), 2u);
  testing::WriteFile(dir + "/m-00002-of-00002.gguf", shard32(0, "b"));
  EXPECT_THAT(GgufFile::Open(dir + "/m-00001-of-00002.gguf").status().message(),
              HasSubstr("split.no is not 1"));
}

TEST(GgmlTypeTest, BlockLayouts) {
  EXPECT_EQ(FindGgmlType(8)->block_bytes, 34);
  EXPECT_EQ(FindGgmlType(14)->block_bytes, 210);
  EXPECT_EQ(FindGgmlType(14)->block_elements, 256);
  EXPECT_EQ(FindGgmlType(30)->name, "BF16");
  EXPECT_EQ(FindGgmlType(4), nullptr);  // removed Q4_2
  EXPECT_EQ(FindGgmlType(1000), nullptr);
}

}  // namespace
}  // namespace moe
