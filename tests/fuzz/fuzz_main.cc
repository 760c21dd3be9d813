// Replays fuzz inputs without libFuzzer: every file under the directories (or files) given on
// the command line goes through LLVMFuzzerTestOneInput once, plus deterministic byte-flip
// mutations of each, so a GCC build still checks the corpus and a little around it.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

void RunWithMutations(const std::vector<uint8_t>& input) {
  LLVMFuzzerTestOneInput(input.data(), input.size());
  uint32_t seed = 2166136261u;
  for (int i = 0; i < 500 && !input.empty(); ++i) {
    std::vector<uint8_t> m = input;
    seed = seed * 1664525u + 1013904223u;
    m[seed % m.size()] ^= static_cast<uint8_t>(1u << (seed >> 29));
    seed = seed * 1664525u + 1013904223u;
    if (i % 5 == 0) m.resize(seed % m.size());
    LLVMFuzzerTestOneInput(m.data(), m.size());
  }
}

}  // namespace

int main(int argc, char** argv) {
  int files = 0;
  for (int i = 1; i < argc; ++i) {
    std::vector<std::filesystem::path> paths;
    if (std::filesystem::is_directory(argv[i])) {
      for (const auto& e : std::filesystem::directory_iterator(argv[i])) paths.push_back(e.path());
    } else {
      paths.emplace_back(argv[i]);
    }
    for (const auto& p : paths) {
      std::ifstream in(p, std::ios::binary);
      std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
      RunWithMutations(bytes);
      ++files;
    }
  }
  std::printf("replayed %d inputs (with mutations)\n", files);
  return files > 0 ? 0 : 1;
}
