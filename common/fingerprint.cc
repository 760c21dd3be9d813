#include "common/fingerprint.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moe {
namespace {

// FNV-1a, 64 bit: stable across processes (unlike absl::Hash, which is seeded per process).
class Fnv {
 public:
  void Add(std::string_view s) {
    for (unsigned char c : s) h_ = (h_ ^ c) * 0x100000001b3ull;
    h_ = (h_ ^ 0xff) * 0x100000001b3ull;  // separator
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
};

}  // namespace

std::string ModelFingerprint(const ModelConfig& c, const TensorStore& store) {
  std::vector<std::string> tensors;
  for (const std::string& name : store.TensorNames()) {
    const TensorInfo* t = store.Find(name);
    tensors.push_back(absl::StrCat(name, ":", DescribeTensor(t->shape, t->dtype)));
  }
  return ModelFingerprint(c, tensors);
}

std::string ModelFingerprint(const ModelConfig& c, const std::vector<std::string>& tensors) {
  Fnv f;
  f.Add(absl::StrCat(c.architecture, "|", c.vocab_size, "|", c.hidden_size, "|",
                     c.intermediate_size, "|", c.num_hidden_layers, "|", c.num_attention_heads, "|",
                     c.num_key_value_heads, "|", c.head_dim, "|", c.num_local_experts, "|",
                     c.num_experts_per_tok));
  for (const std::string& t : tensors) f.Add(t);
  return absl::StrFormat("%016x", f.value());
}

}  // namespace moe
