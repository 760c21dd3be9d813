#include "coordinator/generator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "coordinator/scheduler.h"

namespace moe {

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kNone:
      break;
  }
  return "none";
}

absl::Status ValidateGenerationRequest(const GenerationRequest& request,
                                       const ModelConfig& config) {
  if (request.prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", id, " is outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  const int64_t prompt = static_cast<int64_t>(request.prompt.size());
  if (prompt > config.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt of ", prompt, " tokens is longer than the model's context (",
                     "max_position_embeddings = ", config.max_position_embeddings, ")"));
  }
  const GenerationParams& p = request.params;
  if (p.max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", p.max_tokens));
  }
  if (prompt + p.max_tokens > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens (", p.max_tokens, ") + prompt (", prompt, " tokens) exceeds the context (",
        "max_position_embeddings = ", config.max_position_embeddings, ")"));
  }
  for (const std::string& s : p.stop) {
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
  }
  return ValidateSamplingParams(p.sampling);
}

std::string StopMatcher::Add(std::string_view delta, bool* stopped) {
  *stopped = false;
  text_.append(delta);
  // Earliest complete stop string that is not entirely inside already-emitted text (emitted
  // text never contains one, so searching from just before emitted_ suffices).
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) {
    const size_t from = emitted_ >= s.size() ? emitted_ - s.size() + 1 : 0;
    const size_t at = text_.find(s, from);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    text_.resize(std::max(cut, emitted_));
    *stopped = true;
    return Flush();
  }
  // Hold back the longest unemitted suffix that is a proper prefix of a stop string.
  size_t hold = 0;
  const size_t pending = text_.size() - emitted_;
  for (const std::string& s : stops_) {
    for (size_t n = std::min(pending, s.size() - 1); n > hold; --n) {
      if (text_.compare(text_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
    }
  }
  const size_t end = text_.size() - hold;
  std::string out = text_.substr(emitted_, end - emitted_);
  emitted_ = end;
  return out;
}

std::string StopMatcher::Flush() {
  std::string out = text_.substr(emitted_);
  emitted_ = text_.size();
  return out;
}

SequenceDecoder::SequenceDecoder(const GenerationRequest* request, const Tokenizer* tokenizer,
                                 int32_t vocab_size)
    : request_(request),
      tokenizer_(tokenizer),
      sampler_(request->params.sampling, vocab_size),
      detokenizer_(tokenizer, /*continuation=*/true),
      stop_(request->params.stop) {
  // Sized once so that Advance() only appends.
  history_.reserve(request->prompt.size() + request->params.max_tokens);
  history_.assign(request->prompt.begin(), request->prompt.end());
  output_.tokens.reserve(request->params.max_tokens);
}

std::span<const int32_t> SequenceDecoder::NextInput() const {
  if (output_.tokens.empty()) return request_->prompt;
  return {&history_.back(), 1};
}

std::string SequenceDecoder::Advance(float* logits) {
  const int32_t token = sampler_.Sample(logits, history_);
  history_.push_back(token);
  output_.tokens.push_back(token);
  std::string delta = Detokenize(token);
  if (!finished() && IsPastLimit()) output_.finish = FinishReason::kLength;
  if (finished() && output_.finish != FinishReason::kStop) {
    // The sequence ended otherwise: release what the detokenizer and the matcher hold back (a
    // stop string can still complete in it).
    bool stopped = false;
    delta += stop_.Add(detokenizer_.Finish(), &stopped);
    if (stopped) output_.finish = FinishReason::kStop;
    delta += stop_.Flush();
  }
  if (finished()) output_.text = stop_.text();
  return delta;
}

std::string SequenceDecoder::Detokenize(int32_t token) {
  if (!request_->params.ignore_eos && tokenizer_->IsEos(token)) {
    output_.finish = FinishReason::kEos;
    return "";
  }
  bool stopped = false;
  std::string delta = stop_.Add(detokenizer_.Add(token), &stopped);
  if (stopped) output_.finish = FinishReason::kStop;
  return delta;
}

bool SequenceDecoder::IsPastLimit() const {
  return static_cast<int64_t>(output_.tokens.size()) >= request_->params.max_tokens;
}

namespace {

// Forwards one request's tokens to the caller's callback and keeps its output or error.
class CollectingSink : public GenerationSink {
 public:
  CollectingSink(size_t index, const TokenCallback* on_token, GenerationOutput* output,
                 absl::Status* first_error)
      : index_(index), on_token_(on_token), output_(output), first_error_(first_error) {}

  void OnTokens(std::span<const int32_t> tokens, std::string_view text,
                const TokenRoutes*) override {
    if (!*on_token_) return;
    // The text belongs with the last token.
    for (size_t i = 0; i < tokens.size(); ++i) {
      (*on_token_)(index_, tokens[i], i + 1 == tokens.size() ? text : std::string_view());
    }
  }
  void OnFinished(const absl::Status& status, const GenerationOutput& output) override {
    if (status.ok()) {
      *output_ = output;
    } else if (first_error_->ok()) {
      *first_error_ = status;
    }
  }

 private:
  size_t index_;
  const TokenCallback* on_token_;
  GenerationOutput* output_;
  absl::Status* first_error_;
};

// Everything admitted at once: all prompts prefill in the first step, as a batch run expects.
SchedulerOptions BatchOptions(std::span<const GenerationRequest> requests) {
  SchedulerOptions options;
  options.max_running = static_cast<int64_t>(requests.size());
  options.max_waiting = options.max_running;
  options.max_step_tokens = 0;
  for (const GenerationRequest& r : requests) {
    options.max_step_tokens += static_cast<int64_t>(r.prompt.size());
  }
  return options;
}

}  // namespace

absl::StatusOr<std::vector<GenerationOutput>> Generate(Engine* engine, const Tokenizer* tokenizer,
                                                       std::span<const GenerationRequest> requests,
                                                       const TokenCallback& on_token) {
  for (const GenerationRequest& r : requests) {
    MOE_RETURN_IF_ERROR(ValidateGenerationRequest(r, engine->config()));
  }
  if (requests.empty()) return std::vector<GenerationOutput>();
  std::vector<GenerationOutput> outputs(requests.size());
  absl::Status first_error;
  std::vector<CollectingSink> sinks;  // outlive the scheduler, which may finish requests
  sinks.reserve(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    sinks.emplace_back(i, &on_token, &outputs[i], &first_error);
  }
  {
    Scheduler scheduler(engine, tokenizer, BatchOptions(requests));
    for (size_t i = 0; i < requests.size(); ++i) {
      GenerationRequest request = requests[i];
      request.params.trace_routing = false;
      absl::StatusOr<uint64_t> id = scheduler.Submit(std::move(request), &sinks[i]);
      if (!id.ok()) return id.status();
    }
    while (first_error.ok() && scheduler.StepOnce()) {
    }
  }  // the scheduler frees whatever is left
  if (!first_error.ok()) return first_error;
  return outputs;
}

}  // namespace moe
