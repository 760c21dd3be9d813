#include "common/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/gguf.h"
#include "common/hf_tokenizer.h"
#include "common/sentencepiece_model.h"
#include "common/spm_vocab.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using json = nlohmann::json;

constexpr std::string_view kDefaultUnkSurface = " \xE2\x81\x87 ";  // SentencePiece's " ⁇ "

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  std::string contents((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.is_open() || in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read ", path.string()));
  }
  return contents;
}

// nullopt when `path` does not exist.
absl::StatusOr<std::optional<json>> ReadJson(const std::filesystem::path& path) {
  std::error_code error;
  if (!std::filesystem::exists(path, error)) return std::nullopt;
  MOE_ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  json parsed = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path.string(), ": malformed JSON (expected an object)"));
  }
  return parsed;
}

std::string Dump(const json& value) {
  return value.dump(/*indent=*/-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
}

absl::StatusOr<int32_t> TokenId(const json& value, std::string_view where, int32_t vocab_size) {
  if (!value.is_number_integer() || value.get<int64_t>() < 0 ||
      value.get<int64_t>() >= vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        std::string(where), ": expected a token id in [0, ", vocab_size, "), got ", Dump(value)));
  }
  return static_cast<int32_t>(value.get<int64_t>());
}

// The ids under `key` of `config` (an int, or a list of ints when `allow_list`); nullopt when
// the key is absent or null.
absl::StatusOr<std::optional<std::vector<int32_t>>> TokenIds(const json& config,
                                                             const std::string& key,
                                                             const std::filesystem::path& file,
                                                             bool allow_list, int32_t vocab_size) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::nullopt;
  const std::string where = absl::StrCat(file.string(), ": ", key);
  std::vector<int32_t> ids;
  if (allow_list && it->is_array()) {
    if (it->empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": empty list"));
    for (const json& element : *it) {
      MOE_ASSIGN_OR_RETURN(const int32_t id, TokenId(element, where, vocab_size));
      ids.push_back(id);
    }
  } else {
    MOE_ASSIGN_OR_RETURN(const int32_t id, TokenId(*it, where, vocab_size));
    ids.push_back(id);
  }
  return ids;
}

// `text` with every "▁" replaced by `replacement`.
std::string ReplaceSpaceSymbol(std::string_view text, std::string_view replacement) {
  std::string result;
  result.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    if (text.substr(pos).starts_with(kSpaceSymbol)) {
      result.append(replacement);
      pos += kSpaceSymbol.size();
    } else {
      result.push_back(text[pos++]);
    }
  }
  return result;
}

// Moves the complete characters at the front of `*pending` to `out`; an invalid byte becomes
// U+FFFD, as does each byte of an incomplete character when `final` (the byte run has ended).
// Returns whether anything was appended.
bool DrainBytes(bool final, std::string* pending, std::string* out) {
  const std::string_view bytes = *pending;
  size_t pos = 0;
  while (pos < bytes.size()) {
    const int length = Utf8CharLength(bytes.substr(pos));
    if (length > 0) {
      out->append(bytes.substr(pos, length));
      pos += length;
    } else if (length == 0 && !final) {
      break;
    } else {
      out->append(kReplacementChar);
      ++pos;
    }
  }
  pending->erase(0, pos);
  return pos > 0;
}

struct SpecialIds {
  int32_t bos = -1;
  std::vector<int32_t> eos;
};

// BOS/EOS ids: the first of generation_config.json and config.json that names them wins; the
// model's own ids are the fallback.
// `bos_required`: tokenizer.model encodes BOS itself; a tokenizer.json's template adds whatever
// it adds (GPT-2-style tokenizers have no BOS).
absl::StatusOr<SpecialIds> ReadSpecialIds(const std::filesystem::path& dir, int32_t vocab_size,
                                          int32_t model_bos, int32_t model_eos,
                                          bool bos_required = true) {
  std::optional<std::vector<int32_t>> bos, eos;
  for (const char* name : {"generation_config.json", "config.json"}) {
    const std::filesystem::path path = dir / name;
    MOE_ASSIGN_OR_RETURN(const std::optional<json> config, ReadJson(path));
    if (!config) continue;
    if (!bos) {
      MOE_ASSIGN_OR_RETURN(
          bos, TokenIds(*config, "bos_token_id", path, /*allow_list=*/false, vocab_size));
    }
    if (!eos) {
      MOE_ASSIGN_OR_RETURN(
          eos, TokenIds(*config, "eos_token_id", path, /*allow_list=*/true, vocab_size));
    }
  }
  if (!bos && model_bos >= 0) bos = std::vector<int32_t>{model_bos};
  if (!eos && model_eos >= 0) eos = std::vector<int32_t>{model_eos};
  if (!bos && !bos_required) bos = std::vector<int32_t>{-1};
  if (!bos || !eos) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir.string(), ": no ", bos ? "eos" : "bos",
        "_token_id in generation_config.json or config.json, and the tokenizer defines none"));
  }
  return SpecialIds{bos->front(), *std::move(eos)};
}

// tokenizer_config.json's `key` as a token string ("<s>" or {"content": "<s>", ...}); "" when
// absent or null.
absl::StatusOr<std::string> ConfigTokenString(const std::optional<json>& config,
                                              const std::string& key,
                                              const std::filesystem::path& path) {
  if (!config) return std::string();
  const auto it = config->find(key);
  if (it == config->end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return (*it)["content"].get<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path.string(), ": ", key, ": expected a token string, got ", Dump(*it)));
}

// tokenizer_config.json's (`config`, read from `path`) "legacy"; true when absent or null, as in
// transformers.
absl::StatusOr<bool> ReadLegacy(const std::optional<json>& config,
                                const std::filesystem::path& path) {
  if (!config) return true;
  const auto it = config->find("legacy");
  if (it == config->end() || it->is_null()) return true;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path.string(), ": legacy: expected a bool, got ", Dump(*it)));
  }
  return it->get<bool>();
}

}  // namespace

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_dir) {
  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer());
  MOE_RETURN_IF_ERROR(tokenizer->Init(model_dir));
  return tokenizer;
}

absl::Status Tokenizer::InitHf(const std::string& model_dir) {
  const std::filesystem::path dir(model_dir);
  const std::filesystem::path config_path = dir / "tokenizer_config.json";
  MOE_ASSIGN_OR_RETURN(const std::optional<json> config, ReadJson(config_path));
  bool clean_up = false;
  if (config && config->contains("clean_up_tokenization_spaces")) {
    const json& v = (*config)["clean_up_tokenization_spaces"];
    if (!v.is_boolean() && !v.is_null()) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_path.string(), ": clean_up_tokenization_spaces: expected a bool, got ", Dump(v)));
    }
    clean_up = v.is_boolean() && v.get<bool>();
  }
  MOE_ASSIGN_OR_RETURN(hf_, HfTokenizer::FromFile((dir / "tokenizer.json").string(), clean_up));
  int32_t ids[2] = {-1, -1};
  const char* keys[2] = {"bos_token", "eos_token"};
  for (int i = 0; i < 2; ++i) {
    MOE_ASSIGN_OR_RETURN(const std::string token, ConfigTokenString(config, keys[i], config_path));
    if (token.empty()) continue;
    ids[i] = hf_->TokenToId(token);
    if (ids[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(config_path.string(), ": ", keys[i], " \"",
                                                     token, "\" is not a token of tokenizer.json"));
    }
  }
  MOE_ASSIGN_OR_RETURN(SpecialIds special_ids,
                       ReadSpecialIds(dir, hf_->vocab_size(), ids[0], ids[1],
                                      /*bos_required=*/false));
  // A token before the first one takes the decoders' start-of-text stripping (Strip, the
  // Metaspace decoder) when a detokenizer continues text: the first normal token that decodes
  // to text by itself.
  for (int32_t id = 0; id < hf_->vocab_size() && continuation_sentinel_ < 0; ++id) {
    if (hf_->IsSpecial(id) || PieceByte(hf_->IdToToken(id)) >= 0) continue;
    const int32_t one[1] = {id};
    const std::string text = hf_->Decode(one);
    if (!text.empty() && text.find(kReplacementChar) == std::string::npos) {
      continuation_sentinel_ = id;
    }
  }
  bos_id_ = special_ids.bos;
  eos_ids_ = std::move(special_ids.eos);
  return absl::OkStatus();
}

absl::Status Tokenizer::Init(const std::string& model_dir) {
  const std::filesystem::path dir(model_dir);
  std::error_code error_code;
  if (std::filesystem::exists(dir / "tokenizer.json", error_code)) return InitHf(model_dir);
  const std::filesystem::path model_path = dir / "tokenizer.model";
  if (!std::filesystem::exists(model_path, error_code)) {
    return absl::NotFoundError(absl::StrCat("tokenizer not found: neither ",
                                            (dir / "tokenizer.json").string(), " nor ",
                                            model_path.string()));
  }
  MOE_ASSIGN_OR_RETURN(const std::string serialized, ReadFile(model_path));
  std::string error;
  sp_ = SentencePieceModel::FromSerialized(serialized, &error);
  if (sp_ == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_path.string(), ": not a SentencePiece model: ", error));
  }
  MOE_RETURN_IF_ERROR(ReadAddedTokens(dir));
  const auto vocab = static_cast<int32_t>(sp_->piece_size() + added_.size());
  // EOS: tokenizer_config.json's eos_token before the model's own (ChatML merges name
  // <|im_end|> there).
  int32_t model_eos = sp_->eos_id();
  const std::filesystem::path config_path = dir / "tokenizer_config.json";
  MOE_ASSIGN_OR_RETURN(const std::optional<json> config, ReadJson(config_path));
  MOE_ASSIGN_OR_RETURN(const std::string eos_token,
                       ConfigTokenString(config, "eos_token", config_path));
  if (!eos_token.empty()) {
    int32_t id = sp_->PieceToId(eos_token);
    if (id == sp_->unk_id() && eos_token != sp_->IdToPiece(id)) id = -1;
    for (const AddedToken& a : added_) {
      if (a.content == eos_token) id = a.id;
    }
    if (id < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path.string(), ": eos_token \"", eos_token, "\" is not a token"));
    }
    model_eos = id;
  }
  MOE_ASSIGN_OR_RETURN(SpecialIds special_ids,
                       ReadSpecialIds(dir, vocab, sp_->bos_id(), model_eos));
  bos_id_ = special_ids.bos;
  eos_ids_ = std::move(special_ids.eos);
  MOE_ASSIGN_OR_RETURN(legacy_, ReadLegacy(config, config_path));
  return FinishInit(model_path.string());
}

// added_tokens.json ({"<|im_end|>": 32000, ...}, as transformers' slow tokenizers save them):
// ids right after the SentencePiece vocabulary, consecutive. Special unless
// tokenizer_config.json's added_tokens_decoder says "special": false.
absl::Status Tokenizer::ReadAddedTokens(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / "added_tokens.json";
  MOE_ASSIGN_OR_RETURN(const std::optional<json> added, ReadJson(path));
  if (!added) return absl::OkStatus();
  const std::filesystem::path config_path = dir / "tokenizer_config.json";
  MOE_ASSIGN_OR_RETURN(const std::optional<json> config, ReadJson(config_path));
  const int32_t base = sp_->piece_size();
  std::vector<AddedToken> tokens;
  for (const auto& [content, id] : added->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= (1 << 24) ||
        content.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": \"", content, "\": expected a token id, got ", Dump(id)));
    }
    const auto value = static_cast<int32_t>(id.get<int64_t>());
    if (value < base) {
      if (sp_->IdToPiece(value) == content) continue;  // already a piece
      return absl::InvalidArgumentError(absl::StrCat(path.string(), ": \"", content, "\" has id ",
                                                     value, ", which is the piece \"",
                                                     sp_->IdToPiece(value), "\""));
    }
    bool special = true;
    if (config && config->contains("added_tokens_decoder")) {
      const json& decoder = (*config)["added_tokens_decoder"];
      const std::string key = std::to_string(value);
      if (decoder.is_object() && decoder.contains(key) && decoder[key].is_object()) {
        special = decoder[key].value("special", true);
      }
    }
    tokens.push_back({content, value, special});
  }
  std::sort(tokens.begin(), tokens.end(),
            [](const AddedToken& a, const AddedToken& b) { return a.id < b.id; });
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i].id != base + static_cast<int32_t>(i)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": added token ids must follow the ", base,
                       " pieces of tokenizer.model without gaps; \"", tokens[i].content, "\" has ",
                       tokens[i].id, ", expected ", base + static_cast<int32_t>(i)));
    }
  }
  added_ = std::move(tokens);
  return absl::OkStatus();
}

absl::Status Tokenizer::FinishInit(const std::string& label) {
  // The special tokens of transformers' LlamaTokenizer: split out of the text on Encode.
  for (const int32_t id : {sp_->unk_id(), sp_->bos_id(), sp_->eos_id()}) {
    if (id >= 0) special_tokens_.emplace_back(sp_->IdToPiece(id), id);
  }
  for (const AddedToken& a : added_) {  // split out of the text like them (transformers' Trie)
    special_tokens_.emplace_back(a.content, a.id);
  }
  if (sp_->unk_id() >= 0) {
    unk_prefix_length_ = sp_->EncodeWithoutDummyPrefix(sp_->IdToPiece(sp_->unk_id())).size();
  }
  // SentencePiece's decoder strips the "▁" of the first piece when the processor adds a dummy
  // prefix or removes extra whitespace. transformers builds the processor with add_dummy_prefix
  // off when legacy=False.
  remove_extra_whitespaces_ = sp_->remove_extra_whitespaces();
  consume_bos_ws_ = (legacy_ && sp_->add_dummy_prefix()) || remove_extra_whitespaces_;
  return BuildPieceTable(label);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& file) {
  MOE_ASSIGN_OR_RETURN(const std::string model, file.GetString("tokenizer.ggml.model"));
  if (model != "llama") {
    return absl::UnimplementedError(
        absl::StrCat(file.path(), ": tokenizer.ggml.model \"", model,
                     "\" is not supported yet (only \"llama\", SentencePiece BPE)"));
  }
  SpmVocab vocab;
  MOE_ASSIGN_OR_RETURN(vocab.pieces, file.GetStringArray("tokenizer.ggml.tokens"));
  MOE_ASSIGN_OR_RETURN(const std::vector<double> scores,
                       file.GetFloatArray("tokenizer.ggml.scores"));
  MOE_ASSIGN_OR_RETURN(const std::vector<int64_t> types,
                       file.GetIntArray("tokenizer.ggml.token_type"));
  if (vocab.pieces.empty() || scores.size() != vocab.pieces.size() ||
      types.size() != vocab.pieces.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        file.path(), ": tokenizer.ggml.tokens has ", vocab.pieces.size(),
        " entries, tokenizer.ggml.scores ", scores.size(), " and tokenizer.ggml.token_type ",
        types.size(), " (they must be equal and non-zero)"));
  }
  vocab.scores.assign(scores.begin(), scores.end());
  vocab.types.assign(types.begin(), types.end());
  const auto id_key = [&](const char* key, int32_t* out) -> absl::Status {
    if (file.FindValue(key) == nullptr) return absl::OkStatus();
    MOE_ASSIGN_OR_RETURN(const uint64_t id, file.GetUint(key));
    if (id >= vocab.pieces.size()) {
      return absl::InvalidArgumentError(absl::StrCat(file.path(), ": ", key, " = ", id,
                                                     " is outside the vocabulary of ",
                                                     vocab.pieces.size()));
    }
    *out = static_cast<int32_t>(id);
    return absl::OkStatus();
  };
  MOE_RETURN_IF_ERROR(id_key("tokenizer.ggml.bos_token_id", &vocab.bos_id));
  MOE_RETURN_IF_ERROR(id_key("tokenizer.ggml.eos_token_id", &vocab.eos_id));
  MOE_RETURN_IF_ERROR(id_key("tokenizer.ggml.unknown_token_id", &vocab.unk_id));
  if (vocab.unk_id < 0) {
    const auto it = std::find(vocab.types.begin(), vocab.types.end(), SpmVocab::kUnknown);
    // llama.cpp's default for SentencePiece vocabularies is id 0.
    vocab.unk_id = it != vocab.types.end() ? static_cast<int32_t>(it - vocab.types.begin()) : 0;
  }
  // SentencePiece has exactly one unknown piece; converters may have written it as a control
  // token (llama.cpp does for vocabularies it reads from tokenizer.json).
  vocab.types[vocab.unk_id] = SpmVocab::kUnknown;
  if (file.FindValue("tokenizer.ggml.add_space_prefix") != nullptr) {
    MOE_ASSIGN_OR_RETURN(vocab.add_dummy_prefix, file.GetBool("tokenizer.ggml.add_space_prefix"));
  }
  if (vocab.bos_id < 0 || vocab.eos_id < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(file.path(), ": tokenizer.ggml.bos_token_id and eos_token_id are required"));
  }
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->bos_id_ = vocab.bos_id;
  t->eos_ids_ = {vocab.eos_id};
  t->legacy_ = true;
  MOE_ASSIGN_OR_RETURN(t->sp_, SpmVocabModel::Create(std::move(vocab), file.path()));
  MOE_RETURN_IF_ERROR(t->FinishInit(file.path()));
  return t;
}

absl::Status Tokenizer::BuildPieceTable(const std::string& model_path) {
  // Decode drops the special tokens (skip_special_tokens=True); the configured BOS/EOS ids too,
  // which are the same ids for Llama models.
  std::vector<int32_t> skipped = {sp_->unk_id(), sp_->bos_id(), sp_->eos_id(), bos_id_};
  skipped.insert(skipped.end(), eos_ids_.begin(), eos_ids_.end());
  pieces_.resize(sp_->piece_size() + added_.size());
  for (const AddedToken& a : added_) {  // special: dropped by Decode; else decoded as their text
    Piece& piece = pieces_[a.id];
    piece.skipped = a.special || std::find(skipped.begin(), skipped.end(), a.id) != skipped.end();
    piece.surface = a.content;
  }
  for (int32_t id = 0; id < sp_->piece_size(); ++id) {
    const std::string& text = sp_->IdToPiece(id);
    Piece& piece = pieces_[id];
    piece.skipped = std::find(skipped.begin(), skipped.end(), id) != skipped.end();
    piece.leading_space = text.starts_with(kSpaceSymbol);
    if (sp_->IsControl(id)) {
      piece.kind = PieceKind::kControl;
    } else if (sp_->IsUnknown(id)) {
      piece.kind = PieceKind::kUnknown;
      piece.surface = std::string(kDefaultUnkSurface);
    } else if (sp_->IsByte(id)) {
      const int byte = PieceByte(text);
      if (byte < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(model_path, ": byte piece ", id, " is \"", text, "\""));
      }
      piece.kind = PieceKind::kByte;
      piece.byte = static_cast<uint8_t>(byte);
    } else {
      piece.surface = ReplaceSpaceSymbol(text, " ");
    }
  }
  return absl::OkStatus();
}

int32_t Tokenizer::vocab_size() const {
  return hf_ != nullptr ? hf_->vocab_size() : static_cast<int32_t>(pieces_.size());
}

std::string Tokenizer::TokenText(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  if (hf_ != nullptr) return hf_->IdToToken(id);
  if (id < sp_->piece_size()) return sp_->IdToPiece(id);
  return added_[id - sp_->piece_size()].content;
}

bool Tokenizer::IsEos(int32_t id) const {
  return std::find(eos_ids_.begin(), eos_ids_.end(), id) != eos_ids_.end();
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  if (hf_ != nullptr) return hf_->Encode(text, add_bos);
  std::vector<int32_t> ids;
  if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
  if (!text.empty()) EncodeText(text, &ids);
  return ids;
}

// transformers' LlamaTokenizer.tokenize: PreTrainedTokenizer.tokenize splits the special
// tokens' strings out of the text and hands each stretch between them to _tokenize.
void Tokenizer::EncodeText(std::string_view text, std::vector<int32_t>* ids) const {
  std::string prefixed;
  if (!legacy_) {
    // legacy=False: "▁" in the text counts as a space, and the text gets a "▁" prefix that the
    // processor (add_dummy_prefix off) would not add itself.
    prefixed = std::string(kSpaceSymbol) + ReplaceSpaceSymbol(text, " ");
    text = prefixed;
  }
  const size_t first = ids->size();
  bool second_is_special = false;
  auto encode_chunk = [&](std::string_view chunk) {
    if (chunk.empty()) return;
    std::vector<int> chunk_ids;
    if (legacy_) {
      chunk_ids = sp_->Encode(chunk);
    } else if (chunk.starts_with(kSpaceSymbol) || chunk.starts_with(' ')) {
      // LlamaTokenizer._tokenize encodes unk_token + chunk and drops the unk token's ids, so
      // that the leading "▁" is kept as a word boundary.
      std::string with_unk = sp_->IdToPiece(std::max(sp_->unk_id(), 0));
      with_unk.append(chunk);
      chunk_ids = sp_->EncodeWithoutDummyPrefix(with_unk);
      if (chunk_ids.size() >= unk_prefix_length_) {
        chunk_ids.erase(chunk_ids.begin(), chunk_ids.begin() + unk_prefix_length_);
      }
    } else {
      chunk_ids = sp_->EncodeWithoutDummyPrefix(chunk);
    }
    ids->insert(ids->end(), chunk_ids.begin(), chunk_ids.end());
  };

  size_t chunk_begin = 0;
  for (size_t pos = 0; pos < text.size();) {
    // The longest special token starting at `pos` (transformers' Trie.split).
    const std::pair<std::string, int32_t>* match = nullptr;
    for (const auto& special : special_tokens_) {
      if (text.substr(pos).starts_with(special.first) &&
          (match == nullptr || special.first.size() > match->first.size())) {
        match = &special;
      }
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    encode_chunk(text.substr(chunk_begin, pos - chunk_begin));
    if (ids->size() == first + 1) second_is_special = true;
    ids->push_back(match->second);
    pos += match->first.size();
    chunk_begin = pos;
  }
  encode_chunk(text.substr(chunk_begin));

  // legacy=False: a lone "▁" before a leading special token is dropped.
  if (!legacy_ && second_is_special && sp_->IdToPiece((*ids)[first]) == kSpaceSymbol) {
    ids->erase(ids->begin() + first);
  }
}

std::string Tokenizer::Decode(std::span<const int32_t> ids) const {
  if (hf_ != nullptr) return hf_->Decode(ids, /*skip_special_tokens=*/true);
  std::string text;
  DecodeState state;
  for (const int32_t id : ids) DecodeAppend(id, &state, &text);
  DecodeFlush(&state, &text);
  return text;
}

// transformers' _decode drops the special tokens, then convert_tokens_to_string strips "▁" from
// the first token's string and hands the token strings to SentencePiece's Decode (the
// add_dummy_prefix-off processor when legacy=False). This follows that token by token.
void Tokenizer::DecodeAppend(int32_t id, DecodeState* state, std::string* out) const {
  if (id < 0 || id >= static_cast<int32_t>(pieces_.size())) return;
  const Piece& piece = pieces_[id];
  if (piece.skipped) return;
  if (!state->first_token_done) {
    state->first_token_done = true;
    if (piece.leading_space) {
      DecodeFirstToken(sp_->IdToPiece(id), state, out);
      return;
    }
  }
  if (piece.kind == PieceKind::kByte) {
    state->pending_bytes.push_back(static_cast<char>(piece.byte));
    if (DrainBytes(/*final=*/false, &state->pending_bytes, out)) state->text_empty = false;
    return;
  }
  DecodeNonByte(piece.kind, piece.surface, piece.leading_space, state, out);
}

// The first token's string minus its "▁" is looked up again in the vocabulary, as
// SentencePiece's Decode(pieces) does: a string that is no piece decodes as itself, "▁"s
// included (e.g. "▁▁▁▁▁" when "▁▁▁▁▁▁" is a piece and "▁▁▁▁▁" is not).
void Tokenizer::DecodeFirstToken(std::string_view piece, DecodeState* state,
                                 std::string* out) const {
  const std::string_view rest = piece.substr(kSpaceSymbol.size());
  const int id = sp_->PieceToId(rest);
  const Piece& info = pieces_[id];
  if (info.kind == PieceKind::kByte) {
    state->pending_bytes.push_back(static_cast<char>(info.byte));
    if (DrainBytes(/*final=*/false, &state->pending_bytes, out)) state->text_empty = false;
  } else if (info.kind == PieceKind::kUnknown && rest != sp_->IdToPiece(id)) {
    DecodeNonByte(PieceKind::kUnknown, rest, /*leading_space=*/false, state, out);
  } else {
    DecodeNonByte(info.kind, info.surface, info.leading_space, state, out);
  }
}

// SentencePieceProcessor::Decode (sentencepiece_processor.cc, >= 0.2.0) for one non-byte piece:
// the byte run before it ends, and while nothing has been output the piece's leading "▁" may be
// consumed (is_bos_ws / bos_ws_seen), which matters only when consume_bos_ws_.
void Tokenizer::DecodeNonByte(PieceKind kind, std::string_view surface, bool leading_space,
                              DecodeState* state, std::string* out) const {
  if (DrainBytes(/*final=*/true, &state->pending_bytes, out)) state->text_empty = false;
  if (state->bos_ws_seen || !state->text_empty) state->bos_ws_open = false;
  bool consumed = false;
  if (kind == PieceKind::kControl) {
    surface = {};
  } else if (kind == PieceKind::kNormal && state->bos_ws_open && consume_bos_ws_ && leading_space) {
    surface.remove_prefix(1);  // the " " that "▁" became
    consumed = true;
  }
  state->bos_ws_seen = consumed && !remove_extra_whitespaces_;
  if (!surface.empty()) {
    out->append(surface);
    state->text_empty = false;
  }
}

void Tokenizer::DecodeFlush(DecodeState* state, std::string* out) const {
  if (DrainBytes(/*final=*/true, &state->pending_bytes, out)) state->text_empty = false;
}

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer* tokenizer, bool continuation)
    : tokenizer_(tokenizer) {
  if (tokenizer_->hf_ != nullptr) {
    if (continuation && tokenizer_->continuation_sentinel_ >= 0) {
      ids_ = {tokenizer_->continuation_sentinel_};
      read_ = 1;
      window_text_ = tokenizer_->Decode(ids_);
    }
    return;
  }
  if (continuation) {
    // As if text had been output already: no first-token or leading-"▁" stripping.
    state_.first_token_done = true;
    state_.text_empty = false;
    state_.bos_ws_open = false;
  }
}

std::string IncrementalDetokenizer::Add(int32_t id) {
  std::string delta;
  if (tokenizer_->hf_ != nullptr) {
    ids_.push_back(id);
    const std::span<const int32_t> all(ids_);
    const std::string now = tokenizer_->Decode(all.subspan(prefix_));
    if (now.size() > window_text_.size() &&
        now.compare(0, window_text_.size(), window_text_) == 0 &&
        !now.ends_with(kReplacementChar)) {
      delta = now.substr(window_text_.size());
      // The released tokens become the window's start, unless they decode to nothing (skipped
      // special tokens): a window's first text loses the decoders' start-of-text space.
      std::string released = tokenizer_->Decode(all.subspan(read_));
      if (released.empty()) {
        window_text_ = now;
      } else {
        prefix_ = read_;
        window_text_ = std::move(released);
      }
      read_ = ids_.size();
      // Keep the window small: what lies before prefix_ is never decoded again.
      ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_));
      read_ -= prefix_;
      prefix_ = 0;
    }
    return delta;
  }
  tokenizer_->DecodeAppend(id, &state_, &delta);
  return delta;
}

std::string IncrementalDetokenizer::Finish() {
  std::string delta;
  if (tokenizer_->hf_ != nullptr) {
    const std::string now = tokenizer_->Decode(std::span<const int32_t>(ids_).subspan(prefix_));
    if (now.size() > window_text_.size() &&
        now.compare(0, window_text_.size(), window_text_) == 0) {
      delta = now.substr(window_text_.size());
    }
    ids_.clear();
    prefix_ = read_ = 0;
    window_text_.clear();
    return delta;
  }
  tokenizer_->DecodeFlush(&state_, &delta);
  return delta;
}

size_t MaxPromptBytes(const Tokenizer& tokenizer, int64_t max_tokens) {
  size_t longest = 1;
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    longest = std::max(longest, tokenizer.TokenText(id).size());
  }
  return longest * static_cast<size_t>(std::max<int64_t>(max_tokens, 1));
}

absl::Status CheckPromptBytes(size_t bytes, size_t max_bytes, std::string_view field) {
  if (max_bytes == 0 || bytes <= max_bytes) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(std::string(field), " of ", bytes,
                                                 " bytes cannot fit the model's context (at most ",
                                                 max_bytes, " bytes of text)"));
}

}  // namespace moe
