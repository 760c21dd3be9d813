#include "tools/client/cli_commands.h"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/chat_template.h"
#include "common/status_macros.h"
#include "common/tokenizer.h"
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

absl::StatusOr<std::vector<int32_t>> ChatPrompt(const CliGenerateOptions& o,
                                                const Tokenizer& tokenizer) {
  std::string source;
  if (!o.chat_template_file.empty()) {
    std::ifstream in(o.chat_template_file, std::ios::binary);
    if (!in.is_open()) {
      return absl::NotFoundError(
          absl::StrCat("cannot open --chat-template ", o.chat_template_file));
    }
    source.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } else {
    MOE_ASSIGN_OR_RETURN(source, ChatTemplate::FindSource(o.model_dir));
  }
  MOE_ASSIGN_OR_RETURN(const auto chat, ChatTemplate::Parse(source));
  std::vector<ChatMessage> messages;
  if (!o.system.empty()) messages.push_back({"system", o.system});
  messages.push_back({"user", o.prompt});
  const std::string eos =
      tokenizer.eos_ids().empty() ? std::string() : tokenizer.TokenText(tokenizer.eos_ids()[0]);
  MOE_ASSIGN_OR_RETURN(const std::string rendered,
                       chat->Render(messages, /*add_generation_prompt=*/true,
                                    tokenizer.TokenText(tokenizer.bos_id()), eos));
  return tokenizer.Encode(rendered, /*add_bos=*/false);
}

absl::Status RunLocal(const CliGenerateOptions& o) {
  LocalModelOptions options;
  options.model_dir = o.model_dir;
  options.in_process_workers = o.in_process_workers;
  options.quantize = o.quantize;
  auto model = LocalModel::Create(options);
  if (!model.ok()) return model.status();
  GenerationRequest request;
  if (o.chat) {
    MOE_ASSIGN_OR_RETURN(request.prompt, ChatPrompt(o, *(*model)->tokenizer()));
  } else {
    request.prompt = (*model)->tokenizer()->Encode(o.prompt);
  }
  request.params.max_tokens = o.max_tokens;
  request.params.sampling = o.sampling;
  request.params.stop = o.stop;
  request.params.ignore_eos = o.ignore_eos;
  if (!o.chat) std::cout << o.prompt << std::flush;
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

absl::Status RunChat(const CliGenerateOptions& options) {
  if (!options.server.empty()) {
    return absl::UnimplementedError(
        "moe-cli chat --server needs the coordinator's chat API, which is not there yet; run the "
        "model in this process with --model DIR");
  }
  if (options.model_dir.empty()) return absl::InvalidArgumentError("chat needs --model DIR");
  if (options.prompt.empty()) return absl::InvalidArgumentError("chat needs --message TEXT");
  CliGenerateOptions o = options;
  o.chat = true;
  return RunLocal(o);
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
