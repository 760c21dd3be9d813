// Llama/Mistral SentencePiece tokenizer (tokenizer.model) with the special-token ids taken from
// the model's config files, and an incremental detokenizer for streaming.
#ifndef MOE_COMMON_TOKENIZER_H_
#define MOE_COMMON_TOKENIZER_H_

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moe {

class SentencePieceModel;  // std-only wrapper around libsentencepiece (see sentencepiece_model.h)
class GgufFile;
class HfTokenizer;

// Encode/Decode give exactly what transformers' slow LlamaTokenizer gives (tokenization_llama.py;
// checked against 4.57.6 with sentencepiece 0.2.3, add_prefix_space=True,
// clean_up_tokenization_spaces=False), for either value of its `legacy` flag:
//  - The literal strings of the unk/bos/eos pieces ("<unk>", "<s>", "</s>") in the text become
//    those tokens (transformers' added-token splitting), so user text "</s>" encodes as EOS.
//  - legacy=True (transformers' default, and Llama-2/Mistral/Mixtral's tokenizer_config.json):
//    each stretch of text between special tokens is encoded by SentencePiece as is, dummy "▁"
//    prefix included.
//  - legacy=False: "▁" in the text becomes " ", the text gets one "▁" prefix, and SentencePiece
//    encodes it with add_dummy_prefix off (so text right after a special token gets no prefix).
//  - Decode drops the special tokens (unk/bos/eos, skip_special_tokens=True), removes the "▁"
//    that starts the first remaining token, joins byte-fallback pieces into UTF-8 (a byte that
//    forms no valid character becomes one U+FFFD, as in SentencePiece) and maps "▁" to " ". With
//    legacy=True SentencePiece's decoder then strips one more leading space, so " hello" ->
//    "hello" and "  hello" -> " hello" (transformers does this too).
// A directory with a tokenizer.json (Hugging Face's fast-tokenizer format) is loaded from it
// instead (as transformers' AutoTokenizer prefers it): Encode/Decode then give what the fast
// tokenizer gives (hf_tokenizer.h), added tokens included.
// Thread-safety: all const methods may be called concurrently.
class Tokenizer {
 public:
  // Loads `model_dir`/tokenizer.json, else `model_dir`/tokenizer.model. BOS/EOS ids come from
  // (first found wins) generation_config.json, config.json, then the tokenizer itself
  // (tokenizer.json: tokenizer_config.json's bos_token / eos_token). For tokenizer.model: BOS/EOS
  // ids come from (first found wins)
  // generation_config.json, config.json, then the SentencePiece model itself; eos_token_id may
  // be a list. The legacy flag comes from tokenizer_config.json ("legacy"; true when absent, as
  // in transformers). NOT_FOUND naming the path if tokenizer.model is missing; INVALID_ARGUMENT
  // if it does not parse, if a JSON file is malformed (naming the file) or a token id in it is
  // not an id of the vocabulary.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_dir);
  // The tokenizer a GGUF file carries in its metadata (tokenizer.ggml.model = "llama": tokens,
  // scores, token_type, bos/eos/unknown_token_id, add_space_prefix), rebuilt without
  // libsentencepiece (SpmVocabModel) and used as above with legacy=True (llama.cpp's and
  // transformers' default). INVALID_ARGUMENT naming the key for a malformed vocabulary,
  // UNIMPLEMENTED for other tokenizer models (e.g. "gpt2").
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& file);
  ~Tokenizer();

  // Token ids as transformers' LlamaTokenizer gives them: BOS first when add_bos (tokenizer.json:
  // add_bos = add_special_tokens, the post-processor's template).
  std::vector<int32_t> Encode(std::string_view text, bool add_bos = true) const;

  // Text of `ids` as transformers' decode(ids, skip_special_tokens=True) gives it. Ids outside
  // [0, vocab_size()) are skipped (transformers would raise). Always valid UTF-8.
  std::string Decode(std::span<const int32_t> ids) const;

  // -1 for a tokenizer.json without a BOS token (GPT-2 style).
  int32_t bos_id() const { return bos_id_; }
  // The vocabulary's string for `id` (a piece, or an added token's text); "" when out of range.
  std::string TokenText(int32_t id) const;
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
  bool IsEos(int32_t id) const;
  int32_t vocab_size() const;
  // Whether transformers' legacy=True behaviour is used (see above).
  bool legacy() const { return legacy_; }

 private:
  friend class IncrementalDetokenizer;

  enum class PieceKind : uint8_t { kNormal, kByte, kControl, kUnknown };
  // What decoding needs to know about one vocabulary entry.
  struct Piece {
    PieceKind kind = PieceKind::kNormal;
    bool skipped = false;        // a special token that Decode drops (unk/bos/eos)
    bool leading_space = false;  // the piece starts with "▁"
    uint8_t byte = 0;            // kByte: the byte of the <0xNN> piece
    std::string surface;         // kNormal: the piece with "▁" -> " "; kUnknown: the unk surface
  };

  // Where a decode stands between two tokens; Decode and IncrementalDetokenizer share it so that
  // streaming gives exactly Decode's text.
  struct DecodeState {
    bool first_token_done = false;  // the first non-skipped token has been decoded
    bool text_empty = true;         // nothing has been output yet
    bool bos_ws_open = true;        // SentencePiece may still strip a leading "▁" (is_bos_ws)
    bool bos_ws_seen = false;       // ... and the last non-byte piece did strip one
    std::string pending_bytes;      // byte pieces not yet forming a complete UTF-8 character
  };

  Tokenizer() = default;
  absl::Status Init(const std::string& model_dir);
  // What Init and FromGguf share once sp_, the special ids and legacy_ are set.
  absl::Status FinishInit(const std::string& label);
  absl::Status BuildPieceTable(const std::string& model_path);
  void EncodeText(std::string_view text, std::vector<int32_t>* ids) const;
  // Appends the text that `id` makes final to `out`.
  void DecodeAppend(int32_t id, DecodeState* state, std::string* out) const;
  // Appends what is still held back in `state` (incomplete UTF-8 -> U+FFFD per byte).
  void DecodeFlush(DecodeState* state, std::string* out) const;
  void DecodeFirstToken(std::string_view piece, DecodeState* state, std::string* out) const;
  void DecodeNonByte(PieceKind kind, std::string_view surface, bool leading_space,
                     DecodeState* state, std::string* out) const;

  absl::Status InitHf(const std::string& model_dir);
  absl::Status ReadAddedTokens(const std::filesystem::path& dir);

  struct AddedToken {
    std::string content;
    int32_t id = 0;
    bool special = true;
  };
  std::vector<AddedToken> added_;       // tokenizer.model + added_tokens.json: ids after the pieces
  int32_t continuation_sentinel_ = -1;  // tokenizer.json: see IncrementalDetokenizer

  // Constant after Load(). Exactly one of sp_ and hf_ is set.
  std::unique_ptr<SentencePieceModel> sp_;
  std::unique_ptr<HfTokenizer> hf_;
  int32_t bos_id_ = 1;
  std::vector<int32_t> eos_ids_;
  bool legacy_ = true;
  std::vector<Piece> pieces_;  // indexed by id
  // Literal strings split out of the text before SentencePiece sees it, with their ids.
  std::vector<std::pair<std::string, int32_t>> special_tokens_;
  size_t unk_prefix_length_ = 0;  // ids of the unk piece's text, encoded without dummy prefix
  bool consume_bos_ws_ = false;   // SentencePiece's decode strips the first "▁" (see .cc)
  bool remove_extra_whitespaces_ = false;  // the model's NormalizerSpec setting
};

// The most bytes of text that can still encode to at most `max_tokens` tokens: max_tokens times
// the longest token text of the vocabulary. The APIs refuse longer text before tokenizing it
// (tokenizing costs far more memory than the text).
size_t MaxPromptBytes(const Tokenizer& tokenizer, int64_t max_tokens);
// OK, or INVALID_ARGUMENT naming `field` when `bytes` of text are over `max_bytes`
// (MaxPromptBytes; 0: no bound).
absl::Status CheckPromptBytes(size_t bytes, size_t max_bytes, std::string_view field);

// Turns a stream of generated token ids into text deltas. The concatenation of all deltas
// (including Finish()'s) equals tokenizer.Decode(all ids fed to this detokenizer): in particular
// a "▁" at the start of the first generated token is dropped, as transformers' TextStreamer and
// decode(generated_ids) show it. A delta never ends inside a UTF-8 character: bytes of an
// incomplete character are held back until the character completes, a non-byte token arrives
// (they then become U+FFFD, one per byte, as in Decode) or Finish() is called. O(1) amortized per
// token. Not thread-safe; one per sequence.
//
// With `continuation`, the ids continue text that is already there (a prompt), so the first
// token keeps its leading space: for a prompt "that" and a first token "▁all" the first delta is
// " all", as vLLM and OpenAI-style APIs stream it; the deltas then equal
// Decode(prompt + generated) minus Decode(prompt) for ordinary text.
// (tokenizer.json: text is released once a window of the newest tokens decodes to more text
// than the window without its newest token and does not end in U+FFFD, as vLLM does.)
class IncrementalDetokenizer {
 public:
  // `tokenizer` must outlive this object.
  explicit IncrementalDetokenizer(const Tokenizer* tokenizer, bool continuation = false);
  // Appends `id` and returns the text that became final.
  std::string Add(int32_t id);
  // Returns whatever is still held back (an incomplete character decodes as U+FFFD per byte).
  // Call once, after the last Add().
  std::string Finish();

 private:
  const Tokenizer* tokenizer_;
  Tokenizer::DecodeState state_;
  // tokenizer.json: the ids since prefix_, decoded [prefix_, read_) already released as
  // window_text_.
  std::vector<int32_t> ids_;
  size_t prefix_ = 0;
  size_t read_ = 0;
  std::string window_text_;
};

}  // namespace moe

#endif  // MOE_COMMON_TOKENIZER_H_
