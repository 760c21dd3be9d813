#include "tools/client/cli_commands.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/chat_template.h"
#include "common/rpc/tls.h"
#include "common/status_macros.h"
#include "common/tokenizer.h"
#include "coordinator/generator.h"
#include "coordinator/local_model.h"
#include "nlohmann/json.hpp"
#include "tools/client/http_client.h"
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

// One token of `generate --json`.
struct JsonToken {
  int32_t id = 0;
  std::string text;  // the text that became final with it
  std::optional<TokenLogprobs> logprobs;
};

void PrintJson(std::string_view prompt, size_t prompt_tokens, const std::vector<JsonToken>& tokens,
               std::string_view text, std::string_view finish) {
  nlohmann::json out = {{"prompt", std::string(prompt)},
                        {"prompt_tokens", prompt_tokens},
                        {"text", std::string(text)},
                        {"finish_reason", std::string(finish)},
                        {"tokens", nlohmann::json::array()}};
  for (const JsonToken& t : tokens) {
    nlohmann::json j = {{"id", t.id}, {"text", t.text}};
    if (t.logprobs) {
      j["logprob"] = t.logprobs->logprob;
      nlohmann::json top = nlohmann::json::array();
      for (const TopLogprob& alt : t.logprobs->top) {
        top.push_back({{"id", alt.token}, {"logprob", alt.logprob}});
      }
      j["top_logprobs"] = std::move(top);
    }
    out["tokens"].push_back(std::move(j));
  }
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> LoadChatTemplate(const CliGenerateOptions& o,
                                                               const LocalModel& model) {
  MOE_ASSIGN_OR_RETURN(const std::string source,
                       o.chat_template_file.empty() ? model.checkpoint().ChatTemplateSource()
                                                    : ChatTemplate::ReadFile(o.chat_template_file));
  return ChatTemplate::Parse(source);
}

absl::StatusOr<std::unique_ptr<LocalModel>> LoadLocal(const CliGenerateOptions& o) {
  LocalModelOptions options;
  options.model_dir = o.model_dir;
  options.in_process_workers = o.in_process_workers;
  options.quantize = o.quantize;
  options.engine.experts_per_token = o.experts_per_token;
  return LocalModel::Create(options);
}

GenerationParams Params(const CliGenerateOptions& o) {
  GenerationParams p;
  p.max_tokens = o.max_tokens;
  p.sampling = o.sampling;
  p.stop = o.stop;
  p.ignore_eos = o.ignore_eos;
  if (o.json) p.logprobs = std::max(o.logprobs, 0);
  return p;
}

absl::Status RunLocal(const CliGenerateOptions& o) {
  MOE_ASSIGN_OR_RETURN(const std::unique_ptr<LocalModel> model, LoadLocal(o));
  GenerationRequest request;
  request.prompt = model->tokenizer()->Encode(o.prompt);
  request.params = Params(o);
  if (!o.json) std::cout << o.prompt << std::flush;
  Timer timer;
  std::vector<JsonToken> tokens;
  auto outputs = Generate(model->engine(), model->tokenizer(), {&request, 1},
                          [&](size_t, int32_t token, std::string_view delta) {
                            timer.OnToken();
                            if (o.json) {
                              tokens.push_back({token, std::string(delta), std::nullopt});
                            } else {
                              std::cout << delta << std::flush;
                            }
                          });
  if (!outputs.ok()) return outputs.status();
  const GenerationOutput& out = (*outputs)[0];
  if (o.json) {
    for (size_t i = 0; i < tokens.size() && i < out.logprobs.size(); ++i) {
      tokens[i].logprobs = out.logprobs[i];
    }
    PrintJson(o.prompt, request.prompt.size(), tokens, out.text, FinishReasonName(out.finish));
    return absl::OkStatus();
  }
  timer.Print(request.prompt.size(), out.tokens.size(), FinishReasonName(out.finish));
  return absl::OkStatus();
}

// A client of `server`, over TLS when `tls_ca` names the CA file of its certificate.
absl::StatusOr<std::unique_ptr<InferenceClient>> Connect(const std::string& server,
                                                         const std::string& api_token,
                                                         const std::string& tls_ca) {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (!tls_ca.empty()) {
    MOE_ASSIGN_OR_RETURN(credentials, ChannelCredentials({"", "", tls_ca}));
  }
  return std::make_unique<InferenceClient>(server, api_token, credentials);
}

absl::Status RunRemote(const CliGenerateOptions& o) {
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<InferenceClient> connected,
                       Connect(o.server, o.api_token, o.tls_ca));
  InferenceClient& client = *connected;
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
  if (o.json) request.set_logprobs(std::max(o.logprobs, 0));
  if (!o.json) std::cout << o.prompt << std::flush;
  Timer timer;
  std::vector<JsonToken> tokens;
  auto result = client.Generate(request, [&](const pb::TokenDelta& delta) {
    timer.OnToken();
    if (!o.json) {
      std::cout << delta.text() << std::flush;
      return;
    }
    for (int i = 0; i < delta.token_ids_size(); ++i) {
      JsonToken t{delta.token_ids(i), i + 1 == delta.token_ids_size() ? delta.text() : "", {}};
      if (i < delta.logprobs_size()) {
        const pb::TokenLogprob& l = delta.logprobs(i);
        t.logprobs.emplace();
        t.logprobs->token = l.token_id();
        t.logprobs->logprob = l.logprob();
        for (const pb::TopLogprob& alt : l.top()) {
          t.logprobs->top.push_back({alt.token_id(), alt.logprob()});
        }
      }
      tokens.push_back(std::move(t));
    }
  });
  if (!result.ok()) return result.status();
  const std::string finish = pb::FinishReason_Name(result->final.finish_reason());
  const std::string reason = absl::AsciiStrToLower(finish.substr(finish.rfind('_') + 1));
  if (o.json) {
    PrintJson(o.prompt, result->final.usage().prompt_tokens(), tokens, result->final.text(),
              reason);
    return absl::OkStatus();
  }
  timer.Print(result->final.usage().prompt_tokens(), result->tokens.size(), reason);
  return absl::OkStatus();
}

// Answers a conversation: streams the reply's text to stdout and returns it whole.
using ChatReplier = std::function<absl::StatusOr<std::string>(const std::vector<ChatMessage>&)>;

absl::StatusOr<ChatReplier> LocalChat(const CliGenerateOptions& o) {
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<LocalModel> model, LoadLocal(o));
  MOE_ASSIGN_OR_RETURN(std::shared_ptr<ChatTemplate> chat, LoadChatTemplate(o, *model));
  return ChatReplier(
      [o, model, chat](const std::vector<ChatMessage>& messages) -> absl::StatusOr<std::string> {
        GenerationRequest request;
        MOE_ASSIGN_OR_RETURN(request.prompt, chat->Encode(messages, true, *model->tokenizer()));
        request.params = Params(o);
        Timer timer;
        auto outputs = Generate(model->engine(), model->tokenizer(), {&request, 1},
                                [&](size_t, int32_t, std::string_view delta) {
                                  timer.OnToken();
                                  std::cout << delta << std::flush;
                                });
        if (!outputs.ok()) return outputs.status();
        timer.Print(request.prompt.size(), (*outputs)[0].tokens.size(),
                    FinishReasonName((*outputs)[0].finish));
        return (*outputs)[0].text;
      });
}

ChatReplier RemoteChat(const CliGenerateOptions& o) {
  return [o](const std::vector<ChatMessage>& messages) -> absl::StatusOr<std::string> {
    nlohmann::json body = {{"messages", nlohmann::json::array()},
                           {"max_tokens", o.max_tokens},
                           {"temperature", o.sampling.temperature},
                           {"top_p", o.sampling.top_p},
                           {"top_k", o.sampling.top_k},
                           {"repetition_penalty", o.sampling.repetition_penalty},
                           {"seed", o.sampling.seed},
                           {"ignore_eos", o.ignore_eos},
                           {"stream", true},
                           {"stream_options", {{"include_usage", true}}}};
    if (!o.stop.empty()) body["stop"] = o.stop;
    for (const ChatMessage& m : messages) {
      body["messages"].push_back({{"role", m.role}, {"content", m.content}});
    }
    std::string text, finish, error;
    size_t prompt_tokens = 0, completion_tokens = 0;
    Timer timer;
    auto answer = HttpPostJson(
        o.server, "/v1/chat/completions", body.dump(),
        [&](const std::string& data) {
          if (data == "[DONE]") return false;
          const nlohmann::json chunk = nlohmann::json::parse(data, nullptr, false);
          if (!chunk.is_object()) return true;
          if (chunk.contains("error")) {
            error = chunk["error"].value("message", "the server failed the request");
            return false;
          }
          if (chunk.value("usage", nlohmann::json()).is_object()) {
            prompt_tokens = chunk["usage"].value("prompt_tokens", size_t{0});
            completion_tokens = chunk["usage"].value("completion_tokens", size_t{0});
          }
          for (const nlohmann::json& c : chunk.value("choices", nlohmann::json::array())) {
            const nlohmann::json delta = c.value("delta", nlohmann::json::object());
            if (delta.value("content", nlohmann::json()).is_string()) {
              const std::string piece = delta["content"].get<std::string>();
              if (!piece.empty()) timer.OnToken();
              std::cout << piece << std::flush;
              text += piece;
            }
            if (c.value("finish_reason", nlohmann::json()).is_string()) {
              finish = c["finish_reason"].get<std::string>();
            }
          }
          return true;
        },
        o.api_token);
    if (!answer.ok()) return answer.status();
    if (answer->status != 200) return absl::UnavailableError(HttpErrorMessage(*answer));
    if (!error.empty()) return absl::UnavailableError(error);
    timer.Print(prompt_tokens, completion_tokens, finish);
    return text;
  };
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
  ChatReplier reply;
  if (!options.server.empty()) {
    if (!options.chat_template_file.empty()) {
      return absl::InvalidArgumentError(
          "--chat-template is for --model; a server uses its own (moe-coordinator "
          "--chat-template FILE)");
    }
    reply = RemoteChat(options);
  } else if (options.model_dir.empty()) {
    return absl::InvalidArgumentError(
        "chat needs --model DIR (in this process) or --server HOST:PORT (a coordinator's "
        "--http-listen address)");
  } else {
    MOE_ASSIGN_OR_RETURN(reply, LocalChat(options));
  }
  std::vector<ChatMessage> messages;
  if (!options.system.empty()) messages.push_back({"system", options.system});
  if (!options.prompt.empty()) {  // one-shot
    messages.push_back({"user", options.prompt});
    return reply(messages).status();
  }
  // Interactive: one user message per line of stdin, until EOF or /exit.
  const bool tty = isatty(STDIN_FILENO) != 0;
  if (tty) std::fprintf(stderr, "(one message per line; /exit or Ctrl-D ends)\n");
  for (std::string line;;) {
    if (tty) std::fprintf(stderr, "> ");
    if (!std::getline(std::cin, line) || line == "/exit") break;
    if (line.empty()) continue;
    messages.push_back({"user", line});
    MOE_ASSIGN_OR_RETURN(std::string answer, reply(messages));
    std::cout << std::endl;
    messages.push_back({"assistant", std::move(answer)});
  }
  return absl::OkStatus();
}

absl::Status RunStatus(const std::string& server, const std::string& api_token,
                       const std::string& tls_ca) {
  if (server.empty()) return absl::InvalidArgumentError("status needs --server HOST:PORT");
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<InferenceClient> client, Connect(server, api_token, tls_ca));
  auto status = client->GetClusterStatus();
  if (!status.ok()) return status.status();
  std::cout << FormatClusterStatus(*status);
  return absl::OkStatus();
}

absl::Status RunRecordExperts(const std::string& server, const std::string& api_token,
                              const std::string& tls_ca, absl::Duration seconds,
                              const std::string& out) {
  if (server.empty()) return absl::InvalidArgumentError("record-experts needs --server HOST:PORT");
  if (out.empty()) return absl::InvalidArgumentError("record-experts needs --out FILE");
  if (seconds < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("record-experts: --seconds must be >= 0");
  }
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<InferenceClient> client, Connect(server, api_token, tls_ca));
  // Counts since the coordinator started; with --seconds, the difference over that window.
  const auto counts = [&]() -> absl::StatusOr<std::vector<std::vector<uint64_t>>> {
    MOE_ASSIGN_OR_RETURN(const moecluster::v1::ClusterStatus status, client->GetClusterStatus());
    std::vector<std::vector<uint64_t>> table;
    for (const auto& layer : status.load()) {
      table.emplace_back(layer.tokens().begin(), layer.tokens().end());
    }
    return table;
  };
  std::vector<std::vector<uint64_t>> before;
  if (seconds > absl::ZeroDuration()) {
    MOE_ASSIGN_OR_RETURN(before, counts());
    std::fprintf(stderr, "recording the expert load of %s for %s...\n", server.c_str(),
                 absl::FormatDuration(seconds).c_str());
    absl::SleepFor(seconds);
  }
  MOE_ASSIGN_OR_RETURN(std::vector<std::vector<uint64_t>> after, counts());
  if (before.empty()) {  // since the start: from zero
    for (const auto& layer : after) before.emplace_back(layer.size(), 0);
  }
  bool restarted = before.size() != after.size();
  for (size_t l = 0; !restarted && l < after.size(); ++l) {
    restarted = before[l].size() != after[l].size();
  }
  std::string csv = "layer,expert,tokens\n";
  uint64_t total = 0;
  for (size_t l = 0; l < after.size(); ++l) {
    for (size_t e = 0; e < after[l].size(); ++e) {
      if (restarted || before[l][e] > after[l][e]) {
        return absl::FailedPreconditionError(
            "the coordinator's expert counts went down during the recording (it restarted): "
            "record again");
      }
      const uint64_t n = after[l][e] - before[l][e];
      total += n;
      absl::StrAppend(&csv, l, ",", e, ",", n, "\n");
    }
  }
  std::ofstream file(out, std::ios::binary | std::ios::trunc);
  file << csv;
  file.close();
  if (!file) return absl::UnavailableError(absl::StrCat("cannot write ", out));
  std::fprintf(stderr, "wrote %s: %zu layers, %llu token-to-expert assignments\n", out.c_str(),
               after.size(), static_cast<unsigned long long>(total));
  return absl::OkStatus();
}

}  // namespace moe
