#include "tools/client/cli_commands.h"

#include <cstdio>
#include <iostream>

#include "absl/strings/ascii.h"
#include "absl/time/clock.h"
#include "coordinator/generator.h"
#include "coordinator/local_model.h"
#include "tools/client/inference_client.h"

namespace moe {
namespace {

namespace pb = moecluster::v1;

// Time to first token and decode rate, printed to stderr after a generation.
class Timer {
 public:
  void OnToken() {
    if (first_ == absl::InfinitePast()) first_ = absl::Now();
  }
  void Print(size_t prompt_tokens, size_t tokens, std::string_view finish) const {
    const double decode = absl::ToDoubleSeconds(absl::Now() - first_);
    std::fprintf(stderr,
                 "\n[%zu prompt tokens, %zu generated, finish: %s, first token %.1f ms, "
                 "%.1f tok/s]\n",
                 prompt_tokens, tokens, std::string(finish).c_str(),
                 absl::ToDoubleMilliseconds(first_ - start_),
                 tokens > 1 && decode > 0 ? (tokens - 1) / decode : 0.0);
  }

 private:
  absl::Time start_ = absl::Now();
  absl::Time first_ = absl::InfinitePast();
};

absl::Status RunLocal(const CliGenerateOptions& o) {
  LocalModelOptions options;
  options.model_dir = o.model_dir;
  options.in_process_workers = o.in_process_workers;
  options.quantize = o.quantize;
  auto model = LocalModel::Create(options);
  if (!model.ok()) return model.status();
  GenerationRequest request;
  request.prompt = (*model)->tokenizer()->Encode(o.prompt);
  request.params.max_tokens = o.max_tokens;
  request.params.sampling = o.sampling;
  request.params.stop = o.stop;
  request.params.ignore_eos = o.ignore_eos;
  std::cout << o.prompt << std::flush;
  Timer timer;
  auto outputs = Generate((*model)->engine(), (*model)->tokenizer(), {&request, 1},
                          [&](size_t, int32_t, std::string_view delta) {
                            timer.OnToken();
                            std::cout << delta << std::flush;
                          });
  if (!outputs.ok()) return outputs.status();
  timer.Print(request.prompt.size(), (*outputs)[0].tokens.size(),
              FinishReasonName((*outputs)[0].finish));
  return absl::OkStatus();
}

absl::Status RunRemote(const CliGenerateOptions& o) {
  InferenceClient client(o.server);
  pb::GenerateRequest request;
  request.set_prompt(o.prompt);
  request.set_max_tokens(static_cast<int32_t>(o.max_tokens));
  request.set_temperature(o.sampling.temperature);
  request.set_top_p(o.sampling.top_p);
  request.set_top_k(o.sampling.top_k);
  request.set_repetition_penalty(o.sampling.repetition_penalty);
  request.set_seed(o.sampling.seed);
  for (const std::string& s : o.stop) request.add_stop(s);
  request.set_ignore_eos(o.ignore_eos);
  std::cout << o.prompt << std::flush;
  Timer timer;
  auto result = client.Generate(request, [&](const pb::TokenDelta& delta) {
    timer.OnToken();
    std::cout << delta.text() << std::flush;
  });
  if (!result.ok()) return result.status();
  const std::string finish = pb::FinishReason_Name(result->final.finish_reason());
  timer.Print(result->final.usage().prompt_tokens(), result->tokens.size(),
              absl::AsciiStrToLower(finish.substr(finish.rfind('_') + 1)));
  return absl::OkStatus();
}

}  // namespace

absl::Status RunGenerate(const CliGenerateOptions& options) {
  if (!options.server.empty()) return RunRemote(options);
  if (options.model_dir.empty()) {
    return absl::InvalidArgumentError("give --model DIR (local) or --server HOST:PORT (remote)");
  }
  return RunLocal(options);
}

absl::Status RunStatus(const std::string& server) {
  if (server.empty()) return absl::InvalidArgumentError("status needs --server HOST:PORT");
  InferenceClient client(server);
  auto status = client.GetClusterStatus();
  if (!status.ok()) return status.status();
  std::cout << FormatClusterStatus(*status);
  return absl::OkStatus();
}

}  // namespace moe
