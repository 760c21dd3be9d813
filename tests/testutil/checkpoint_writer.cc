#include "tests/testutil/checkpoint_writer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moe::testing {

std::vector<uint8_t> RawImage(const std::string& header_json, size_t data_bytes) {
  // Sized once (GCC 12 warns about insert() growing a vector of 8 bytes).
  std::vector<uint8_t> out(8 + header_json.size() + data_bytes, 0);
  const uint64_t n = header_json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  std::copy(header_json.begin(), header_json.end(), out.begin() + 8);
  return out;
}

std::vector<uint8_t> SafetensorsImage(const std::vector<FakeTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<uint8_t> data;
  uint32_t pattern = 12345;
  for (const FakeTensor& t : tensors) {
    uint64_t n = DTypeSize(t.dtype);
    for (int64_t d : t.shape) n *= d;
    std::vector<uint8_t> bytes = t.bytes;
    if (bytes.empty()) {
      // Small finite values in the tensor's dtype.
      for (uint64_t i = 0; i < n / DTypeSize(t.dtype); ++i) {
        pattern = pattern * 1103515245u + 12345u;
        const float v = (static_cast<float>((pattern >> 8) % 2001) - 1000.0f) / 4000.0f;
        if (t.dtype == DType::kF32) {
          const auto* p = reinterpret_cast<const uint8_t*>(&v);
          bytes.insert(bytes.end(), p, p + 4);
        } else {
          const uint16_t h = t.dtype == DType::kF16 ? F32ToF16(v) : F32ToBF16(v);
          bytes.push_back(static_cast<uint8_t>(h));
          bytes.push_back(static_cast<uint8_t>(h >> 8));
        }
      }
    }
    header[t.name] = {{"dtype", std::string(DTypeName(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + bytes.size()}}};
    data.insert(data.end(), bytes.begin(), bytes.end());
  }
  std::vector<uint8_t> image = RawImage(header.dump(), 0);
  image.insert(image.end(), data.begin(), data.end());
  return image;
}

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

std::string TempDir(const std::string& name) {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                              absl::StrCat("moe_", info ? info->name() : "x", "_", name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

std::vector<FakeTensor> TinyModelTensors(const TinyShape& s) {
  const int64_t head_dim = s.hidden / s.heads;
  std::vector<FakeTensor> t;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    t.push_back({std::move(name), s.dtype, std::move(shape), {}});
  };
  add("model.embed_tokens.weight", {s.vocab, s.hidden});
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {s.hidden});
    add(p + "self_attn.q_proj.weight", {s.heads * head_dim, s.hidden});
    add(p + "self_attn.k_proj.weight", {s.kv_heads * head_dim, s.hidden});
    add(p + "self_attn.v_proj.weight", {s.kv_heads * head_dim, s.hidden});
    add(p + "self_attn.o_proj.weight", {s.hidden, s.heads * head_dim});
    add(p + "post_attention_layernorm.weight", {s.hidden});
    if (s.experts == 1) {
      add(p + "mlp.gate_proj.weight", {s.ffn, s.hidden});
      add(p + "mlp.up_proj.weight", {s.ffn, s.hidden});
      add(p + "mlp.down_proj.weight", {s.hidden, s.ffn});
      continue;
    }
    add(p + "block_sparse_moe.gate.weight", {s.experts, s.hidden});
    for (int64_t e = 0; e < s.experts; ++e) {
      const std::string q = absl::StrCat(p, "block_sparse_moe.experts.", e, ".");
      add(q + "w1.weight", {s.ffn, s.hidden});
      add(q + "w2.weight", {s.hidden, s.ffn});
      add(q + "w3.weight", {s.ffn, s.hidden});
    }
  }
  add("model.norm.weight", {s.hidden});
  add("lm_head.weight", {s.vocab, s.hidden});
  return t;
}

std::string TinyModelConfig(const TinyShape& s) {
  nlohmann::json c = {
      {"architectures", {s.experts == 1 ? "LlamaForCausalLM" : "MixtralForCausalLM"}},
      {"vocab_size", s.vocab},
      {"hidden_size", s.hidden},
      {"intermediate_size", s.ffn},
      {"num_hidden_layers", s.layers},
      {"num_attention_heads", s.heads},
      {"num_key_value_heads", s.kv_heads},
      {"max_position_embeddings", 64},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0}};
  if (s.experts > 1) {
    c["num_local_experts"] = s.experts;
    c["num_experts_per_tok"] = s.top_k;
  }
  return c.dump(2);
}

void WriteTinyModel(const std::string& dir, const TinyShape& shape,
                    const std::function<void(std::vector<FakeTensor>*)>& mutate) {
  std::vector<FakeTensor> tensors = TinyModelTensors(shape);
  if (mutate) mutate(&tensors);
  WriteText(dir + "/config.json", TinyModelConfig(shape));
  WriteFile(dir + "/model.safetensors", SafetensorsImage(tensors));
}

}  // namespace moe::testing
