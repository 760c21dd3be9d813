// A tokenizer from a Hugging Face `tokenizer.json` (the "fast tokenizer" format of the
// `tokenizers` library), following that library's pipeline so that ids equal transformers'
// fast tokenizers':
//   1. added tokens are split out of the text first (leftmost-longest; `lstrip` / `rstrip` take
//      the whitespace beside them, `single_word` only matches between non-word characters;
//      tokens with `normalized` are matched in each remaining piece after normalization);
//   2. each remaining piece is normalized (Replace, Prepend, Sequence), pre-tokenized (Metaspace;
//      Split with GPT-2's or Llama-3's regex, matched by hand-written code with ICU's Unicode
//      letter/number classes; ByteLevel: GPT-2's byte-to-character map, with its regex when
//      use_regex; Sequence) and encoded by the model (BPE: merges by rank, leftmost first among
//      equals; characters outside the vocabulary as <0xNN> byte pieces with `byte_fallback`, else
//      the unknown token, consecutive ones fused with `fuse_unk`; `ignore_merges`);
//   3. the post-processor's template (TemplateProcessing) adds its special tokens.
// Decode runs the decoder chain (Replace, ByteFallback, Fuse, Strip, Metaspace, ByteLevel,
// Sequence) over the tokens, special added tokens dropped when asked, then transformers'
// clean_up_tokenization when tokenizer_config.json's clean_up_tokenization_spaces is true.
//
// Supported: the Llama/Mistral SentencePiece-BPE form (what transformers' LlamaConverter writes),
// and the ByteLevel BPE forms of GPT-2 / SmolLM and Llama-3. Any other component type or Split
// pattern is UNIMPLEMENTED naming it.
// Thread-safety: const methods may be called concurrently.
#ifndef MOE_COMMON_HF_TOKENIZER_H_
#define MOE_COMMON_HF_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace moe {

class HfTokenizer {
 public:
  struct AddedToken {
    int32_t id = 0;
    std::string content;
    bool special = false;
    bool lstrip = false;
    bool rstrip = false;
    bool single_word = false;
    bool normalized = false;
  };

  // Parses `path` (a tokenizer.json). `clean_up_tokenization_spaces`: transformers' setting from
  // tokenizer_config.json. INVALID_ARGUMENT naming the file and the field for malformed input,
  // UNIMPLEMENTED for component types this implementation does not have.
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> FromFile(const std::string& path,
                                                               bool clean_up_tokenization_spaces);
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> FromJson(std::string_view json_text,
                                                               const std::string& label,
                                                               bool clean_up_tokenization_spaces);
  ~HfTokenizer();

  // tokenizer.encode(text, add_special_tokens).ids
  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens = true) const;
  // tokenizer.decode(ids, skip_special_tokens) (+ transformers' clean-up). Ids outside the
  // vocabulary are skipped.
  std::string Decode(std::span<const int32_t> ids, bool skip_special_tokens = true) const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  // The id of a token string (vocabulary or added), or -1.
  int32_t TokenToId(std::string_view token) const;
  const std::string& IdToToken(int32_t id) const { return tokens_[id]; }
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  bool IsSpecial(int32_t id) const { return id >= 0 && id < vocab_size() && special_[id]; }

  struct Impl;  // the parsed pipeline (hf_tokenizer.cc)

 private:
  HfTokenizer();
  std::unique_ptr<Impl> impl_;
  std::vector<std::string> tokens_;  // by id (vocabulary and added tokens)
  std::vector<bool> special_;        // by id: a special added token
  absl::flat_hash_map<std::string, int32_t> token_ids_;
  std::vector<AddedToken> added_;
};

}  // namespace moe

#endif  // MOE_COMMON_HF_TOKENIZER_H_
