#include "tests/testutil/golden_fixture.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/gguf.h"
#include "common/model_config.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moe::testing {
namespace {

absl::StatusOr<std::vector<int32_t>> IdList(const nlohmann::json& j, const char* key,
                                            const std::string& path) {
  if (!j.contains(key) || !j[key].is_array() || j[key].empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", key, " must be a non-empty list"));
  }
  std::vector<int32_t> ids;
  for (const nlohmann::json& v : j[key]) {
    if (!v.is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", key, " holds a non-integer"));
    }
    ids.push_back(v.get<int32_t>());
  }
  return ids;
}

absl::StatusOr<std::vector<float>> Logits(TensorStore& store, const char* name, int64_t rows,
                                          int64_t vocab, const std::string& path) {
  MOE_ASSIGN_OR_RETURN(TensorData t, store.Map(name));
  if (t.info->dtype != DType::kF32 || t.info->shape != std::vector<int64_t>{rows, vocab}) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", name, " must be [", rows, ", ",
                                                   vocab, "] F32, got ",
                                                   DescribeTensor(t.info->shape, t.info->dtype)));
  }
  const float* f = static_cast<const float*>(t.data);
  return std::vector<float>(f, f + t.info->num_elements);
}

}  // namespace

absl::StatusOr<GoldenExpected> LoadExpected(const std::string& dir) {
  MOE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  return LoadExpected(dir + "/expected.json", dir + "/expected.safetensors", config.vocab_size);
}

std::vector<std::string> GgufFixtureFiles() {
  std::vector<std::string> files;
  for (const auto& dir : std::filesystem::directory_iterator("tests/testdata/gguf")) {
    if (!dir.is_directory()) continue;
    for (const auto& f : std::filesystem::directory_iterator(dir.path())) {
      if (f.path().extension() == ".gguf" && GgufFile::FirstSplitPath(f.path()).empty()) {
        files.push_back(f.path().string());
      }
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

std::string GgufStem(const std::string& gguf_path) {
  return gguf_path.substr(0, gguf_path.size() - std::string(".gguf").size());
}

absl::StatusOr<GoldenExpected> LoadGgufExpected(const std::string& gguf_path, int64_t vocab) {
  const std::string stem = GgufStem(gguf_path);
  return LoadExpected(stem + ".expected.json", stem + ".expected.safetensors", vocab);
}

void ExpectLogitsNear(const float* got, const float* ref, int64_t n, const std::string& what) {
  float max_ref = 0, max_diff = 0;
  for (int64_t i = 0; i < n; ++i) {
    max_ref = std::max(max_ref, std::fabs(ref[i]));
    max_diff = std::max(max_diff, std::fabs(got[i] - ref[i]));
  }
  EXPECT_LE(max_diff, 1e-3f * max_ref)
      << what << ": max |diff| " << max_diff << " vs max |ref| " << max_ref;
}

absl::StatusOr<GoldenExpected> LoadExpected(const std::string& json_path,
                                            const std::string& tensors_path, int64_t vocab) {
  MOE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(json_path));
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(json_path, ": not a JSON object"));
  }
  GoldenExpected e;
  MOE_ASSIGN_OR_RETURN(e.prompt, IdList(j, "prompt_ids", json_path));
  MOE_ASSIGN_OR_RETURN(e.greedy, IdList(j, "greedy_ids", json_path));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::OpenFiles({tensors_path}));
  MOE_ASSIGN_OR_RETURN(e.logits, Logits(*store, "logits", static_cast<int64_t>(e.prompt.size()),
                                        vocab, tensors_path));
  MOE_ASSIGN_OR_RETURN(
      e.decode_logits,
      Logits(*store, "decode_logits", static_cast<int64_t>(e.greedy.size()), vocab, tensors_path));
  return e;
}

}  // namespace moe::testing
