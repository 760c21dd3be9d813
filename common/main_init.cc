#include "common/main_init.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "common/kernels.h"
#include "glog/logging.h"

ABSL_FLAG(std::string, kernels, "",
          "MatMul arithmetic for BF16 and quantized weights: 'fast' rounds the activations as "
          "llama.cpp does (int8 per 8 values for quantized weights at up to 8 tokens, "
          "bf16 otherwise; AVX-512 VNNI / AVX512-BF16 where the CPU has them) or 'exact' (f32 "
          "activations, as the tests against transformers use). Default: the MOE_KERNELS "
          "environment variable, else fast.");

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
    return absl::EndsWith(*file, std::string(f)) || absl::EndsWith(std::string(f), *file) ||
           absl::EndsWith(std::string(f), "common/main_init.cc");
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
  const std::string kernels = absl::GetFlag(FLAGS_kernels);
  if (!kernels.empty()) {
    kernels::MatMulMode mode;
    if (!kernels::ParseMatMulMode(kernels.c_str(), &mode)) {
      std::fprintf(stderr, "--kernels=%s: expected 'fast' or 'exact'\n", kernels.c_str());
      std::exit(2);
    }
    kernels::SetMatMulMode(mode);
  }
  return std::vector<std::string>(args.begin() + 1, args.end());
}

}  // namespace moe
