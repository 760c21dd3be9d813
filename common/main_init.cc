#include "common/main_init.h"

#include <algorithm>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "glog/logging.h"

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

std::vector<std::string> InitMain(int argc, char** argv, const char* main_file,
                                  const std::string& usage) {
  // Abseil's --help lists only flags from files named like the binary; ours live in main.cc,
  // moe_cli.cc, ...: match the file that defines them.
  static const std::string* const file = new std::string(main_file);
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [](absl::string_view f) {
    return absl::EndsWith(*file, std::string(f)) || absl::EndsWith(std::string(f), *file);
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  absl::SetFlagsUsageConfig(config);
  absl::SetProgramUsageMessage(usage);
  std::vector<std::string> storage;
  std::vector<char*> normalized = NormalizeFlagNames(argc, argv, &storage);
  std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(normalized.size()), normalized.data());
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  return std::vector<std::string>(args.begin() + 1, args.end());
}

}  // namespace moe
