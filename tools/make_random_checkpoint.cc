// moe-make-random-checkpoint: writes a Mixtral (or dense Llama) checkpoint of any shape with
// random weights in Hugging Face layout (config.json + model.safetensors, classic expert names),
// for benchmarks at real sizes without downloading weights.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/main_init.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, out, "", "Output directory (created).");
ABSL_FLAG(int64_t, hidden, 2048, "hidden_size");
ABSL_FLAG(int64_t, ffn, 5632, "intermediate_size (per expert)");
ABSL_FLAG(int64_t, layers, 4, "num_hidden_layers");
ABSL_FLAG(int64_t, heads, 32, "num_attention_heads");
ABSL_FLAG(int64_t, kv_heads, 4, "num_key_value_heads");
ABSL_FLAG(int64_t, experts, 8, "num_local_experts (1 writes a dense LlamaForCausalLM)");
ABSL_FLAG(int64_t, top_k, 2, "num_experts_per_tok");
ABSL_FLAG(int64_t, vocab, 32000, "vocab_size");
ABSL_FLAG(int64_t, max_position, 2048, "max_position_embeddings");
ABSL_FLAG(std::string, dtype, "BF16", "F32, F16 or BF16");
ABSL_FLAG(uint64_t, seed, 1, "Random seed.");
ABSL_FLAG(double, router_skew, 1.0,
          "Scale of expert 0's router row against the others': above 1 the router picks expert 0 "
          "more often (a skewed load, as untrained frankenMoE routers have; 3 gives it about 40 "
          "% of a layer's tokens with 8 experts top-2).");
ABSL_FLAG(std::string, tokenizer, "", "Optional tokenizer.model to copy in (vocab must match).");

namespace moe {
namespace {

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  float scale;  // 0: all ones (norms); else uniform in [-scale, scale]
  uint64_t bytes = 0;
  int64_t first_row = 0;  // elements of the first row, scaled by first_row_factor
  float first_row_factor = 1;
};

std::vector<Tensor> Layout(int64_t hidden, int64_t ffn, int64_t layers, int64_t heads,
                           int64_t kv_heads, int64_t experts, int64_t vocab, float router_skew) {
  const int64_t head_dim = hidden / heads;
  const float s_in = std::sqrt(3.0f / hidden), s_ffn = std::sqrt(3.0f / ffn);
  std::vector<Tensor> t;
  t.push_back({"model.embed_tokens.weight", {vocab, hidden}, 1.0f});
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    t.push_back({p + "input_layernorm.weight", {hidden}, 0});
    t.push_back({p + "self_attn.q_proj.weight", {heads * head_dim, hidden}, s_in});
    t.push_back({p + "self_attn.k_proj.weight", {kv_heads * head_dim, hidden}, s_in});
    t.push_back({p + "self_attn.v_proj.weight", {kv_heads * head_dim, hidden}, s_in});
    t.push_back({p + "self_attn.o_proj.weight", {hidden, heads * head_dim}, s_in});
    t.push_back({p + "post_attention_layernorm.weight", {hidden}, 0});
    if (experts == 1) {
      t.push_back({p + "mlp.gate_proj.weight", {ffn, hidden}, s_in});
      t.push_back({p + "mlp.up_proj.weight", {ffn, hidden}, s_in});
      t.push_back({p + "mlp.down_proj.weight", {hidden, ffn}, s_ffn});
      continue;
    }
    t.push_back(
        {p + "block_sparse_moe.gate.weight", {experts, hidden}, s_in * 4, 0, hidden, router_skew});
    for (int64_t e = 0; e < experts; ++e) {
      const std::string q = absl::StrCat(p, "block_sparse_moe.experts.", e, ".");
      t.push_back({q + "w1.weight", {ffn, hidden}, s_in});
      t.push_back({q + "w2.weight", {hidden, ffn}, s_ffn});
      t.push_back({q + "w3.weight", {ffn, hidden}, s_in});
    }
  }
  t.push_back({"model.norm.weight", {hidden}, 0});
  t.push_back({"lm_head.weight", {vocab, hidden}, s_in});
  return t;
}

int Run() {
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::fprintf(stderr, "error: --out is required\n");
    return 2;
  }
  auto dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  const int64_t hidden = absl::GetFlag(FLAGS_hidden), heads = absl::GetFlag(FLAGS_heads);
  const int64_t kv_heads = absl::GetFlag(FLAGS_kv_heads), experts = absl::GetFlag(FLAGS_experts);
  const int64_t top_k = absl::GetFlag(FLAGS_top_k);
  if (!dtype.ok() || hidden <= 0 || heads <= 0 || hidden % heads != 0 || kv_heads <= 0 ||
      heads % kv_heads != 0 || experts < 1 || top_k < 1 || top_k > experts) {
    std::fprintf(stderr, "error: inconsistent shape flags or dtype (see --help)\n");
    return 2;
  }
  std::filesystem::create_directories(out);
  std::vector<Tensor> tensors = Layout(
      hidden, absl::GetFlag(FLAGS_ffn), absl::GetFlag(FLAGS_layers), heads, kv_heads, experts,
      absl::GetFlag(FLAGS_vocab), static_cast<float>(absl::GetFlag(FLAGS_router_skew)));
  nlohmann::json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (Tensor& t : tensors) {
    uint64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    t.bytes = n * DTypeSize(*dtype);
    header[t.name] = {{"dtype", std::string(DTypeName(*dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes}}};
    offset += t.bytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::ofstream file(out + "/model.safetensors", std::ios::binary);
  const uint64_t len = json.size();
  file.write(reinterpret_cast<const char*>(&len), 8);
  file.write(json.data(), json.size());
  uint64_t state = absl::GetFlag(FLAGS_seed) * 0x9E3779B97F4A7C15ull + 1;
  std::vector<char> buf(1 << 20);
  uint64_t written = 0;
  for (const Tensor& t : tensors) {
    for (uint64_t done = 0; done < t.bytes;) {
      const uint64_t chunk = std::min<uint64_t>(buf.size(), t.bytes - done);
      for (uint64_t i = 0; i < chunk; i += DTypeSize(*dtype)) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;  // xorshift64
        const float u = static_cast<float>(state >> 40) / static_cast<float>(1 << 24);
        const bool first_row = (done + i) / DTypeSize(*dtype) < static_cast<uint64_t>(t.first_row);
        const float v =
            t.scale == 0 ? 1.0f : (2 * u - 1) * t.scale * (first_row ? t.first_row_factor : 1);
        if (*dtype == DType::kF32) std::memcpy(&buf[i], &v, 4);
        const uint16_t h = *dtype == DType::kF16 ? F32ToF16(v) : F32ToBF16(v);
        if (*dtype != DType::kF32) std::memcpy(&buf[i], &h, 2);
      }
      file.write(buf.data(), chunk);
      done += chunk;
    }
    written += t.bytes;
    if (t.bytes > (64u << 20) || &t == &tensors.back()) {
      std::fprintf(stderr, "\r%s: %.2f / %.2f GB", out.c_str(), written / 1e9, offset / 1e9);
    }
  }
  std::fprintf(stderr, "\n");
  nlohmann::json config = {
      {"architectures", {experts == 1 ? "LlamaForCausalLM" : "MixtralForCausalLM"}},
      {"model_type", experts == 1 ? "llama" : "mixtral"},
      {"vocab_size", absl::GetFlag(FLAGS_vocab)},
      {"hidden_size", hidden},
      {"intermediate_size", absl::GetFlag(FLAGS_ffn)},
      {"num_hidden_layers", absl::GetFlag(FLAGS_layers)},
      {"num_attention_heads", heads},
      {"num_key_value_heads", kv_heads},
      {"max_position_embeddings", absl::GetFlag(FLAGS_max_position)},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"hidden_act", "silu"},
      {"tie_word_embeddings", false},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"torch_dtype", *dtype == DType::kF32   ? "float32"
                      : *dtype == DType::kF16 ? "float16"
                                              : "bfloat16"}};
  if (experts > 1) {
    config["num_local_experts"] = experts;
    config["num_experts_per_tok"] = top_k;
  }
  std::ofstream(out + "/config.json") << config.dump(2) << "\n";
  const std::string tokenizer = absl::GetFlag(FLAGS_tokenizer);
  if (!tokenizer.empty()) {
    std::filesystem::copy_file(tokenizer, out + "/tokenizer.model",
                               std::filesystem::copy_options::overwrite_existing);
  }
  return file.good() ? 0 : 1;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  moe::InitMain(
      argc, argv, __FILE__,
      "moe-make-random-checkpoint --out DIR [--hidden 2048 --ffn 5632 --layers 4 --heads 32 "
      "--kv-heads 4 --experts 8 --top-k 2 --vocab 32000 --dtype BF16]\n"
      "Writes a random Mixtral checkpoint (config.json + model.safetensors) for benchmarks.");
  return moe::Run();
}
