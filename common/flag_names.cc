#include "common/flag_names.h"

#include <algorithm>

namespace moe {

std::vector<char*> NormalizeFlagNames(int argc, char** argv, std::vector<std::string>* storage) {
  storage->assign(argv, argv + argc);
  bool flags_ended = false;
  for (int i = 1; i < argc; ++i) {
    std::string& arg = (*storage)[i];
    if (flags_ended || arg.size() < 3 || arg[0] != '-') continue;
    if (arg == "--") {
      flags_ended = true;
      continue;
    }
    const size_t start = arg[1] == '-' ? 2 : 1;
    const size_t end = std::min(arg.find('='), arg.size());
    std::replace(arg.begin() + start, arg.begin() + end, '-', '_');
  }
  std::vector<char*> out;
  for (std::string& s : *storage) out.push_back(s.data());
  return out;
}

}  // namespace moe
