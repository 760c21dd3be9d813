// moe-cli: the command-line client.
//   moe-cli generate --model DIR --prompt TEXT [sampling flags]     (in this process)
//   moe-cli generate --server HOST:PORT --prompt TEXT [...]         (a running coordinator)
//   moe-cli chat --model DIR [--message TEXT] [--system TEXT] [--chat-template FILE]
//   moe-cli chat --server HOST:PORT [--message TEXT]   (a coordinator's --http-listen address)
//   moe-cli status --server HOST:PORT                               (workers, expert load)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "common/api_tokens.h"
#include "common/dtype.h"
#include "common/main_init.h"
#include "glog/logging.h"
#include "tools/client/cli_commands.h"

ABSL_FLAG(std::string, model, "",
          "Model (Hugging Face directory or GGUF file), to run the model in this process.");
ABSL_FLAG(moe::QuantizeOption, quantize, {},
          "With --model: quantize a safetensors checkpoint's matrices while loading (q8_0, q4_k, "
          "q6_k).");
ABSL_FLAG(std::string, server, "", "Coordinator HOST:PORT, to query a running cluster.");
ABSL_FLAG(std::string, api_token_file, "",
          "With --server: a file whose first token is sent as the coordinator's API token "
          "(moe-coordinator --api-token-file). Default: $MOE_API_TOKEN when set.");
ABSL_FLAG(std::string, tls_ca, "",
          "With --server: the coordinator serves TLS (moe-coordinator --tls-cert); this PEM CA "
          "file verifies its certificate.");
ABSL_FLAG(std::string, prompt, "", "Prompt text.");
ABSL_FLAG(std::string, message, "", "chat: the user's message.");
ABSL_FLAG(std::string, system, "", "chat: a system message before it (none if empty).");
ABSL_FLAG(std::string, chat_template, "",
          "chat: a Jinja chat template file instead of the model's own (chat_template.jinja or "
          "tokenizer_config.json's chat_template).");
ABSL_FLAG(int64_t, max_tokens, 64, "Maximum number of tokens to generate.");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature; 0 = greedy.");
ABSL_FLAG(double, top_p, 1.0, "Nucleus sampling threshold in (0, 1]; 1 = off.");
ABSL_FLAG(int32_t, top_k, 0, "Keep only the k most likely tokens; 0 = off.");
ABSL_FLAG(double, repetition_penalty, 1.0, "Repetition penalty (> 0); 1 = off.");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed: same seed, same output.");
ABSL_FLAG(std::vector<std::string>, stop, {}, "Comma-separated stop strings.");
ABSL_FLAG(bool, ignore_eos, false, "Keep generating past the end-of-sequence token.");
ABSL_FLAG(bool, json, false,
          "generate: print one JSON object (prompt, text, finish_reason, and per token its id, "
          "text and log-probability) instead of streaming the text; for scripts.");
ABSL_FLAG(int32_t, logprobs, 0,
          "generate --json: also list this many most likely alternatives per token (0..20).");
ABSL_FLAG(int64_t, workers, 1, "With --model: in-process expert workers to split experts over.");
ABSL_FLAG(absl::Duration, seconds, absl::ZeroDuration(),
          "record-experts: record over this long (e.g. 60s); 0 = everything since the "
          "coordinator started.");
ABSL_FLAG(std::string, out, "", "record-experts: the CSV file to write (layer,expert,tokens).");
ABSL_FLAG(int64_t, experts_per_token, 0,
          "With --model: route each token to K experts instead of the model's experts per token "
          "(0: the model's; "
          "1 <= K <= the model's), renormalising the router weights over the K: faster, and no "
          "longer the model's outputs (reported at start and in GetModelInfo).");

int main(int argc, char** argv) {
  const std::vector<std::string> args = moe::InitMain(
      argc, argv, __FILE__,
      "moe-cli: talk to a moe-cluster model.\n"
      "  moe-cli generate --model DIR --prompt TEXT [--max-tokens N] [--temperature T]\n"
      "      [--top-p P] [--top-k K] [--repetition-penalty R] [--seed S] [--stop a,b]\n"
      "      streams a completion computed in this process;\n"
      "  moe-cli generate --server HOST:PORT --prompt TEXT [same flags]\n"
      "      streams it from a running coordinator (its gRPC --listen address);\n"
      "      with --json [--logprobs N] either prints one JSON object instead: text, and per\n"
      "      token its id, text and log-probability (for scripts);\n"
      "  moe-cli chat --model DIR [--message TEXT] [--system TEXT] [--chat-template FILE]\n"
      "  moe-cli chat --server HOST:PORT [--message TEXT] [--system TEXT]\n"
      "      [sampling flags] streams the reply to one message through the model's chat\n"
      "      template, in this process or through a coordinator's OpenAI API (its\n"
      "      --http-listen address); without --message, a conversation, one message per\n"
      "      line of stdin (/exit ends);\n"
      "  moe-cli status --server HOST:PORT\n"
      "      prints the workers, their experts and the tokens routed per layer and expert;\n"
      "  moe-cli record-experts --server HOST:PORT [--seconds 60s] --out FILE.csv\n"
      "      writes the tokens routed to each layer and expert (over --seconds, or since the\n"
      "      coordinator started) as CSV layer,expert,tokens.\n"
      "Flag names take dashes or underscores (--max-tokens == --max_tokens).");
  const std::string command = args.size() == 1 ? args[0] : "";
  absl::Status status;
  std::string api_token;
  if (!absl::GetFlag(FLAGS_api_token_file).empty()) {
    auto token = moe::ApiTokens::LoadFirst(absl::GetFlag(FLAGS_api_token_file));
    if (!token.ok()) {
      std::fprintf(stderr, "moe-cli: error: %s\n", std::string(token.status().message()).c_str());
      return 1;
    }
    api_token = *token;
  } else if (const char* env = std::getenv("MOE_API_TOKEN"); env != nullptr) {
    api_token = env;
  }
  if (command == "generate" || command == "chat") {
    moe::CliGenerateOptions o;
    o.model_dir = absl::GetFlag(FLAGS_model);
    o.server = absl::GetFlag(FLAGS_server);
    o.api_token = api_token;
    o.tls_ca = absl::GetFlag(FLAGS_tls_ca);
    o.prompt = absl::GetFlag(FLAGS_prompt);
    o.max_tokens = absl::GetFlag(FLAGS_max_tokens);
    o.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
    o.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
    o.sampling.top_k = absl::GetFlag(FLAGS_top_k);
    o.sampling.repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
    o.sampling.seed = absl::GetFlag(FLAGS_seed);
    o.stop = absl::GetFlag(FLAGS_stop);
    o.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
    o.in_process_workers = absl::GetFlag(FLAGS_workers);
    o.experts_per_token = absl::GetFlag(FLAGS_experts_per_token);
    o.quantize = absl::GetFlag(FLAGS_quantize).type;
    o.json = absl::GetFlag(FLAGS_json);
    o.logprobs = absl::GetFlag(FLAGS_logprobs);
    if (command == "chat") {
      o.prompt = absl::GetFlag(FLAGS_message);
      o.system = absl::GetFlag(FLAGS_system);
      o.chat_template_file = absl::GetFlag(FLAGS_chat_template);
      status = moe::RunChat(o);
    } else {
      status = moe::RunGenerate(o);
    }
  } else if (command == "record-experts") {
    status =
        moe::RunRecordExperts(absl::GetFlag(FLAGS_server), api_token, absl::GetFlag(FLAGS_tls_ca),
                              absl::GetFlag(FLAGS_seconds), absl::GetFlag(FLAGS_out));
  } else if (command == "status") {
    status = moe::RunStatus(absl::GetFlag(FLAGS_server), api_token, absl::GetFlag(FLAGS_tls_ca));
  } else {
    std::fprintf(stderr, "%s\n(run with --help for all flags)\n",
                 absl::ProgramUsageMessage().data());
    return 2;
  }
  if (!status.ok()) {
    std::fprintf(stderr, "moe-cli: error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
