// moe-bench: throughput of a checkpoint.
//   moe-bench --model DIR [--prompt-tokens 128] [--decode-steps 32] [--batches 1,8]
//     in this process: the machine's read bandwidth, prefill tok/s, decode tok/s per batch size,
//     and the GB/s of weights read per decode step (shared matrices + the experts the router
//     actually activated);
//   moe-bench --server HOST:PORT [--streams 8] [--max-tokens 64] [--rounds 1]
//     against a running coordinator: aggregate decode tok/s of concurrent streams.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/clock.h"
#include "common/dtype.h"
#include "common/kernels.h"
#include "common/main_init.h"
#include "coordinator/local_model.h"
#include "coordinator/sampler.h"
#include "glog/logging.h"
#include "tools/client/load_bench.h"

ABSL_FLAG(std::string, model, "", "Model: a Hugging Face directory or a GGUF file.");
ABSL_FLAG(moe::QuantizeOption, quantize, {},
          "Quantize a safetensors checkpoint's matrices while loading (q8_0, q4_k, q6_k).");
ABSL_FLAG(int64_t, prompt_tokens, 128, "Prefill length (random token ids).");
ABSL_FLAG(int64_t, decode_steps, 32, "Decode steps timed per batch size.");
ABSL_FLAG(int64_t, prefill_runs, 3, "Timed prefill runs (after one untimed); the best is printed.");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"1", "8"}),
          "Decode batch sizes (comma-separated).");
ABSL_FLAG(int64_t, workers, 1, "In-process expert workers.");
ABSL_FLAG(int64_t, experts_per_token, 0,
          "Route each token to K experts instead of the model's experts per token (0: the model's; "
          "1 <= K <= the model's), renormalising the router weights over the K: faster, and no "
          "longer the model's outputs (reported at start and in GetModelInfo).");
ABSL_FLAG(std::string, server, "", "Benchmark a running coordinator instead (HOST:PORT).");
ABSL_FLAG(int64_t, streams, 8, "With --server: concurrent streams.");
ABSL_FLAG(int64_t, max_tokens, 64, "With --server: tokens generated per stream.");
ABSL_FLAG(int64_t, rounds, 1, "With --server: rounds of --streams streams.");

namespace moe {
namespace {

// Counts the distinct experts each layer used in the current step.
class ExpertTouchCounter : public RoutingObserver {
 public:
  explicit ExpertTouchCounter(int64_t layers) : used_(layers) {}
  void OnRouting(int64_t layer, const Routing& routing) override {
    for (int32_t e : routing.experts) used_[layer].insert(e);
  }
  int64_t TakeCount() {
    int64_t n = 0;
    for (auto& s : used_) n += static_cast<int64_t>(s.size()), s.clear();
    return n;
  }

 private:
  std::vector<std::set<int32_t>> used_;
};

int RunRemote() {
  LoadBenchOptions o;
  o.server = absl::GetFlag(FLAGS_server);
  o.streams = absl::GetFlag(FLAGS_streams);
  o.prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
  o.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  o.rounds = absl::GetFlag(FLAGS_rounds);
  auto r = RunLoadBench(o);
  if (!r.ok()) {
    std::fprintf(stderr, "moe-bench: error: %s\n", std::string(r.status().message()).c_str());
    return 1;
  }
  std::printf(
      "server %s: %lld streams x %lld tokens: %9.1f tok/s decode (%lld tokens in %.2f s), "
      "mean TTFT %.1f ms\n",
      o.server.c_str(), (long long)o.streams, (long long)o.max_tokens, r->decode_tokens_per_s,
      (long long)r->generated_tokens, r->seconds, r->mean_ttft_ms);
  return 0;
}

// The machine's read bandwidth as the kernels see it: the best of 5 passes of dot products
// over a 1 GiB buffer (far larger than any cache) against a 4 MiB one that stays cached, on the
// OpenMP threads, in GB/s of the big buffer. Decode reads every weight once per step, so its GB/s
// of weights over this number is how close it is to the memory roofline.
double MeasureReadBandwidth() {
  const int64_t n = int64_t{1} << 28;  // 1 GiB of floats
  const int64_t chunk = int64_t{1} << 20;
  std::vector<float> buffer(n, 1.0f);
  const std::vector<float> ones(chunk, 1.0f);
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    const absl::Time start = absl::Now();
    float sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (int64_t c = 0; c < n / chunk; ++c) {
      sum += kernels::Dot(&buffer[c * chunk], ones.data(), chunk);
    }
    const double secs = absl::ToDoubleSeconds(absl::Now() - start);
    CHECK_EQ(sum, static_cast<float>(n)) << "bandwidth probe";
    best = std::max(best, static_cast<double>(n) * sizeof(float) / secs / 1e9);
  }
  return best;
}

int Run() {
  if (!absl::GetFlag(FLAGS_server).empty()) return RunRemote();
  LocalModelOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.in_process_workers = absl::GetFlag(FLAGS_workers);
  options.engine.experts_per_token = absl::GetFlag(FLAGS_experts_per_token);
  options.load_tokenizer = false;
  options.quantize = absl::GetFlag(FLAGS_quantize).type;
  if (options.model_dir.empty()) {
    std::fprintf(stderr, "moe-bench: error: --model is required\n");
    return 2;
  }
  auto loaded = LocalModel::Create(options);
  if (!loaded.ok()) {
    std::fprintf(stderr, "moe-bench: error: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  LocalModel& model = **loaded;
  const ModelConfig& c = model.engine()->config();  // experts per token as routed
  Engine* engine = model.engine();
  ExpertTouchCounter touched(c.num_hidden_layers);
  engine->AddRoutingObserver(&touched);

  uint64_t shared_bytes = model.weights().lm_head().bytes();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& w = model.weights().layer(l);
    shared_bytes += w.q_proj.bytes() + w.k_proj.bytes() + w.v_proj.bytes() + w.o_proj.bytes();
  }
  // One expert's bytes per layer as the engine holds them (stored, or quantized on load; GGUF
  // files mix types), from a load of expert 0 alone.
  WeightsOptions probe_options;
  probe_options.load_shared = false;
  probe_options.experts = {0, 1};
  probe_options.quantize = options.quantize;
  uint64_t expert_bytes = 0;
  {
    auto probe = model.checkpoint().LoadWeights(probe_options);  // released before timing
    CHECK(probe.ok()) << probe.status();
    expert_bytes = (*probe)->expert_bytes() / c.num_hidden_layers;
  }

  std::printf("memory read bandwidth %.1f GB/s (1 GiB, %d OpenMP threads)\n",
              MeasureReadBandwidth(), omp_get_max_threads());
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>(c.vocab_size - 1));
  std::vector<float> logits;
  std::printf("model %s: %lld layers, hidden %lld, ffn %lld, %lld experts top-%lld, %s\n",
              options.model_dir.c_str(), (long long)c.num_hidden_layers, (long long)c.hidden_size,
              (long long)c.intermediate_size, (long long)c.num_local_experts,
              (long long)c.num_experts_per_tok,
              std::string(DTypeName(model.weights().dtype())).c_str());

  // Prefill: one sequence, the whole prompt in one step; the first, untimed, run faults the
  // mapped weights in. The best of --prefill-runs: the machine is shared and noisy.
  const int64_t prefill_runs = absl::GetFlag(FLAGS_prefill_runs);
  double best_secs = 0;
  std::vector<int32_t> prompt(absl::GetFlag(FLAGS_prompt_tokens));
  for (int64_t run = 0; run <= prefill_runs && !prompt.empty(); ++run) {
    for (int32_t& t : prompt) t = token(rng);
    SequenceState seq;
    StepInput in{&seq, prompt, false};
    const absl::Time start = absl::Now();
    absl::Status s = engine->Step({&in, 1}, &logits);
    const double secs = absl::ToDoubleSeconds(absl::Now() - start);
    CHECK(s.ok()) << s;
    engine->Release(&seq);
    if (run > 0 && (best_secs == 0 || secs < best_secs)) best_secs = secs;
  }
  touched.TakeCount();
  if (best_secs > 0) {
    std::printf("prefill  %5zu tokens        %9.1f tok/s   (%.3f s, best of %lld)\n", prompt.size(),
                prompt.size() / best_secs, best_secs, static_cast<long long>(prefill_runs));
  }
  // Decode at each batch size: short prompts, then greedy steps with realistic routing.
  for (const std::string& b : absl::GetFlag(FLAGS_batches)) {
    const int64_t batch = std::stoll(b);
    std::vector<SequenceState> seqs(batch);
    std::vector<std::vector<int32_t>> prompts(batch, std::vector<int32_t>(16));
    std::vector<StepInput> inputs(batch);
    for (int64_t i = 0; i < batch; ++i) {
      for (int32_t& t : prompts[i]) t = token(rng);
      inputs[i] = {&seqs[i], prompts[i], false};
    }
    CHECK(engine->Step(inputs, &logits).ok());
    Sampler greedy(SamplingParams{}, static_cast<int32_t>(c.vocab_size));
    std::vector<int32_t> next(batch);
    const int64_t steps = absl::GetFlag(FLAGS_decode_steps);
    touched.TakeCount();
    uint64_t bytes = 0;
    const absl::Time start = absl::Now();
    for (int64_t step = 0; step < steps; ++step) {
      for (int64_t i = 0; i < batch; ++i) {
        next[i] = greedy.Sample(&logits[i * c.vocab_size], {});
        inputs[i] = {&seqs[i], {&next[i], 1}, false};
      }
      absl::Status s = engine->Step(inputs, &logits);
      CHECK(s.ok()) << s;
      bytes += shared_bytes + touched.TakeCount() * expert_bytes;
    }
    const double secs = absl::ToDoubleSeconds(absl::Now() - start);
    for (SequenceState& s : seqs) engine->Release(&s);
    std::printf(
        "decode   batch %3lld           %9.1f tok/s   %7.2f ms/step   %6.2f GB/s weights   %7.2f "
        "MB weights/token\n",
        (long long)batch, batch * steps / secs, 1e3 * secs / steps, bytes / secs / 1e9,
        bytes / 1e6 / static_cast<double>(batch * steps));
  }
  return 0;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  moe::InitMain(argc, argv, __FILE__,
                "moe-bench --model DIR|FILE.gguf [--prompt-tokens 128] [--decode-steps 32] "
                "[--batches 1,8] [--workers 1] [--quantize q8_0|q4_k|q6_k]\nPrefill and decode "
                "throughput of a checkpoint in this process, and the weight bytes read per token.");
  return moe::Run();
}
