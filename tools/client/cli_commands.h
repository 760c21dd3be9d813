// The commands behind moe-cli, as plain functions over an options struct (the main only parses
// flags into it).
#ifndef MOE_TOOLS_CLIENT_CLI_COMMANDS_H_
#define MOE_TOOLS_CLIENT_CLI_COMMANDS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "coordinator/sampler.h"

namespace moe {

struct CliGenerateOptions {
  std::string model_dir;  // local: run the model in this process
  std::string server;     // remote: HOST:PORT of a coordinator (wins over model_dir)
  std::string api_token;  // remote: the server's API token (empty: none)
  std::string
      tls_ca;  // remote gRPC: the CA of the coordinator's TLS certificate (empty: plaintext)
  std::string prompt;
  int64_t max_tokens = 64;
  SamplingParams sampling;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  int64_t in_process_workers = 1;
  int64_t experts_per_token = 0;  // EngineOptions::experts_per_token
  std::optional<DType> quantize;  // local: quantize-on-load
  // `moe-cli chat`: the messages go through the model's chat template (with the generation
  // prompt), encoded without adding BOS (the template has it).
  std::string system;
  std::string chat_template_file;  // overrides the model's template
  // `generate --json`: one JSON object on stdout instead of the streamed text: prompt, text,
  // finish_reason and per token its id, text and log-probability (with `logprobs` alternatives).
  bool json = false;
  int32_t logprobs = 0;
};

// Streams the prompt and the completion to stdout, a summary line to stderr.
absl::Status RunGenerate(const CliGenerateOptions& options);
// `moe-cli chat`: with --model in this process, with --server through a coordinator's OpenAI
// chat API. One message (options.prompt) and its reply, or, without one, a conversation read
// line by line from stdin.
absl::Status RunChat(const CliGenerateOptions& options);

// Prints workers, placement and the expert-load table of a coordinator.
absl::Status RunStatus(const std::string& server, const std::string& api_token = "",
                       const std::string& tls_ca = "");

// `moe-cli record-experts`: the tokens a coordinator routed to each (layer, expert) over the
// next `seconds` (0: since it started), written to `out` as CSV `layer,expert,tokens` (a header
// line, then one line per layer and expert, layers then experts ascending). FAILED_PRECONDITION
// when the coordinator restarted during the recording (its counts went down).
absl::Status RunRecordExperts(const std::string& server, const std::string& api_token,
                              const std::string& tls_ca, absl::Duration seconds,
                              const std::string& out);

}  // namespace moe

#endif  // MOE_TOOLS_CLIENT_CLI_COMMANDS_H_
