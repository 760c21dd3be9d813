#include "coordinator/generator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

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
      return absl::InvalidArgumentError(absl::StrCat("prompt token id ", id,
                                                     " is outside the vocabulary [0, ",
                                                     config.vocab_size, ")"));
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

namespace {

struct ActiveSequence {
  ActiveSequence(const GenerationRequest& r, int32_t vocab, const Tokenizer* tokenizer)
      : request(&r), sampler(r.params.sampling, vocab), detokenizer(tokenizer),
        stop(r.params.stop), history(r.prompt) {}
  const GenerationRequest* request;
  SequenceState state;
  Sampler sampler;
  IncrementalDetokenizer detokenizer;
  StopMatcher stop;
  std::vector<int32_t> history;  // prompt + generated
  GenerationOutput output;
  bool done = false;
};

// Samples and appends the next token; returns the text delta to stream.
std::string Advance(ActiveSequence* s, const Tokenizer* tokenizer, float* logits) {
  const int32_t token = s->sampler.Sample(logits, s->history);
  s->history.push_back(token);
  s->output.tokens.push_back(token);
  const GenerationParams& p = s->request->params;
  std::string delta;
  if (!p.ignore_eos && tokenizer->IsEos(token)) {
    s->output.finish = FinishReason::kEos;
  } else {
    bool stopped = false;
    delta = s->stop.Add(s->detokenizer.Add(token), &stopped);
    if (stopped) s->output.finish = FinishReason::kStop;
  }
  if (s->output.finish == FinishReason::kNone &&
      static_cast<int64_t>(s->output.tokens.size()) >= p.max_tokens) {
    s->output.finish = FinishReason::kLength;
  }
  if (s->output.finish != FinishReason::kNone && s->output.finish != FinishReason::kStop) {
    bool stopped = false;
    delta += s->stop.Add(s->detokenizer.Finish(), &stopped);
    if (stopped) s->output.finish = FinishReason::kStop;
    delta += s->stop.Flush();
  }
  if (s->output.finish != FinishReason::kNone) {
    s->output.text = s->stop.text();
    s->done = true;
  }
  return delta;
}

}  // namespace

absl::StatusOr<std::vector<GenerationOutput>> Generate(Engine* engine, const Tokenizer* tokenizer,
                                                       std::span<const GenerationRequest> requests,
                                                       const TokenCallback& on_token) {
  const ModelConfig& config = engine->config();
  for (const GenerationRequest& r : requests) {
    MOE_RETURN_IF_ERROR(ValidateGenerationRequest(r, config));
  }
  std::vector<std::unique_ptr<ActiveSequence>> seqs;
  for (const GenerationRequest& r : requests) {
    seqs.push_back(std::make_unique<ActiveSequence>(r, config.vocab_size, tokenizer));
  }
  std::vector<StepInput> inputs;
  std::vector<size_t> owners;
  std::vector<float> logits;
  absl::Status status;
  while (status.ok()) {
    inputs.clear();
    owners.clear();
    for (size_t i = 0; i < seqs.size(); ++i) {
      ActiveSequence& s = *seqs[i];
      if (s.done) continue;
      // First step: the whole prompt; then the last generated token.
      std::span<const int32_t> tokens =
          s.output.tokens.empty() ? std::span<const int32_t>(s.request->prompt)
                                  : std::span<const int32_t>(&s.history.back(), 1);
      inputs.push_back({&s.state, tokens, false});
      owners.push_back(i);
    }
    if (inputs.empty()) break;
    status = engine->Step(inputs, &logits);
    if (!status.ok()) break;
    for (size_t j = 0; j < owners.size(); ++j) {
      ActiveSequence& s = *seqs[owners[j]];
      const std::string delta = Advance(&s, tokenizer, &logits[j * config.vocab_size]);
      if (on_token) on_token(owners[j], s.output.tokens.back(), delta);
      if (s.done) engine->Release(&s.state);
    }
  }
  for (auto& s : seqs) engine->Release(&s->state);
  if (!status.ok()) return status;
  std::vector<GenerationOutput> outputs;
  for (auto& s : seqs) outputs.push_back(std::move(s->output));
  return outputs;
}

}  // namespace moe
