#include "coordinator/inference_service.h"

#include <span>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/rpc/rpc_util.h"
#include "common/utf8.h"
#include "coordinator/request_batch.h"

namespace moe {

namespace pb = moecluster::v1;

namespace {

pb::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return pb::FINISH_REASON_LENGTH;
    case FinishReason::kStop:
      return pb::FINISH_REASON_STOP;
    case FinishReason::kEos:
      return pb::FINISH_REASON_EOS;
    case FinishReason::kNone:
      break;
  }
  return pb::FINISH_REASON_UNSPECIFIED;
}

void ToProto(const TokenLogprobs& in, pb::TokenLogprob* out) {
  out->set_token_id(in.token);
  out->set_logprob(in.logprob);
  for (const TopLogprob& t : in.top) {
    pb::TopLogprob* top = out->add_top();
    top->set_token_id(t.token);
    top->set_logprob(t.logprob);
  }
}

void AppendRoutes(const TokenRoutes& routes, std::span<const int32_t> tokens,
                  pb::TokenDelta* delta) {
  for (size_t t = 0; t < tokens.size(); ++t) {
    pb::TokenRoute* route = delta->add_routing();
    route->set_token_id(tokens[t]);
    for (int64_t l = 0; l < routes.layers; ++l) route->add_layers();
    routes.ForEach(t, [&](int64_t l, int32_t expert, float weight) {
      pb::LayerRoute* layer = route->mutable_layers(static_cast<int>(l));
      layer->add_experts(expert);
      layer->add_weights(weight);
    });
  }
}

// One event of the request as the client sees it.
pb::GenerateResponse ToProto(const RequestBatch::Event& e, const std::string& request_id,
                             size_t prompt_tokens) {
  pb::GenerateResponse response;
  if (!e.finished) {
    pb::TokenDelta* delta = response.mutable_delta();
    delta->set_text(e.text);
    delta->mutable_token_ids()->Assign(e.tokens.begin(), e.tokens.end());
    if (e.routes) AppendRoutes(*e.routes, e.tokens, delta);
    for (const TokenLogprobs& l : e.logprobs) ToProto(l, delta->add_logprobs());
    return response;
  }
  const GenerationOutput& output = e.output;
  pb::Final* final = response.mutable_final();
  final->set_request_id(request_id);
  final->set_finish_reason(ToProto(output.finish));
  final->set_text(output.text);
  final->mutable_usage()->set_prompt_tokens(static_cast<uint32_t>(prompt_tokens));
  final->mutable_usage()->set_completion_tokens(static_cast<uint32_t>(output.tokens.size()));
  for (const TokenLogprobs& l : output.prompt_logprobs) ToProto(l, final->add_prompt_logprobs());
  final->set_degraded_tokens(static_cast<uint32_t>(output.degraded_tokens));
  return response;
}

}  // namespace

GenerationRequest FromProto(const pb::GenerateRequest& r, const Tokenizer& tokenizer,
                            int64_t default_max_tokens) {
  GenerationRequest out;
  if (r.has_prompt_ids()) {
    out.prompt.assign(r.prompt_ids().ids().begin(), r.prompt_ids().ids().end());
  } else if (!r.prompt().empty()) {
    out.prompt = tokenizer.Encode(r.prompt());
  }
  out.params.max_tokens = r.has_max_tokens() ? r.max_tokens() : default_max_tokens;
  SamplingParams& s = out.params.sampling;
  if (r.has_temperature()) s.temperature = r.temperature();
  if (r.has_top_p()) s.top_p = r.top_p();
  if (r.has_top_k()) s.top_k = r.top_k();
  if (r.has_repetition_penalty()) s.repetition_penalty = r.repetition_penalty();
  if (r.has_seed()) s.seed = r.seed();
  out.params.stop.assign(r.stop().begin(), r.stop().end());
  out.params.ignore_eos = r.ignore_eos();
  out.params.trace_routing = r.trace_routing();
  if (r.has_logprobs()) out.params.logprobs = r.logprobs();
  if (r.has_prompt_logprobs()) out.params.prompt_logprobs = r.prompt_logprobs();
  if (r.has_experts_per_token()) out.params.experts_per_token = r.experts_per_token();
  return out;
}

grpc::Status InferenceService::Authorize(const grpc::ServerContext* context) const {
  if (deps_.api_tokens == nullptr) return grpc::Status::OK;
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "this server needs an API token: send the metadata \"authorization: "
                        "Bearer <token>\" (moe-cli --api-token-file)");
  }
  if (!deps_.api_tokens->Accepts(std::string_view(it->second.data(), it->second.size()))) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the API token is not accepted");
  }
  return grpc::Status::OK;
}

grpc::Status InferenceService::CheckText(const std::string& text, const char* field) const {
  if (absl::Status s = CheckPromptBytes(text.size(), deps_.max_prompt_bytes, field); !s.ok()) {
    return ToGrpcStatus(s);
  }
  if (const size_t bad = FirstInvalidUtf8(text); bad != text.size()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat(field, " is not valid UTF-8 (byte ", bad, ")"));
  }
  return grpc::Status::OK;
}

grpc::Status InferenceService::Generate(grpc::ServerContext* context,
                                        const pb::GenerateRequest* request,
                                        grpc::ServerWriter<pb::GenerateResponse>* writer) {
  if (grpc::Status s = Authorize(context); !s.ok()) return s;
  // One host's connections share the bound.
  std::unique_ptr<ClientLimit::Slot> slot;
  if (deps_.client_limit != nullptr) {
    if (absl::Status s = deps_.client_limit->Acquire(ClientLimit::HostOf(context->peer()), &slot);
        !s.ok()) {
      if (deps_.on_rejected) deps_.on_rejected();
      return ToGrpcStatus(s);
    }
  }
  if (!request->has_prompt_ids()) {
    if (grpc::Status s = CheckText(request->prompt(), "prompt"); !s.ok()) return s;
  }
  auto rejected = [this](const absl::Status& status) {
    if (deps_.on_rejected) deps_.on_rejected();
    return ToGrpcStatus(status);
  };
  GenerationRequest converted = FromProto(*request, *deps_.tokenizer, deps_.default_max_tokens);
  // The client's deadline also bounds the work: past it the scheduler drops the request and
  // frees its blocks even if the client is still connected.
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    converted.deadline = absl::FromChrono(context->deadline());
  }
  const size_t prompt_tokens = converted.prompt.size();
  RequestBatch batch(deps_.scheduler);
  std::vector<GenerationRequest> one;
  one.push_back(std::move(converted));
  if (absl::Status s = batch.Submit(std::move(one)); !s.ok()) return rejected(s);
  std::vector<RequestBatch::Event> events;
  absl::Status status;
  bool cancelled = false;
  // Poll for client cancellation between outputs: the sync API has no cancel callback.
  for (bool finished = false; !finished;) {
    finished = batch.Take(absl::Milliseconds(50), &events);
    for (const RequestBatch::Event& e : events) {
      if (e.finished) status = e.status;
      if (e.finished && !e.status.ok()) break;
      if (!cancelled && !writer->Write(ToProto(e, request->request_id(), prompt_tokens))) {
        cancelled = true;
      }
    }
    events.clear();
    if (!cancelled && context->IsCancelled()) cancelled = true;
    if (cancelled) batch.CancelAll();  // idempotent; the end still arrives
  }
  return ToGrpcStatus(status);
}

grpc::Status InferenceService::Tokenize(grpc::ServerContext* context,
                                        const pb::TokenizeRequest* request,
                                        pb::TokenizeResponse* response) {
  if (grpc::Status s = Authorize(context); !s.ok()) return s;
  if (grpc::Status s = CheckText(request->text(), "text"); !s.ok()) return s;
  for (int32_t id : deps_.tokenizer->Encode(request->text(), request->add_bos())) {
    response->add_ids(id);
  }
  return grpc::Status::OK;
}

grpc::Status InferenceService::GetModelInfo(grpc::ServerContext* context,
                                            const pb::GetModelInfoRequest*,
                                            pb::ModelInfo* response) {
  if (grpc::Status s = Authorize(context); !s.ok()) return s;
  const ModelConfig& c = *deps_.config;
  response->set_architecture(c.architecture);
  response->set_vocab_size(static_cast<int32_t>(c.vocab_size));
  response->set_hidden_size(static_cast<int32_t>(c.hidden_size));
  response->set_num_layers(static_cast<int32_t>(c.num_hidden_layers));
  response->set_num_experts(static_cast<int32_t>(c.num_local_experts));
  response->set_experts_per_token(static_cast<int32_t>(c.num_experts_per_tok));
  response->set_max_position_embeddings(static_cast<int32_t>(c.max_position_embeddings));
  response->set_dtype(deps_.dtype);
  response->set_fingerprint(deps_.fingerprint);
  response->set_model_experts_per_token(static_cast<int32_t>(deps_.model_experts_per_token));
  return grpc::Status::OK;
}

grpc::Status InferenceService::GetClusterStatus(grpc::ServerContext* context,
                                                const pb::GetClusterStatusRequest*,
                                                pb::ClusterStatus* response) {
  if (grpc::Status s = Authorize(context); !s.ok()) return s;
  const std::vector<WorkerSnapshot> workers = deps_.workers();
  for (const WorkerSnapshot& w : workers) {
    pb::WorkerStatus* s = response->add_workers();
    s->set_address(w.address);
    s->set_state(!w.ready     ? pb::WORKER_STATE_UNAVAILABLE
                 : w.draining ? pb::WORKER_STATE_DRAINING
                              : pb::WORKER_STATE_READY);
    s->set_expert_begin(static_cast<int32_t>(w.experts.begin));
    s->set_expert_end(static_cast<int32_t>(w.experts.end));
    s->set_message(w.message);
    s->set_device(w.device);
    s->set_transport(w.transport);
  }
  const int64_t experts = deps_.config->num_local_experts;
  const bool serving =
      ClusterServing(workers, experts, deps_.config->num_experts_per_tok, deps_.on_expert_loss);
  response->set_serving(serving);
  response->set_degraded(serving && !AllExpertsServed(workers, experts));
  const auto load = deps_.expert_load->Snapshot();
  for (size_t l = 0; l < load.size(); ++l) {
    pb::ExpertLoad* layer = response->add_load();
    layer->set_layer(static_cast<int32_t>(l));
    layer->mutable_tokens()->Assign(load[l].begin(), load[l].end());
  }
  const Scheduler::Stats stats = deps_.scheduler->stats();
  response->set_running_requests(static_cast<int32_t>(stats.running));
  response->set_waiting_requests(static_cast<int32_t>(stats.waiting));
  response->set_kv_cache_usage(
      stats.kv_total_blocks > 0 ? static_cast<double>(stats.kv_used_blocks) / stats.kv_total_blocks
                                : 0.0);
  return grpc::Status::OK;
}

}  // namespace moe
