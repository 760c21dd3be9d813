// moe-cli: the command-line client.
//   moe-cli generate --model DIR --prompt TEXT [sampling flags]   (single process)
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/flag_names.h"
#include "coordinator/generator.h"
#include "coordinator/local_model.h"
#include "glog/logging.h"

ABSL_FLAG(std::string, model, "", "Model directory (Hugging Face layout: config.json, "
          "*.safetensors, tokenizer.model).");
ABSL_FLAG(std::string, prompt, "", "Prompt text.");
ABSL_FLAG(int64_t, max_tokens, 64, "Maximum number of tokens to generate.");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature; 0 = greedy.");
ABSL_FLAG(double, top_p, 1.0, "Nucleus sampling threshold in (0, 1]; 1 = off.");
ABSL_FLAG(int32_t, top_k, 0, "Keep only the k most likely tokens; 0 = off.");
ABSL_FLAG(double, repetition_penalty, 1.0, "Repetition penalty (> 0); 1 = off.");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed: same seed, same output.");
ABSL_FLAG(std::vector<std::string>, stop, {}, "Comma-separated stop strings.");
ABSL_FLAG(bool, ignore_eos, false, "Keep generating past the end-of-sequence token.");
ABSL_FLAG(int64_t, workers, 1, "In-process expert workers the experts are split over.");

namespace moe {
namespace {

absl::Status RunGenerate() {
  LocalModelOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.in_process_workers = absl::GetFlag(FLAGS_workers);
  if (options.model_dir.empty()) return absl::InvalidArgumentError("--model is required");
  auto model = LocalModel::Create(options);
  if (!model.ok()) return model.status();
  GenerationRequest request;
  request.prompt = (*model)->tokenizer()->Encode(absl::GetFlag(FLAGS_prompt));
  request.params.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  request.params.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  request.params.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  request.params.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  request.params.sampling.repetition_penalty =
      static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  request.params.sampling.seed = absl::GetFlag(FLAGS_seed);
  request.params.stop = absl::GetFlag(FLAGS_stop);
  request.params.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);

  std::cout << absl::GetFlag(FLAGS_prompt) << std::flush;
  const absl::Time start = absl::Now();
  absl::Time first_token;
  auto outputs = Generate((*model)->engine(), (*model)->tokenizer(), {&request, 1},
                          [&](size_t, int32_t, std::string_view delta) {
                            if (first_token == absl::Time()) first_token = absl::Now();
                            std::cout << delta << std::flush;
                          });
  if (!outputs.ok()) return outputs.status();
  const double total = absl::ToDoubleSeconds(absl::Now() - start);
  const GenerationOutput& out = (*outputs)[0];
  std::cout << std::endl;
  std::fprintf(stderr,
               "[%zu prompt tokens, %zu generated, finish: %s, first token %.1f ms, %.1f tok/s]\n",
               request.prompt.size(), out.tokens.size(),
               std::string(FinishReasonName(out.finish)).c_str(),
               absl::ToDoubleMilliseconds(first_token - start),
               out.tokens.size() > 1
                   ? (out.tokens.size() - 1) / absl::ToDoubleSeconds(absl::Now() - first_token)
                   : out.tokens.size() / total);
  return absl::OkStatus();
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "moe-cli: talk to a moe-cluster model.\n"
      "  moe-cli generate --model DIR --prompt TEXT [--max-tokens N] [--temperature T]\n"
      "      [--top-p P] [--top-k K] [--repetition-penalty R] [--seed S] [--stop a,b]\n"
      "      streams a completion computed in this process.\n"
      "Flag names take dashes or underscores (--max-tokens == --max_tokens).");
  std::vector<std::string> storage;
  std::vector<char*> normalized = moe::NormalizeFlagNames(argc, argv, &storage);
  std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(normalized.size()), normalized.data());
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  if (args.size() != 2 || std::string(args[1]) != "generate") {
    std::fprintf(stderr, "%s\n(run with --help for all flags)\n",
                 absl::ProgramUsageMessage().data());
    return 2;
  }
  absl::Status status = moe::RunGenerate();
  if (!status.ok()) {
    std::fprintf(stderr, "moe-cli: error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
