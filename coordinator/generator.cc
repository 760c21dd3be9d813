#include "coordinator/generator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "coordinator/scheduler.h"

namespace moe {

void ComputeLogprobs(std::span<const float> logits, int32_t token, int32_t top_n,
                     TokenLogprobs* out) {
  auto value = [](float x) { return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x; };
  float max = -std::numeric_limits<float>::infinity();
  for (float x : logits) max = std::max(max, value(x));
  double sum = 0.0;
  if (std::isfinite(max)) {
    for (float x : logits) sum += std::exp(static_cast<double>(value(x) - max));
  }
  // Every logit -inf (or some +inf): no finite distribution; report -inf / 0 consistently.
  const float log_sum = std::isfinite(max) ? max + static_cast<float>(std::log(sum)) : max;
  auto logprob = [&](int32_t id) {
    const float x = value(logits[id]);
    if (!std::isfinite(log_sum))
      return x == log_sum ? 0.0f : -std::numeric_limits<float>::infinity();
    return x - log_sum;
  };
  out->token = token;
  out->logprob = logprob(token);
  out->top.clear();
  if (top_n <= 0) return;
  // A min-heap of the best top_n (logit desc, id asc as the order).
  auto better = [&](int32_t a, int32_t b) {
    const float va = value(logits[a]), vb = value(logits[b]);
    return va > vb || (va == vb && a < b);
  };
  std::vector<int32_t> heap;
  heap.reserve(top_n + 1);
  const int32_t vocab = static_cast<int32_t>(logits.size());
  for (int32_t id = 0; id < vocab; ++id) {
    if (static_cast<int32_t>(heap.size()) < top_n) {
      heap.push_back(id);
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (better(id, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = id;
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort(heap.begin(), heap.end(), better);
  out->top.reserve(heap.size());
  for (int32_t id : heap) out->top.push_back({id, logprob(id)});
}

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
  for (const auto& [name, value] : {std::pair<const char*, int32_t>{"logprobs", p.logprobs},
                                    {"prompt_logprobs", p.prompt_logprobs}}) {
    if (value < -1 || value > kMaxTopLogprobs) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be in [0, ", kMaxTopLogprobs, "] (or unset), got ", value));
    }
  }
  const int64_t min_tokens = p.prompt_logprobs >= 0 ? 0 : 1;
  if (p.max_tokens < min_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens must be >= ", min_tokens,
        min_tokens == 0 ? "" : " (0 only when scoring the prompt)", ", got ", p.max_tokens));
  }
  if (prompt + p.max_tokens > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens (", p.max_tokens, ") + prompt (", prompt, " tokens) exceeds the context (",
        "max_position_embeddings = ", config.max_position_embeddings, ")"));
  }
  for (const std::string& s : p.stop) {
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
  }
  MOE_RETURN_IF_ERROR(CheckExpertsPerToken(p.experts_per_token, config));
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
      vocab_size_(vocab_size),
      sampler_(request->params.sampling, vocab_size),
      detokenizer_(tokenizer, /*continuation=*/true),
      stop_(request->params.stop) {
  // Sized once so that Advance() only appends.
  history_.reserve(request->prompt.size() + request->params.max_tokens);
  history_.assign(request->prompt.begin(), request->prompt.end());
  output_.tokens.reserve(request->params.max_tokens);
}

std::span<const int32_t> SequenceDecoder::NextInput() const {
  if (!prefilled_) return request_->prompt;
  if (recompute_) return history_;
  return {&history_.back(), 1};
}

float* SequenceDecoder::Prefilled(float* prompt_rows) {
  if (recompute_) {  // a resumed sequence: the last row continues it; the prompt was scored
    recompute_ = false;
    return prompt_rows;
  }
  const bool scored = wants_prompt_logits();
  prefilled_ = true;
  const size_t n = request_->prompt.size();
  if (!scored) return prompt_rows;
  output_.prompt_logprobs.resize(n - 1);
  for (size_t i = 0; i + 1 < n; ++i) {
    ComputeLogprobs({prompt_rows + i * vocab_size_, static_cast<size_t>(vocab_size_)},
                    request_->prompt[i + 1], request_->params.prompt_logprobs,
                    &output_.prompt_logprobs[i]);
  }
  if (request_->params.max_tokens == 0) output_.finish = FinishReason::kLength;
  return prompt_rows + (n - 1) * vocab_size_;
}

std::string SequenceDecoder::Advance(float* logits) {
  if (request_->params.logprobs >= 0) {
    // Before sampling, which overwrites the logits; for the sampled token, so filled after.
    output_.logprobs.emplace_back();
  }
  const int32_t token = [&] {
    if (request_->params.logprobs < 0) return sampler_.Sample(logits, history_);
    scratch_.assign(logits, logits + vocab_size_);
    const int32_t t = sampler_.Sample(logits, history_);
    ComputeLogprobs(scratch_, t, request_->params.logprobs, &output_.logprobs.back());
    return t;
  }();
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

  void OnTokens(std::span<const int32_t> tokens, std::string_view text, const TokenRoutes*,
                std::span<const TokenLogprobs>) override {
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
