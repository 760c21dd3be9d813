#include "common/model_config.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using Json = nlohmann::json;

class ConfigReader {
 public:
  ConfigReader(const Json& j, const std::string& label) : j_(j), label_(label) {}

  absl::Status Error(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(label_, ": ", what));
  }
  bool Has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  // A positive integer; `fallback` when absent (0 = required).
  absl::StatusOr<int64_t> PositiveInt(const char* key, int64_t fallback = 0) const {
    if (!Has(key)) {
      if (fallback > 0) return fallback;
      return Error(absl::StrCat("missing required key \"", key, "\""));
    }
    const Json& v = j_.at(key);
    if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > (1ll << 40)) {
      return Error(absl::StrCat("\"", key, "\" must be a positive integer, got ", v.dump()));
    }
    return v.get<int64_t>();
  }
  absl::StatusOr<double> PositiveNumber(const Json& v, const char* key) const {
    if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>())) {
      return Error(absl::StrCat("\"", key, "\" must be a positive number, got ", v.dump()));
    }
    return v.get<double>();
  }
  absl::StatusOr<bool> Bool(const char* key, bool fallback) const {
    if (!Has(key)) return fallback;
    if (!j_.at(key).is_boolean()) return Error(absl::StrCat("\"", key, "\" must be true or false"));
    return j_.at(key).get<bool>();
  }
  const Json& at(const char* key) const { return j_.at(key); }

 private:
  const Json& j_;
  const std::string& label_;
};

absl::Status RejectUnsupported(const ConfigReader& r, const Json& j) {
  if (r.Has("hidden_act") && j["hidden_act"] != "silu") {
    return r.Error(
        absl::StrCat("hidden_act ", j["hidden_act"].dump(), " is not supported (only silu)"));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (r.Has(key) && j[key] != false) return r.Error(absl::StrCat(key, "=true is not supported"));
  }
  if (r.Has("rope_scaling")) {
    return r.Error("rope_scaling is not supported (only plain RoPE)");
  }
  if (r.Has("rope_parameters")) {
    const Json& p = j["rope_parameters"];
    if (!p.is_object()) return r.Error("rope_parameters must be an object");
    if (p.contains("rope_type") && p["rope_type"] != "default") {
      return r.Error(absl::StrCat("rope_parameters.rope_type ", p["rope_type"].dump(),
                                  " is not supported (only \"default\")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Architecture(const ConfigReader& r, const Json& j) {
  std::string arch;
  if (r.Has("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string()) {
    arch = j["architectures"][0].get<std::string>();
  } else if (r.Has("model_type") && j["model_type"].is_string()) {
    const std::string type = j["model_type"].get<std::string>();
    if (type == "mixtral") arch = "MixtralForCausalLM";
    if (type == "llama") arch = "LlamaForCausalLM";
    if (type == "mistral") arch = "MistralForCausalLM";
  }
  if (arch != "MixtralForCausalLM" && arch != "LlamaForCausalLM" && arch != "MistralForCausalLM") {
    return r.Error(absl::StrCat("architecture \"", arch,
                                "\" is not supported (MixtralForCausalLM, LlamaForCausalLM, "
                                "MistralForCausalLM)"));
  }
  return arch;
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json, const std::string& label) {
  Json j = Json::parse(json.begin(), json.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": not a valid JSON object"));
  }
  ConfigReader r(j, label);
  ModelConfig c;
  MOE_ASSIGN_OR_RETURN(c.architecture, Architecture(r, j));
  MOE_RETURN_IF_ERROR(RejectUnsupported(r, j));
  c.is_moe = c.architecture == "MixtralForCausalLM";
  MOE_ASSIGN_OR_RETURN(c.vocab_size, r.PositiveInt("vocab_size"));
  MOE_ASSIGN_OR_RETURN(c.hidden_size, r.PositiveInt("hidden_size"));
  MOE_ASSIGN_OR_RETURN(c.intermediate_size, r.PositiveInt("intermediate_size"));
  MOE_ASSIGN_OR_RETURN(c.num_hidden_layers, r.PositiveInt("num_hidden_layers"));
  MOE_ASSIGN_OR_RETURN(c.num_attention_heads, r.PositiveInt("num_attention_heads"));
  MOE_ASSIGN_OR_RETURN(c.num_key_value_heads,
                       r.PositiveInt("num_key_value_heads", c.num_attention_heads));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return r.Error(absl::StrCat("num_attention_heads (", c.num_attention_heads,
                                ") is not a multiple of num_key_value_heads (",
                                c.num_key_value_heads, ")"));
  }
  if (!r.Has("head_dim") && c.hidden_size % c.num_attention_heads != 0) {
    return r.Error(absl::StrCat("hidden_size (", c.hidden_size,
                                ") is not divisible by num_attention_heads (",
                                c.num_attention_heads, ") and no head_dim is given"));
  }
  MOE_ASSIGN_OR_RETURN(c.head_dim,
                       r.PositiveInt("head_dim", c.hidden_size / c.num_attention_heads));
  if (c.head_dim % 2 != 0) {
    return r.Error(absl::StrCat("head_dim ", c.head_dim, " is odd; RoPE needs an even head_dim"));
  }
  MOE_ASSIGN_OR_RETURN(c.max_position_embeddings, r.PositiveInt("max_position_embeddings"));
  if (r.Has("rms_norm_eps")) {
    MOE_ASSIGN_OR_RETURN(c.rms_norm_eps, r.PositiveNumber(j["rms_norm_eps"], "rms_norm_eps"));
  } else {
    c.rms_norm_eps = c.is_moe ? 1e-5 : 1e-6;
  }
  // transformers' defaults: MixtralConfig rope_theta=1e6, Llama/Mistral 1e4.
  c.rope_theta = c.is_moe ? 1e6 : 1e4;
  if (r.Has("rope_theta")) {
    MOE_ASSIGN_OR_RETURN(c.rope_theta, r.PositiveNumber(j["rope_theta"], "rope_theta"));
  } else if (r.Has("rope_parameters") && j["rope_parameters"].contains("rope_theta")) {
    MOE_ASSIGN_OR_RETURN(c.rope_theta, r.PositiveNumber(j["rope_parameters"]["rope_theta"],
                                                        "rope_parameters.rope_theta"));
  }
  if (r.Has("sliding_window")) {
    MOE_ASSIGN_OR_RETURN(c.sliding_window, r.PositiveInt("sliding_window"));
  }
  MOE_ASSIGN_OR_RETURN(c.tie_word_embeddings, r.Bool("tie_word_embeddings", false));
  if (c.is_moe) {
    MOE_ASSIGN_OR_RETURN(c.num_local_experts, r.PositiveInt("num_local_experts"));
    MOE_ASSIGN_OR_RETURN(c.num_experts_per_tok, r.PositiveInt("num_experts_per_tok"));
    if (c.num_experts_per_tok > c.num_local_experts) {
      return r.Error(absl::StrCat("num_experts_per_tok (", c.num_experts_per_tok,
                                  ") is larger than num_local_experts (", c.num_local_experts,
                                  ")"));
    }
  }
  return c;
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  MOE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseModelConfig(text, path);
}

}  // namespace moe
