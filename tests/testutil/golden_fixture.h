// The reference outputs of a golden fixture (tests/testdata/models/NAME/), written by
// tools/fixtures/gen_models.py from transformers: expected.json (prompt_ids, greedy_ids) and
// expected.safetensors (logits at every prompt position, logits at every greedy step, F32).
#ifndef MOE_TESTS_TESTUTIL_GOLDEN_FIXTURE_H_
#define MOE_TESTS_TESTUTIL_GOLDEN_FIXTURE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moe::testing {

struct GoldenExpected {
  std::vector<int32_t> prompt;
  std::vector<int32_t> greedy;
  std::vector<float> logits;         // [prompt, vocab]
  std::vector<float> decode_logits;  // [greedy, vocab]
};

// Reads the fixture in `dir`. Every read is checked: the files exist, the JSON parses and has
// non-empty integer lists prompt_ids and greedy_ids, and both tensors are F32 of shape
// [prompt, vocab] and [greedy, vocab] with vocab from dir/config.json. Errors name the file.
absl::StatusOr<GoldenExpected> LoadExpected(const std::string& dir);
// The same from explicit files (GGUF fixtures: NAME.expected.json, NAME.expected.safetensors).
absl::StatusOr<GoldenExpected> LoadExpected(const std::string& json_path,
                                            const std::string& tensors_path, int64_t vocab);

// Every GGUF fixture file tests/testdata/gguf/<dir>/NAME.gguf (split sets, which are compared
// with their unsplit file, excluded), sorted.
std::vector<std::string> GgufFixtureFiles();
// The reference of the GGUF fixture `gguf_path` (NAME.gguf): NAME.expected.json and
// NAME.expected.safetensors, checked as LoadExpected does.
absl::StatusOr<GoldenExpected> LoadGgufExpected(const std::string& gguf_path, int64_t vocab);
// `gguf_path` without its ".gguf".
std::string GgufStem(const std::string& gguf_path);

// max |got - ref| <= 1e-3 * max |ref| over a row of n logits (a gtest expectation).
void ExpectLogitsNear(const float* got, const float* ref, int64_t n, const std::string& what);

}  // namespace moe::testing

#endif  // MOE_TESTS_TESTUTIL_GOLDEN_FIXTURE_H_
