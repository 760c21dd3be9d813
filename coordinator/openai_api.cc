#include "coordinator/openai_api.h"

#include <cmath>
#include <optional>
#include <set>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "coordinator/generator.h"
#include "coordinator/request_batch.h"
#include "nlohmann/json.hpp"

namespace moe {

namespace {

using json = nlohmann::json;

constexpr int kMaxJsonDepth = 64;
constexpr int64_t kMaxN = 128;
constexpr size_t kMaxStops = 16;
constexpr double kMaxTimeoutSeconds = 86400;
// What -inf is reported as (JSON has no infinity), as vLLM does.
constexpr float kMinLogprob = -9999.0f;

struct ApiError {
  int status = 400;
  std::string message;
  std::string param;  // empty: null
};

std::string ErrorType(int status) {
  if (status == 401) return "authentication_error";
  if (status == 429) return "rate_limit_error";
  if (status >= 500) return "server_error";
  if (status == 404) return "not_found_error";
  return "invalid_request_error";
}

HttpResponse JsonResponse(int status, const json& body) {
  HttpResponse r;
  r.status = status;
  r.body = body.dump(-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
  return r;
}

json ErrorJson(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", ErrorType(e.status)},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.status}}}};
}

HttpResponse ErrorResponse(const ApiError& e) { return JsonResponse(e.status, ErrorJson(e)); }

// The scheduler's refusal (or a request's failure) as an API error. Messages of
// ValidateGenerationRequest start with the parameter's name.
ApiError FromStatus(const absl::Status& status, bool chat) {
  const std::string message(status.message());
  ApiError e{500, message, ""};
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument: {
      e.status = 400;
      size_t end = 0;
      while (end < message.size() && (absl::ascii_islower(message[end]) || message[end] == '_')) {
        ++end;
      }
      std::string word = message.substr(0, end);
      if (word == "prompt_logprobs") word = chat ? "top_logprobs" : "logprobs";
      if (word == "prompt" && chat) word = "messages";
      for (const char* p : {"prompt", "messages", "max_tokens", "temperature", "top_p", "top_k",
                            "logprobs", "top_logprobs", "stop", "repetition_penalty", "timeout"}) {
        if (word == p) e.param = word;
      }
      break;
    }
    case absl::StatusCode::kResourceExhausted:
      if (absl::StrContains(message, "whole KV cache")) {
        e.status = 400;
        e.param = chat ? "messages" : "prompt";
      } else {
        e.status = 429;
      }
      break;
    case absl::StatusCode::kUnavailable:
      e.status = 503;
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.status = 504;
      break;
    default:
      break;
  }
  return e;
}

// Whether `body` nests arrays/objects at most `max_depth` deep (checked before parsing, so a
// hostile body cannot make the parser recurse deeply).
bool NestingWithin(std::string_view body, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < body.size(); ++i) {
    const char c = body[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return false;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return true;
}

std::optional<ApiError> ParseBody(const std::string& body, json* out) {
  if (!NestingWithin(body, kMaxJsonDepth)) {
    return ApiError{400, absl::StrCat("JSON body nests deeper than ", kMaxJsonDepth, " levels"),
                    ""};
  }
  try {
    *out = json::parse(body);
  } catch (const json::exception& e) {
    return ApiError{400, absl::StrCat("malformed JSON body: ", e.what()), ""};
  }
  if (!out->is_object()) return ApiError{400, "the JSON body must be an object", ""};
  return std::nullopt;
}

// Typed access to a request object's fields; remembers which were read so that the rest can be
// refused as unknown. A null field counts as absent.
class Fields {
 public:
  explicit Fields(const json& object) : object_(object) {}

  const json* Find(const char* key) {
    known_.insert(key);
    auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  std::optional<ApiError> Int(const char* key, int64_t lo, int64_t hi, int64_t* out) {
    const json* v = Find(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number_integer()) return Error(key, "an integer");
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(hi)) {
      return Range(key, lo, hi);
    }
    const int64_t x = v->get<int64_t>();
    if (x < lo || x > hi) return Range(key, lo, hi);
    *out = x;
    return std::nullopt;
  }

  std::optional<ApiError> Float(const char* key, float* out) {
    const json* v = Find(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number()) return Error(key, "a number");
    *out = v->get<float>();
    return std::nullopt;
  }

  std::optional<ApiError> Bool(const char* key, bool* out) {
    const json* v = Find(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_boolean()) return Error(key, "true or false");
    *out = v->get<bool>();
    return std::nullopt;
  }

  std::optional<ApiError> String(const char* key, std::string* out) {
    const json* v = Find(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_string()) return Error(key, "a string");
    *out = v->get<std::string>();
    return std::nullopt;
  }

  // Accepted for compatibility only at the value that means "off".
  std::optional<ApiError> OnlyZero(const char* key) {
    const json* v = Find(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number()) return Error(key, "a number");
    if (v->get<double>() != 0.0) {
      return ApiError{400, absl::StrCat(key, " is not supported (only 0)"), key};
    }
    return std::nullopt;
  }

  std::optional<ApiError> Unknown() const {
    for (auto it = object_.begin(); it != object_.end(); ++it) {
      if (known_.count(it.key()) == 0) {
        return ApiError{400, absl::StrCat("unknown parameter \"", it.key(), "\""), it.key()};
      }
    }
    return std::nullopt;
  }

  static ApiError Error(const std::string& key, const char* what) {
    return ApiError{400, absl::StrCat(key, " must be ", what), key};
  }
  static ApiError Range(const std::string& key, int64_t lo, int64_t hi) {
    return ApiError{400, absl::StrCat(key, " must be an integer in [", lo, ", ", hi, "]"), key};
  }

 private:
  const json& object_;
  std::set<std::string, std::less<>> known_;
};

#define MOE_RETURN_IF_API_ERROR(expr)                    \
  do {                                                   \
    if (std::optional<ApiError> _e = (expr)) return *_e; \
  } while (false)

std::string RandomId(const char* prefix) {
  thread_local absl::BitGen gen;
  return absl::StrCat(prefix, absl::Hex(absl::Uniform<uint64_t>(gen), absl::kZeroPad16),
                      absl::Hex(absl::Uniform<uint64_t>(gen), absl::kZeroPad16));
}

uint64_t RandomSeed() {
  thread_local absl::BitGen gen;
  return absl::Uniform<uint64_t>(gen);
}

float ReportedLogprob(float x) { return std::isfinite(x) ? x : kMinLogprob; }

size_t Codepoints(std::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

std::string_view FinishName(FinishReason f) {
  return f == FinishReason::kLength ? "length" : "stop";  // EOS and stop strings: "stop"
}

// The text of one token alone as it reads inside text (a leading "▁" is a space).
std::string TokenString(const Tokenizer& tokenizer, int32_t id) {
  IncrementalDetokenizer d(&tokenizer, /*continuation=*/true);
  std::string s = d.Add(id);
  s += d.Finish();
  return s;
}

json Bytes(std::string_view s) {
  json out = json::array();
  for (char c : s) out.push_back(static_cast<unsigned char>(c));
  return out;
}

// The legacy completions `logprobs` object, built token by token: pieces from one
// incremental detokenizer over everything it is fed, so that the pieces concatenate to the text.
class LegacyLogprobs {
 public:
  LegacyLogprobs(const Tokenizer* tokenizer, bool continuation)
      : tokenizer_(tokenizer), detokenizer_(tokenizer, continuation) {}

  // `lp` null: no log-probability (the first prompt token).
  void Add(int32_t token, const TokenLogprobs* lp) {
    std::string piece = detokenizer_.Add(token);
    text_offset_.push_back(offset_);
    offset_ += Codepoints(piece);
    tokens_.push_back(std::move(piece));
    if (lp == nullptr) {
      token_logprobs_.push_back(nullptr);
      top_logprobs_.push_back(nullptr);
      return;
    }
    token_logprobs_.push_back(ReportedLogprob(lp->logprob));
    // As OpenAI and vLLM do: the chosen token (spelled as in `tokens`) and the alternatives, so
    // up to N + 1 entries; a spelling shared by several ids keeps the first (most likely).
    json top = json::object();
    top[tokens_.back().get<std::string>()] = ReportedLogprob(lp->logprob);
    for (const TopLogprob& t : lp->top) {
      if (t.token == token) continue;
      const std::string key = TokenString(*tokenizer_, t.token);
      if (!top.contains(key)) top[key] = ReportedLogprob(t.logprob);
    }
    top_logprobs_.push_back(std::move(top));
  }

  // Everything added since the last Take() (all of it with `finish`, held-back text included).
  json Take(bool finish) {
    if (finish) {
      const std::string rest = detokenizer_.Finish();
      if (!rest.empty() && !tokens_.empty()) tokens_.back().get_ref<std::string&>() += rest;
    }
    json out = {{"tokens", std::move(tokens_)},
                {"token_logprobs", std::move(token_logprobs_)},
                {"top_logprobs", std::move(top_logprobs_)},
                {"text_offset", std::move(text_offset_)}};
    tokens_ = json::array();
    token_logprobs_ = json::array();
    top_logprobs_ = json::array();
    text_offset_ = json::array();
    return out;
  }

 private:
  const Tokenizer* tokenizer_;
  IncrementalDetokenizer detokenizer_;
  size_t offset_ = 0;
  json tokens_ = json::array();
  json token_logprobs_ = json::array();
  json top_logprobs_ = json::array();
  json text_offset_ = json::array();
};

json ChatLogprobEntry(const Tokenizer& tokenizer, const TokenLogprobs& lp) {
  const std::string token = TokenString(tokenizer, lp.token);
  json top = json::array();
  for (const TopLogprob& t : lp.top) {
    const std::string s = TokenString(tokenizer, t.token);
    top.push_back({{"token", s}, {"logprob", ReportedLogprob(t.logprob)}, {"bytes", Bytes(s)}});
  }
  return {{"token", token},
          {"logprob", ReportedLogprob(lp.logprob)},
          {"bytes", Bytes(token)},
          {"top_logprobs", std::move(top)}};
}

// The sampling fields both endpoints share.
std::optional<ApiError> ReadSampling(Fields& f, SamplingParams* s, std::optional<uint64_t>* seed) {
  s->temperature = 1.0f;  // OpenAI's default
  MOE_RETURN_IF_API_ERROR(f.Float("temperature", &s->temperature));
  MOE_RETURN_IF_API_ERROR(f.Float("top_p", &s->top_p));
  int64_t top_k = 0;
  MOE_RETURN_IF_API_ERROR(f.Int("top_k", -1, int64_t{1} << 30, &top_k));
  s->top_k = top_k < 0 ? 0 : static_cast<int32_t>(top_k);  // -1: off, as in vLLM
  MOE_RETURN_IF_API_ERROR(f.Float("repetition_penalty", &s->repetition_penalty));
  if (const json* v = f.Find("seed")) {
    if (!v->is_number_integer()) return Fields::Error("seed", "an integer");
    // OpenAI allows negative seeds: any 64-bit pattern seeds the sampler.
    *seed = v->is_number_unsigned() ? v->get<uint64_t>() : static_cast<uint64_t>(v->get<int64_t>());
  }
  MOE_RETURN_IF_API_ERROR(f.OnlyZero("presence_penalty"));
  MOE_RETURN_IF_API_ERROR(f.OnlyZero("frequency_penalty"));
  if (const json* v = f.Find("logit_bias"); v != nullptr && !(v->is_object() && v->empty())) {
    return ApiError{400, "logit_bias is not supported", "logit_bias"};
  }
  std::string user;
  MOE_RETURN_IF_API_ERROR(f.String("user", &user));
  return std::nullopt;
}

std::optional<ApiError> ReadStop(Fields& f, std::vector<std::string>* stop) {
  const json* v = f.Find("stop");
  if (v == nullptr) return std::nullopt;
  if (v->is_string()) {
    stop->push_back(v->get<std::string>());
  } else if (v->is_array() && v->size() <= kMaxStops) {
    for (const json& s : *v) {
      if (!s.is_string()) return Fields::Error("stop", "a string or a list of strings");
      stop->push_back(s.get<std::string>());
    }
  } else {
    return ApiError{
        400, absl::StrCat("stop must be a string or a list of at most ", kMaxStops, " strings"),
        "stop"};
  }
  for (const std::string& s : *stop) {
    if (s.empty()) return ApiError{400, "stop strings must not be empty", "stop"};
  }
  return std::nullopt;
}

// A 400 naming `param` for text that cannot fit the context (CheckPromptBytes).
std::optional<ApiError> TextFits(size_t bytes, size_t max_bytes, const char* param) {
  const absl::Status s = CheckPromptBytes(bytes, max_bytes, param);
  if (s.ok()) return std::nullopt;
  return ApiError{400, std::string(s.message()), param};
}

// The model field, when given, must name the served model (404 otherwise).
std::optional<ApiError> CheckModel(Fields& f, const std::string& served) {
  std::string model;
  MOE_RETURN_IF_API_ERROR(f.String("model", &model));
  if (!model.empty() && model != served) {
    return ApiError{404,
                    absl::StrCat("The model \"", model, "\" does not exist; this server serves \"",
                                 served, "\""),
                    "model"};
  }
  return std::nullopt;
}

std::optional<ApiError> ReadMessages(const json& m, std::vector<ChatMessage>* out) {
  if (!m.is_array() || m.empty()) return Fields::Error("messages", "a non-empty list");
  for (const json& message : m) {
    if (!message.is_object()) return Fields::Error("messages", "a list of objects");
    Fields mf(message);
    ChatMessage c;
    MOE_RETURN_IF_API_ERROR(mf.String("role", &c.role));
    if (c.role.empty()) return ApiError{400, "every message needs a role", "messages"};
    std::string name;
    MOE_RETURN_IF_API_ERROR(mf.String("name", &name));
    if (const json* content = mf.Find("content")) {
      if (content->is_string()) {
        c.content = content->get<std::string>();
      } else if (content->is_array()) {
        for (const json& part : *content) {
          if (!part.is_object() || part.value("type", "") != "text" ||
              !part.value("text", json()).is_string()) {
            return ApiError{400,
                            "message content parts must be {\"type\": \"text\", \"text\": ...}",
                            "messages"};
          }
          c.content += part["text"].get<std::string>();
        }
      } else {
        return Fields::Error("messages", "a list of messages whose content is a string");
      }
    }
    for (const char* ignored : {"tool_calls", "tool_call_id", "refusal"}) mf.Find(ignored);
    if (std::optional<ApiError> e = mf.Unknown()) {
      e->message = absl::StrCat("messages: ", e->message);
      e->param = "messages";
      return e;
    }
    out->push_back(std::move(c));
  }
  return std::nullopt;
}

// `messages` through the chat template, encoded (as apply_chat_template(tokenize=True) does),
// after checking there is a template and the text can fit the context.
std::optional<ApiError> EncodeMessages(const OpenAiApiDeps& deps,
                                       const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt, std::vector<int32_t>* ids) {
  if (deps.chat_template == nullptr) {
    return ApiError{400,
                    "this model has no chat template; start the coordinator with "
                    "--chat-template FILE, or use /v1/completions",
                    "messages"};
  }
  size_t bytes = 0;
  for (const ChatMessage& m : messages) bytes += m.content.size() + m.role.size();
  MOE_RETURN_IF_API_ERROR(TextFits(bytes, deps.max_prompt_bytes, "messages"));
  absl::StatusOr<std::vector<int32_t>> encoded =
      deps.chat_template->Encode(messages, add_generation_prompt, *deps.tokenizer);
  if (!encoded.ok()) {
    return ApiError{400, absl::StrCat("chat template: ", encoded.status().message()), "messages"};
  }
  *ids = std::move(*encoded);
  return std::nullopt;
}

}  // namespace

// One completions or chat request: parsed, submitted, answered (whole or streamed).
class OpenAiApi::Call {
 public:
  Call(const OpenAiApiDeps* deps, bool chat) : deps_(deps), chat_(chat) {}

  HttpResponse Run(const HttpRequest& http) {
    json body;
    if (std::optional<ApiError> e = ParseBody(http.body, &body)) return Refuse(*e);
    if (std::optional<ApiError> e = chat_ ? ParseChat(body) : ParseCompletion(body)) {
      return Refuse(*e);
    }
    batch_ = std::make_shared<RequestBatch>(deps_->scheduler);
    std::vector<GenerationRequest> requests;
    for (size_t i = 0; i < prompts_.size(); ++i) {
      for (int64_t j = 0; j < n_; ++j) {
        GenerationRequest r;
        r.prompt = prompts_[i];
        r.params = params_;
        r.deadline = deadline_;
        r.params.sampling.seed = seed_ ? *seed_ + static_cast<uint64_t>(j) : RandomSeed();
        requests.push_back(std::move(r));
      }
    }
    if (absl::Status s = batch_->Submit(std::move(requests)); !s.ok()) {
      return Refuse(FromStatus(s, chat_));
    }
    id_ = RandomId(chat_ ? "chatcmpl-" : "cmpl-");
    created_ = absl::ToUnixSeconds(absl::Now());
    choices_.resize(batch_->size());
    for (size_t k = 0; k < choices_.size(); ++k) {
      choices_[k].legacy.emplace(deps_->tokenizer, /*continuation=*/!echo_);
    }
    if (stream_) {
      HttpResponse r;
      r.content_type = "text/event-stream";
      auto self = std::make_shared<Call>(std::move(*this));
      auto client_gone = http.client_gone;
      r.stream = [self, client_gone](const ChunkWriter& write) {
        self->Stream(write, client_gone);
      };
      return r;
    }
    return Whole(http.client_gone);
  }

 private:
  struct Choice {
    GenerationOutput output;
    std::optional<LegacyLogprobs> legacy;
    bool started = false;          // stream: the first chunk was sent
    json routing = json::array();  // with return_routing: every generated token's experts
  };

  // With return_routing (ours): per generated token, its experts and weights in every layer,
  // [{"token": id, "layers": [{"experts": [...], "weights": [...]}, ...]}, ...].
  static json RoutingJson(const RequestBatch::Event& e) {
    json out = json::array();
    if (!e.routes.has_value()) return out;
    for (size_t t = 0; t < e.tokens.size(); ++t) {
      json layers = json::array();
      for (int64_t l = 0; l < e.routes->layers; ++l) {
        layers.push_back({{"experts", json::array()}, {"weights", json::array()}});
      }
      e.routes->ForEach(t, [&](int64_t l, int32_t expert, float weight) {
        layers[l]["experts"].push_back(expert);
        layers[l]["weights"].push_back(weight);
      });
      out.push_back({{"token", e.tokens[t]}, {"layers", std::move(layers)}});
    }
    return out;
  }

  HttpResponse Refuse(const ApiError& e) {
    if (deps_->on_rejected && e.status == 429) deps_->on_rejected();
    return ErrorResponse(e);
  }

  std::optional<ApiError> ReadCommon(Fields& f) {
    MOE_RETURN_IF_API_ERROR(CheckModel(f, deps_->model_name));
    MOE_RETURN_IF_API_ERROR(ReadSampling(f, &params_.sampling, &seed_));
    MOE_RETURN_IF_API_ERROR(ReadStop(f, &params_.stop));
    MOE_RETURN_IF_API_ERROR(f.Int("n", 1, kMaxN, &n_));
    MOE_RETURN_IF_API_ERROR(f.Bool("stream", &stream_));
    MOE_RETURN_IF_API_ERROR(f.Bool("ignore_eos", &params_.ignore_eos));
    // Not OpenAI's: each choice (and each streamed chunk) gets "routing", the experts that
    // produced every generated token (as gRPC's trace_routing).
    MOE_RETURN_IF_API_ERROR(f.Bool("return_routing", &params_.trace_routing));
    // Not OpenAI's (llama.cpp users know it as --override-kv ...expert_used_count): route this
    // request's tokens to fewer experts than the server does.
    MOE_RETURN_IF_API_ERROR(f.Int("experts_per_token", 0, deps_->config->routed_experts_per_token(),
                                  &params_.experts_per_token));
    // Not OpenAI's (whose clients time out on their side): seconds after which the request
    // ends with 504 and its KV cache is freed, queued or running.
    if (const json* t = f.Find("timeout")) {
      if (!t->is_number() || !(t->get<double>() > 0) || t->get<double>() > kMaxTimeoutSeconds) {
        return ApiError{
            400,
            absl::StrCat("timeout must be a number of seconds in (0, ", kMaxTimeoutSeconds, "]"),
            "timeout"};
      }
      deadline_ = absl::Now() + absl::Seconds(t->get<double>());
    }
    if (const json* o = f.Find("stream_options")) {
      if (!o->is_object()) return Fields::Error("stream_options", "an object");
      Fields so(*o);
      MOE_RETURN_IF_API_ERROR(so.Bool("include_usage", &include_usage_));
      bool continuous = false;
      MOE_RETURN_IF_API_ERROR(so.Bool("continuous_usage_stats", &continuous));
      MOE_RETURN_IF_API_ERROR(so.Unknown());
    }
    if (const json* b = f.Find("best_of"); b != nullptr && *b != json(n_)) {
      return ApiError{400, "best_of is not supported (only equal to n)", "best_of"};
    }
    return std::nullopt;
  }

  std::optional<ApiError> CheckSize(const char* param) {
    const int64_t sequences = static_cast<int64_t>(prompts_.size()) * n_;
    if (sequences > deps_->max_sequences_per_request) {
      return ApiError{400,
                      absl::StrCat(prompts_.size(), " prompt(s) × n = ", n_, " is ", sequences,
                                   " sequences; one request may ask for at most ",
                                   deps_->max_sequences_per_request),
                      n_ > 1 ? "n" : param};
    }
    const int64_t context = deps_->config->max_position_embeddings;
    if (params_.max_tokens > context) {
      return ApiError{400,
                      absl::StrCat("max_tokens must be at most the model's context (", context,
                                   "), got ", params_.max_tokens),
                      "max_tokens"};
    }
    return std::nullopt;
  }

  std::optional<ApiError> ParseCompletion(const json& body) {
    Fields f(body);
    MOE_RETURN_IF_API_ERROR(ReadCommon(f));
    params_.max_tokens = 16;  // OpenAI's default
    MOE_RETURN_IF_API_ERROR(
        f.Int("max_tokens", 0, deps_->config->max_position_embeddings, &params_.max_tokens));
    MOE_RETURN_IF_API_ERROR(f.Bool("echo", &echo_));
    int64_t logprobs = -1;
    MOE_RETURN_IF_API_ERROR(f.Int("logprobs", 0, kMaxTopLogprobs, &logprobs));
    legacy_logprobs_ = logprobs >= 0;
    params_.logprobs = static_cast<int32_t>(logprobs);
    if (const json* s = f.Find("suffix"); s != nullptr && !(s->is_string() && s->empty())) {
      return ApiError{400, "suffix is not supported", "suffix"};
    }
    const json* prompt = f.Find("prompt");
    if (prompt == nullptr) return ApiError{400, "prompt is required", "prompt"};
    MOE_RETURN_IF_API_ERROR(ReadPrompts(*prompt));
    MOE_RETURN_IF_API_ERROR(f.Unknown());
    if (echo_) {
      // The prompt is scored (a prefill with logits at every position) when its log-probabilities
      // are asked for, and so that max_tokens = 0 is valid: the answer is then the prompt alone.
      params_.prompt_logprobs = legacy_logprobs_ ? params_.logprobs : 0;
      if (stream_ && legacy_logprobs_) {
        return ApiError{400, "echo with logprobs is not supported with stream; use stream: false",
                        "echo"};
      }
    } else if (params_.max_tokens == 0) {
      return ApiError{400, "max_tokens must be >= 1 (0 only with echo)", "max_tokens"};
    }
    return CheckSize("prompt");
  }

  std::optional<ApiError> ReadPrompts(const json& p) {
    const Tokenizer& tokenizer = *deps_->tokenizer;
    std::optional<ApiError> too_long;
    auto add_text = [&](const std::string& text) {
      if ((too_long = TextFits(text.size(), deps_->max_prompt_bytes, "prompt"))) return;
      prompts_.push_back(tokenizer.Encode(text));
      prompt_texts_.push_back(text);
    };
    auto add_ids = [&](const json& ids) -> std::optional<ApiError> {
      std::vector<int32_t> tokens;
      for (const json& id : ids) {
        if (!id.is_number_integer()) {
          return Fields::Error("prompt", "a string, a list of strings, or token ids");
        }
        const int64_t v = id.get<int64_t>();
        if (id.is_number_unsigned() ? id.get<uint64_t>() >= uint64_t(tokenizer.vocab_size())
                                    : (v < 0 || v >= tokenizer.vocab_size())) {
          return ApiError{
              400,
              absl::StrCat("prompt token id ", id.dump(), " is outside the vocabulary [0, ",
                           tokenizer.vocab_size(), ")"),
              "prompt"};
        }
        tokens.push_back(static_cast<int32_t>(v));
      }
      prompt_texts_.push_back(tokenizer.Decode(tokens));
      prompts_.push_back(std::move(tokens));
      return std::nullopt;
    };
    if (p.is_string()) {
      add_text(p.get<std::string>());
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      MOE_RETURN_IF_API_ERROR(add_ids(p));
    } else if (p.is_array() && !p.empty()) {
      if (static_cast<int64_t>(p.size()) > deps_->max_sequences_per_request) {
        return ApiError{400,
                        absl::StrCat("at most ", deps_->max_sequences_per_request,
                                     " prompts per request, got ", p.size()),
                        "prompt"};
      }
      for (const json& item : p) {
        if (item.is_string()) {
          add_text(item.get<std::string>());
        } else if (item.is_array() && !item.empty()) {
          MOE_RETURN_IF_API_ERROR(add_ids(item));
        } else {
          return Fields::Error("prompt", "a string, a list of strings, or token ids");
        }
      }
    } else {
      return Fields::Error("prompt", "a non-empty string, list of strings, or token ids");
    }
    if (too_long) return too_long;
    for (const auto& prompt : prompts_) {
      if (prompt.empty()) return ApiError{400, "prompt encodes to no tokens", "prompt"};
    }
    return std::nullopt;
  }

  std::optional<ApiError> ParseChat(const json& body) {
    Fields f(body);
    MOE_RETURN_IF_API_ERROR(ReadCommon(f));
    int64_t max_tokens = -1;
    MOE_RETURN_IF_API_ERROR(
        f.Int("max_tokens", 1, deps_->config->max_position_embeddings, &max_tokens));
    MOE_RETURN_IF_API_ERROR(
        f.Int("max_completion_tokens", 1, deps_->config->max_position_embeddings, &max_tokens));
    bool logprobs = false;
    MOE_RETURN_IF_API_ERROR(f.Bool("logprobs", &logprobs));
    int64_t top = 0;
    MOE_RETURN_IF_API_ERROR(f.Int("top_logprobs", 0, kMaxTopLogprobs, &top));
    if (top > 0 && !logprobs) {
      return ApiError{400, "top_logprobs needs logprobs: true", "top_logprobs"};
    }
    params_.logprobs = logprobs ? static_cast<int32_t>(top) : -1;
    bool add_generation_prompt = true;
    MOE_RETURN_IF_API_ERROR(f.Bool("add_generation_prompt", &add_generation_prompt));
    if (const json* r = f.Find("response_format");
        r != nullptr && !(r->is_object() && r->value("type", "") == "text" && r->size() == 1)) {
      return ApiError{400, "response_format is not supported (only {\"type\": \"text\"})",
                      "response_format"};
    }
    for (const char* unsupported : {"tools", "tool_choice", "functions", "function_call"}) {
      if (const json* v = f.Find(unsupported); v != nullptr && !(v->is_array() && v->empty())) {
        if (std::string_view(unsupported) == "tool_choice" && *v == "none") continue;
        return ApiError{400, absl::StrCat(unsupported, " is not supported"), unsupported};
      }
    }
    bool parallel_tool_calls = true;
    MOE_RETURN_IF_API_ERROR(f.Bool("parallel_tool_calls", &parallel_tool_calls));
    std::vector<ChatMessage> messages;
    const json* m = f.Find("messages");
    if (m == nullptr) return ApiError{400, "messages is required", "messages"};
    MOE_RETURN_IF_API_ERROR(ReadMessages(*m, &messages));
    MOE_RETURN_IF_API_ERROR(f.Unknown());
    std::vector<int32_t> ids;
    MOE_RETURN_IF_API_ERROR(EncodeMessages(*deps_, messages, add_generation_prompt, &ids));
    if (ids.empty()) return ApiError{400, "the chat template rendered no tokens", "messages"};
    const int64_t room = deps_->config->max_position_embeddings - static_cast<int64_t>(ids.size());
    params_.max_tokens = max_tokens > 0 ? max_tokens : std::max<int64_t>(room, 1);
    prompts_.push_back(std::move(ids));
    return CheckSize("messages");
  }

  json Usage() const {
    size_t prompt = 0, completion = 0;
    for (const auto& p : prompts_) prompt += p.size();
    for (const Choice& c : choices_) completion += c.output.tokens.size();
    return {{"prompt_tokens", prompt},
            {"completion_tokens", completion},
            {"total_tokens", prompt + completion}};
  }

  size_t PromptOf(size_t index) const { return index / static_cast<size_t>(n_); }

  // Feeds the legacy logprobs of a finished choice: the prompt (echo), then what was generated.
  void AddLegacy(size_t index) {
    Choice& c = choices_[index];
    if (echo_) {
      const std::vector<int32_t>& prompt = prompts_[PromptOf(index)];
      for (size_t t = 0; t < prompt.size(); ++t) {
        const bool scored = t > 0 && t - 1 < c.output.prompt_logprobs.size() && legacy_logprobs_;
        c.legacy->Add(prompt[t], scored ? &c.output.prompt_logprobs[t - 1] : nullptr);
      }
    }
    for (size_t t = 0; t < c.output.tokens.size() && t < c.output.logprobs.size(); ++t) {
      c.legacy->Add(c.output.tokens[t], &c.output.logprobs[t]);
    }
  }

  json ChoiceJson(size_t index) {
    Choice& c = choices_[index];
    if (chat_) {
      json logprobs = nullptr;
      if (params_.logprobs >= 0) {
        logprobs = {{"content", json::array()}};
        for (const TokenLogprobs& lp : c.output.logprobs) {
          logprobs["content"].push_back(ChatLogprobEntry(*deps_->tokenizer, lp));
        }
      }
      return WithDegraded(c, {{"index", index},
                              {"message", {{"role", "assistant"}, {"content", c.output.text}}},
                              {"logprobs", std::move(logprobs)},
                              {"finish_reason", FinishName(c.output.finish)}});
    }
    json logprobs = nullptr;
    if (legacy_logprobs_) {
      AddLegacy(index);
      logprobs = c.legacy->Take(/*finish=*/true);
    }
    return WithDegraded(
        c, {{"index", index},
            {"text", echo_ ? prompt_texts_[PromptOf(index)] + c.output.text : c.output.text},
            {"logprobs", std::move(logprobs)},
            {"finish_reason", FinishName(c.output.finish)}});
  }

  // Adds "degraded_tokens" (not in OpenAI's schema) to a choice that was routed around lost
  // experts (--on-expert-loss reroute), so a client can tell the output is not the exact
  // model's.
  json WithDegraded(const Choice& c, json choice) const {
    if (c.output.degraded_tokens > 0) choice["degraded_tokens"] = c.output.degraded_tokens;
    if (params_.trace_routing && !stream_) choice["routing"] = c.routing;
    return choice;
  }

  // Runs the batch to its end. Returns the first failure, if any (the rest is then cancelled).
  // `on_event` sees every event of requests that have not failed.
  template <typename OnEvent>
  absl::Status Drain(const std::function<bool()>& client_gone, OnEvent on_event) {
    std::vector<RequestBatch::Event> events;
    absl::Status failure;
    bool cancelled = false;
    for (bool finished = false; !finished;) {
      finished = batch_->Take(absl::Milliseconds(20), &events);
      for (RequestBatch::Event& e : events) {
        if (e.finished && !e.status.ok()) {
          if (failure.ok()) failure = e.status;
          continue;
        }
        if (failure.ok() && !cancelled && !on_event(e)) cancelled = true;
      }
      events.clear();
      if (!cancelled && (!failure.ok() || client_gone())) cancelled = true;
      if (cancelled) batch_->CancelAll();
    }
    if (cancelled && failure.ok()) failure = absl::CancelledError("the client went away");
    return failure;
  }

  HttpResponse Whole(const std::function<bool()>& client_gone) {
    const absl::Status s = Drain(client_gone, [&](RequestBatch::Event& e) {
      if (params_.trace_routing) {
        for (json& r : RoutingJson(e)) choices_[e.index].routing.push_back(std::move(r));
      }
      if (e.finished) choices_[e.index].output = std::move(e.output);
      return true;
    });
    if (!s.ok()) return ErrorResponse(FromStatus(s, chat_));
    json choices = json::array();
    for (size_t k = 0; k < choices_.size(); ++k) choices.push_back(ChoiceJson(k));
    return JsonResponse(200, {{"id", id_},
                              {"object", chat_ ? "chat.completion" : "text_completion"},
                              {"created", created_},
                              {"model", deps_->model_name},
                              {"choices", std::move(choices)},
                              {"usage", Usage()}});
  }

  json Chunk(json choice) const {
    json choices = json::array();
    if (!choice.is_null()) choices.push_back(std::move(choice));
    return {{"id", id_},
            {"object", chat_ ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", deps_->model_name},
            {"choices", std::move(choices)}};
  }

  static std::string Event(const json& data) {
    return absl::StrCat("data: ", data.dump(-1, ' ', false, json::error_handler_t::replace),
                        "\n\n");
  }

  void Stream(const ChunkWriter& write, const std::function<bool()>& client_gone) {
    auto gone = [&] { return client_gone(); };
    const absl::Status s = Drain(gone, [&](RequestBatch::Event& e) {
      Choice& c = choices_[e.index];
      std::string out;
      if (!c.started) {
        c.started = true;
        if (chat_) {
          out += Event(Chunk({{"index", e.index},
                              {"delta", {{"role", "assistant"}, {"content", ""}}},
                              {"logprobs", nullptr},
                              {"finish_reason", nullptr}}));
        } else if (echo_) {
          out += Event(Chunk({{"index", e.index},
                              {"text", prompt_texts_[PromptOf(e.index)]},
                              {"logprobs", nullptr},
                              {"finish_reason", nullptr}}));
        }
      }
      if (!e.tokens.empty() || !e.text.empty()) {
        json logprobs = nullptr;
        if (chat_ && params_.logprobs >= 0) {
          logprobs = {{"content", json::array()}};
          for (const TokenLogprobs& lp : e.logprobs) {
            logprobs["content"].push_back(ChatLogprobEntry(*deps_->tokenizer, lp));
          }
        } else if (legacy_logprobs_) {
          for (const TokenLogprobs& lp : e.logprobs) c.legacy->Add(lp.token, &lp);
          logprobs = c.legacy->Take(/*finish=*/false);
        }
        json choice = {
            {"index", e.index}, {"logprobs", std::move(logprobs)}, {"finish_reason", nullptr}};
        if (params_.trace_routing) choice["routing"] = RoutingJson(e);
        if (chat_) {
          choice["delta"] = {{"content", e.text}};
        } else {
          choice["text"] = e.text;
        }
        out += Event(Chunk(std::move(choice)));
      }
      if (e.finished) {
        c.output = std::move(e.output);
        json choice = WithDegraded(c, {{"index", e.index},
                                       {"logprobs", nullptr},
                                       {"finish_reason", FinishName(c.output.finish)}});
        if (chat_) {
          choice["delta"] = json::object();
        } else {
          choice["text"] = "";
        }
        out += Event(Chunk(std::move(choice)));
      }
      return write(out);
    });
    if (!s.ok()) {
      if (!absl::IsCancelled(s)) write(Event(ErrorJson(FromStatus(s, chat_))));
      write("data: [DONE]\n\n");
      return;
    }
    if (include_usage_) {
      json usage = Chunk(nullptr);
      usage["usage"] = Usage();
      write(Event(usage));
    }
    write("data: [DONE]\n\n");
  }

  const OpenAiApiDeps* deps_;
  bool chat_;
  GenerationParams params_;
  absl::Time deadline_ = absl::InfiniteFuture();
  std::optional<uint64_t> seed_;
  int64_t n_ = 1;
  bool stream_ = false;
  bool include_usage_ = false;
  bool echo_ = false;
  bool legacy_logprobs_ = false;
  std::vector<std::vector<int32_t>> prompts_;
  std::vector<std::string> prompt_texts_;
  std::shared_ptr<RequestBatch> batch_;
  std::string id_;
  int64_t created_ = 0;
  std::vector<Choice> choices_;
};

OpenAiApi::OpenAiApi(OpenAiApiDeps deps) : deps_(std::move(deps)) {
  deps_.max_prompt_bytes = MaxPromptBytes(*deps_.tokenizer, deps_.config->max_position_embeddings);
}
OpenAiApi::~OpenAiApi() = default;

namespace {

HttpResponse HandleTokenize(const OpenAiApiDeps& deps, const json& body) {
  Fields f(body);
  if (auto e = CheckModel(f, deps.model_name)) return ErrorResponse(*e);
  bool add_special = true;
  if (auto e = f.Bool("add_special_tokens", &add_special)) return ErrorResponse(*e);
  std::vector<int32_t> tokens;
  if (const json* messages = f.Find("messages")) {
    bool add_generation_prompt = true;
    if (auto e = f.Bool("add_generation_prompt", &add_generation_prompt)) return ErrorResponse(*e);
    std::vector<ChatMessage> chat;
    if (auto e = ReadMessages(*messages, &chat)) return ErrorResponse(*e);
    if (auto e = EncodeMessages(deps, chat, add_generation_prompt, &tokens)) {
      return ErrorResponse(*e);
    }
  } else {
    std::string prompt;
    if (auto e = f.String("prompt", &prompt)) return ErrorResponse(*e);
    if (f.Find("prompt") == nullptr) {
      return ErrorResponse({400, "prompt (or messages) is required", "prompt"});
    }
    if (auto e = TextFits(prompt.size(), deps.max_prompt_bytes, "prompt")) {
      return ErrorResponse(*e);
    }
    tokens = deps.tokenizer->Encode(prompt, add_special);
  }
  if (auto e = f.Unknown()) return ErrorResponse(*e);
  return JsonResponse(200, {{"count", tokens.size()},
                            {"max_model_len", deps.config->max_position_embeddings},
                            {"tokens", tokens},
                            {"token_strs", nullptr}});
}

HttpResponse HandleDetokenize(const OpenAiApiDeps& deps, const json& body) {
  Fields f(body);
  std::string model;
  if (auto e = f.String("model", &model)) return ErrorResponse(*e);
  const json* tokens = f.Find("tokens");
  if (auto e = f.Unknown()) return ErrorResponse(*e);
  if (tokens == nullptr || !tokens->is_array()) {
    return ErrorResponse(Fields::Error("tokens", "a list of token ids"));
  }
  std::vector<int32_t> ids;
  for (const json& t : *tokens) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 ||
        t.get<int64_t>() >= deps.tokenizer->vocab_size()) {
      return ErrorResponse({400,
                            absl::StrCat("tokens must be ids in [0, ", deps.tokenizer->vocab_size(),
                                         "), got ", t.dump()),
                            "tokens"});
    }
    ids.push_back(t.get<int32_t>());
  }
  return JsonResponse(200, {{"prompt", deps.tokenizer->Decode(ids)}});
}

json TokenOrNull(const Tokenizer& tokenizer, int32_t id) {
  if (id < 0 || id >= tokenizer.vocab_size()) return nullptr;
  return tokenizer.TokenText(id);
}

}  // namespace

HttpResponse OpenAiApi::Handle(const HttpRequest& request) const {
  const std::string& path = request.path;
  const bool get = request.method == "GET";
  const bool post = request.method == "POST";
  auto wrong_method = [&](const char* allowed) {
    return ErrorResponse(
        {405, absl::StrCat(request.method, " is not allowed on ", path, "; use ", allowed), ""});
  };
  if (deps_.api_tokens != nullptr && path != "/health" &&
      !deps_.api_tokens->Accepts(request.authorization)) {
    return ErrorResponse({401,
                          request.authorization.empty()
                              ? "this server needs an API key: send \"Authorization: Bearer "
                                "<token>\" (the OpenAI clients' api_key)"
                              : "the API key is not accepted",
                          ""});
  }
  if (path == "/v1/completions" || path == "/v1/chat/completions") {
    if (!post) return wrong_method("POST");
    std::shared_ptr<ClientLimit::Slot> slot;
    if (deps_.client_limit != nullptr) {
      std::unique_ptr<ClientLimit::Slot> acquired;
      if (absl::Status s = deps_.client_limit->Acquire(request.peer, &acquired); !s.ok()) {
        if (deps_.on_rejected) deps_.on_rejected();
        return ErrorResponse({429, std::string(s.message()), ""});
      }
      slot = std::move(acquired);
    }
    Call call(&deps_, path == "/v1/chat/completions");
    HttpResponse response = call.Run(request);
    // A streamed response runs after this returns: its writer holds the slot until it ends.
    if (slot != nullptr && response.stream) {
      response.stream = [inner = std::move(response.stream), slot](const ChunkWriter& write) {
        inner(write);
      };
    }
    return response;
  }
  if (path == "/tokenize" || path == "/detokenize") {
    if (!post) return wrong_method("POST");
    json body;
    if (std::optional<ApiError> e = ParseBody(request.body, &body)) return ErrorResponse(*e);
    return path == "/tokenize" ? HandleTokenize(deps_, body) : HandleDetokenize(deps_, body);
  }
  if (path == "/v1/models") {
    if (!get) return wrong_method("GET");
    return JsonResponse(200, {{"object", "list"},
                              {"data",
                               {{{"id", deps_.model_name},
                                 {"object", "model"},
                                 {"created", 0},
                                 {"owned_by", "moe-cluster"},
                                 {"max_model_len", deps_.config->max_position_embeddings}}}}});
  }
  if (path == "/tokenizer_info") {
    if (!get) return wrong_method("GET");
    const Tokenizer& t = *deps_.tokenizer;
    return JsonResponse(
        200, {{"tokenizer_class", "LlamaTokenizer"},
              {"bos_token", TokenOrNull(t, t.bos_id())},
              {"eos_token", t.eos_ids().empty() ? json(nullptr) : TokenOrNull(t, t.eos_ids()[0])},
              {"eos_token_ids", t.eos_ids()},
              {"add_bos_token", t.bos_id() >= 0},
              {"model_max_length", deps_.config->max_position_embeddings},
              {"vocab_size", t.vocab_size()},
              {"chat_template",
               deps_.chat_template == nullptr ? json(nullptr) : json(deps_.chat_template_source)}});
  }
  if (path == "/health") {
    if (!get) return wrong_method("GET");
    if (deps_.healthy && !deps_.healthy()) {
      return ErrorResponse({503, "not every expert is served (a worker is down)", ""});
    }
    return JsonResponse(200, json::object());
  }
  return ErrorResponse({404, absl::StrCat("no such endpoint: ", request.method, " ", path), ""});
}

}  // namespace moe
