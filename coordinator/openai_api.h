// The OpenAI-compatible HTTP API (as vLLM serves it), on the same Scheduler as the gRPC API:
//   POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
//   POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health.
// Requests are untrusted: the JSON is parsed with a nesting limit, every field is type-checked
// and unknown fields are refused, and each error is answered in OpenAI's error shape
// {"error": {"message", "type", "param", "code"}} with its HTTP status (400 naming the
// parameter, 401 without the API token when one is required, 404 unknown model or path, 405
// wrong method, 429 queue full, 503 a worker down).
#ifndef MOE_COORDINATOR_OPENAI_API_H_
#define MOE_COORDINATOR_OPENAI_API_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/api_tokens.h"
#include "common/chat_template.h"
#include "common/model_config.h"
#include "common/tokenizer.h"
#include "coordinator/client_limit.h"
#include "coordinator/http_server.h"
#include "coordinator/scheduler.h"

namespace moe {

// What the API reads; every pointer must outlive the OpenAiApi.
struct OpenAiApiDeps {
  Scheduler* scheduler = nullptr;
  const Tokenizer* tokenizer = nullptr;
  const ModelConfig* config = nullptr;
  std::string model_name;  // the only accepted "model" (requests may leave it out)
  // Null: chat requests get 400 saying the model has no chat template.
  const ChatTemplate* chat_template = nullptr;
  std::string chat_template_source;  // for /tokenizer_info
  // Sequences one request may ask for (prompts × n); more is a 400 (the scheduler's queue).
  int64_t max_sequences_per_request = 64;
  // Whether every expert is served (GET /health; 503 when not). Empty: always.
  std::function<bool()> healthy;
  // Called for each request refused before it was queued (metrics); may be empty.
  std::function<void()> on_rejected;
  // Non-null: every endpoint but /health needs "Authorization: Bearer <token>" (else 401).
  const ApiTokens* api_tokens = nullptr;
  // Set by OpenAiApi: MaxPromptBytes(tokenizer, context).
  size_t max_prompt_bytes = 0;
  // Bounds the completions one client host holds open (429 beyond), shared with the gRPC API;
  // null: no bound.
  ClientLimit* client_limit = nullptr;
};

// Thread-safety: Handle may be called concurrently.
class OpenAiApi {
 public:
  explicit OpenAiApi(OpenAiApiDeps deps);
  ~OpenAiApi();

  HttpResponse Handle(const HttpRequest& request) const;

  class Call;

 private:
  OpenAiApiDeps deps_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_OPENAI_API_H_
