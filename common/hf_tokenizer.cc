#include "common/hf_tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "nlohmann/json.hpp"
#include "unicode/uchar.h"

namespace moe {
namespace {

using json = nlohmann::json;

// Debian's Abseil has its own string_view.
absl::string_view View(std::string_view s) { return absl::string_view(s.data(), s.size()); }

enum class Prepend { kAlways, kFirst, kNever };

struct NormalizerStep {
  enum Kind { kReplace, kPrepend } kind;
  std::string from, to;  // Replace: from -> to; Prepend: to
};

struct DecoderStep {
  enum Kind { kReplace, kByteFallback, kFuse, kStrip, kMetaspace, kByteLevel } kind;
  std::string from, to;     // Replace; Metaspace: from = the replacement character
  int start = 0, stop = 0;  // Strip: characters `from` taken from each end
  Prepend prepend = Prepend::kAlways;
};

enum class SplitPattern;

struct PreTokenizerStep {
  enum Kind { kMetaspace, kSplit, kByteLevel } kind = kMetaspace;
  // Metaspace
  std::string replacement = std::string(kSpaceSymbol);
  Prepend prepend = Prepend::kAlways;
  bool split = true;
  // Split (Isolated) and ByteLevel (use_regex: GPT-2's pattern first)
  SplitPattern pattern{};
  bool add_prefix_space = false;
  bool use_regex = false;
};

// One piece of the text on its way through the pipeline: an added token's id, or text with
// whether it starts the input (Metaspace's "first" scheme prepends only there).
struct Piece {
  int32_t id = -1;
  std::string text;
  bool at_start = false;
};

// Unicode White_Space (Rust's char::is_whitespace), for lstrip / rstrip.
bool IsWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// The code point at `s[pos]` and its length (a malformed byte: itself, length 1).
std::pair<char32_t, int> CodePointAt(std::string_view s, size_t pos) {
  const int length = Utf8CharLength(s.substr(pos));
  if (length <= 1) return {static_cast<unsigned char>(s[pos]), 1};
  char32_t c = static_cast<unsigned char>(s[pos]) & (0xFF >> (length + 1));
  for (int i = 1; i < length; ++i) c = (c << 6) | (static_cast<unsigned char>(s[pos + i]) & 0x3F);
  return {c, length};
}

// The start of the code point that ends at `end` (exclusive).
size_t PreviousCodePoint(std::string_view s, size_t end) {
  size_t p = end - 1;
  while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80 && end - p < 4) --p;
  return p;
}

// Word characters for single_word: ASCII letters and digits, and every non-ASCII code point
// (Rust's char::is_alphanumeric is Unicode-wide; most non-ASCII text is letters).
bool IsWordChar(char32_t c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= 0x80 && !IsWhitespace(c));
}

// The pre-tokenizer patterns' classes: \p{L}, \p{N} (ICU's general categories) and \s.
bool IsLetter(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  const int8_t t = u_charType(static_cast<UChar32>(c));
  return t >= U_UPPERCASE_LETTER && t <= U_OTHER_LETTER;
}
bool IsNumber(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  const int8_t t = u_charType(static_cast<UChar32>(c));
  return t == U_DECIMAL_DIGIT_NUMBER || t == U_LETTER_NUMBER || t == U_OTHER_NUMBER;
}

// The two pre-tokenizer regexes this implementation has, written out by hand (alternatives
// tried in order at each position, as the regex engine does; every character matches one).
constexpr std::string_view kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
constexpr std::string_view kLlama3Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
enum class SplitPattern { kGpt2, kLlama3 };

// The pieces of `text` the pattern matches (Isolated: each match is a piece).
std::vector<std::string> RegexSplit(std::string_view text, SplitPattern pattern) {
  std::vector<char32_t> cp;
  std::vector<size_t> at;  // byte offset of each code point, plus the end
  for (size_t pos = 0; pos < text.size();) {
    const auto [c, length] = CodePointAt(text, pos);
    cp.push_back(length == 1 && static_cast<unsigned char>(text[pos]) >= 0x80 ? 0xFFFD : c);
    at.push_back(pos);
    pos += length;
  }
  at.push_back(text.size());
  const size_t n = cp.size();
  const auto space = [&](size_t i) { return i < n && IsWhitespace(cp[i]); };
  const auto letter = [&](size_t i) { return i < n && IsLetter(cp[i]); };
  const auto number = [&](size_t i) { return i < n && IsNumber(cp[i]); };
  const auto newline = [&](size_t i) { return i < n && (cp[i] == '\r' || cp[i] == '\n'); };
  const auto other = [&](size_t i) { return i < n && !space(i) && !letter(i) && !number(i); };
  const auto lower = [&](size_t i) -> char32_t {
    if (i >= n) return 0;
    return pattern == SplitPattern::kLlama3 && cp[i] >= 'A' && cp[i] <= 'Z' ? cp[i] + 32 : cp[i];
  };
  std::vector<std::string> pieces;
  for (size_t i = 0; i < n;) {
    size_t end = i;
    // 's 't 're 've 'm 'll 'd (case-insensitive for Llama-3)
    if (cp[i] == '\'') {
      const char32_t a = lower(i + 1), b = lower(i + 2);
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        end = i + 2;
      } else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        end = i + 3;
      }
    }
    if (end == i && pattern == SplitPattern::kLlama3) {
      if (letter(i) || (!newline(i) && !letter(i) && !number(i) && i < n && letter(i + 1))) {
        end = letter(i) ? i : i + 1;  // [^\r\n\p{L}\p{N}]?\p{L}+
        while (letter(end)) ++end;
      } else if (number(i)) {  // \p{N}{1,3}
        end = i;
        while (end < i + 3 && number(end)) ++end;
      } else if (other(i) || (cp[i] == ' ' && other(i + 1))) {  //  ?[^\s\p{L}\p{N}]+[\r\n]*
        end = cp[i] == ' ' ? i + 1 : i;
        while (other(end)) ++end;
        while (newline(end)) ++end;
      } else {
        size_t run = i;  // whitespace from here
        while (space(run)) ++run;
        size_t last_newline = run;
        for (size_t k = i; k < run; ++k) {
          if (newline(k)) last_newline = k;
        }
        if (last_newline < run) {
          end = last_newline + 1;  // \s*[\r\n]+
        } else if (run == n || run - i == 1) {
          end = run;  // \s+ (the whole run at the end, or a single space before text)
        } else {
          end = run - 1;  // \s+(?!\S): the run less its last character
        }
      }
    } else if (end == i) {                                     // GPT-2
      const size_t j = cp[i] == ' ' && i + 1 < n ? i + 1 : i;  // the optional space
      if (letter(j)) {
        end = j;
        while (letter(end)) ++end;
      } else if (number(j)) {
        end = j;
        while (number(end)) ++end;
      } else if (other(j)) {
        end = j;
        while (other(end)) ++end;
      } else {
        size_t run = i;
        while (space(run)) ++run;
        end = run == n || run - i == 1 ? run : run - 1;
      }
    }
    pieces.emplace_back(text.substr(at[i], at[end] - at[i]));
    i = end;
  }
  return pieces;
}

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for U+0100 + k.
struct ByteLevelMap {
  ByteLevelMap() {
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t c = printable ? static_cast<char32_t>(b) : 0x100 + next++;
      std::string utf8;
      if (c < 0x80) {
        utf8.push_back(static_cast<char>(c));
      } else {
        utf8.push_back(static_cast<char>(0xC0 | (c >> 6)));
        utf8.push_back(static_cast<char>(0x80 | (c & 0x3F)));
      }
      to_char[b] = utf8;
      to_byte.emplace(c, static_cast<uint8_t>(b));
    }
  }
  std::string to_char[256];
  absl::flat_hash_map<char32_t, uint8_t> to_byte;
};
const ByteLevelMap& ByteLevel() {
  static const ByteLevelMap* map = new ByteLevelMap();
  return *map;
}

// Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes one U+FFFD.
std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  for (size_t pos = 0; pos < bytes.size();) {
    const int length = Utf8CharLength(bytes.substr(pos));
    if (length > 0) {
      out.append(bytes.substr(pos, length));
      pos += length;
      continue;
    }
    // The longest prefix that some continuation could still make valid, at least one byte.
    size_t bad = 1;
    while (pos + bad < bytes.size() && bad < 4 && Utf8CharLength(bytes.substr(pos, bad + 1)) == 0) {
      ++bad;
    }
    out.append(kReplacementChar);
    pos += bad;
  }
  return out;
}

void ReplaceAll(std::string* s, std::string_view from, std::string_view to) {
  if (!from.empty()) absl::StrReplaceAll({{View(from), View(to)}}, s);
}

// transformers' PreTrainedTokenizerBase.clean_up_tokenization.
std::string CleanUpTokenization(std::string text) {
  for (const auto& [from, to] :
       std::initializer_list<std::pair<std::string_view, std::string_view>>{{" .", "."},
                                                                            {" ?", "?"},
                                                                            {" !", "!"},
                                                                            {" ,", ","},
                                                                            {" ' ", "'"},
                                                                            {" n't", "n't"},
                                                                            {" 'm", "'m"},
                                                                            {" 's", "'s"},
                                                                            {" 've", "'ve"},
                                                                            {" 're", "'re"}}) {
    ReplaceAll(&text, from, to);
  }
  return text;
}

std::string Dump(const json& value) {
  return value.dump(/*indent=*/-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
}

}  // namespace

struct HfTokenizer::Impl {
  std::string label;
  bool clean_up = false;
  std::vector<NormalizerStep> normalizer;
  std::vector<PreTokenizerStep> pre_tokenizer;
  std::vector<DecoderStep> decoder;
  // BPE
  absl::flat_hash_map<std::string, int32_t> vocab;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, id)
  int32_t unk_id = -1;
  bool byte_fallback = false;
  bool fuse_unk = false;
  bool ignore_merges = false;
  int32_t byte_ids[256];
  // TemplateProcessing "single": special ids before and after the sequence.
  std::vector<int32_t> prefix, suffix;
  // Added tokens matched on the raw text (normalized = false: their content) and on normalized
  // pieces (their content normalized, e.g. "▁<tool>" after a Prepend("▁")).
  struct Pattern {
    std::string text;
    const AddedToken* token;
  };
  std::vector<Pattern> raw_tokens, normalized_tokens;

  absl::Status Error(std::string_view field, std::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", View(field), ": ", View(what)));
  }
  absl::Status Unsupported(std::string_view field, const json& type) const {
    return absl::UnimplementedError(absl::StrCat(label, ": ", View(field), " of type ", Dump(type),
                                                 " is not supported (only the SentencePiece-BPE "
                                                 "form of Llama/Mistral tokenizers so far)"));
  }
  // `one(component, type)` for j (an object), or for each element of a "Sequence" of them
  // (under `list_key`, nested Sequences too); nothing for null.
  template <typename Fn>
  absl::Status ForEachComponent(const json& j, std::string_view field, const char* list_key,
                                const Fn& one) const {
    if (j.is_null()) return absl::OkStatus();
    if (!j.is_object()) return Error(field, "expected an object or null");
    const json type = j.value("type", json());
    if (type != "Sequence") return one(j, type);
    if (!j.contains(list_key) || !j[list_key].is_array()) {
      return Error(field, absl::StrCat("Sequence without a ", list_key, " list"));
    }
    for (const json& c : j[list_key]) {
      MOE_RETURN_IF_ERROR(ForEachComponent(c, field, list_key, one));
    }
    return absl::OkStatus();
  }
  absl::Status ParseNormalizer(const json& j);
  absl::Status ParsePreTokenizer(const json& j);
  absl::Status ParseDecoder(const json& j);
  absl::Status ParseModel(const json& j, const HfTokenizer& t);
  absl::Status ParsePostProcessor(const json& j, const HfTokenizer& t);
  absl::Status ParseTemplate(const json& j, const HfTokenizer& t);

  void Split(const std::vector<Pattern>& patterns, Piece piece, std::vector<Piece>* out) const;
  void Normalize(std::string* text) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const;
  void EncodePiece(const Piece& piece, std::vector<int32_t>* ids) const;
};

namespace {

absl::StatusOr<std::string> StringField(const json& j, const char* key, std::string_view where,
                                        const HfTokenizer::Impl& impl) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_string()) {
    return impl.Error(where, absl::StrCat("expected a string \"", key, "\""));
  }
  return it->get<std::string>();
}

// {"String": "x"} patterns only (Regex patterns are a ByteLevel-form feature).
absl::StatusOr<std::string> StringPattern(const json& j, std::string_view where,
                                          const HfTokenizer::Impl& impl) {
  const auto it = j.find("pattern");
  if (it == j.end() || !it->is_object() || !it->contains("String") ||
      !(*it)["String"].is_string()) {
    return impl.Error(where, "expected a pattern {\"String\": ...}");
  }
  return (*it)["String"].get<std::string>();
}

absl::StatusOr<Prepend> PrependScheme(const json& j, std::string_view where,
                                      const HfTokenizer::Impl& impl) {
  if (j.contains("prepend_scheme")) {
    const json& s = j["prepend_scheme"];
    if (s == "always") return Prepend::kAlways;
    if (s == "first") return Prepend::kFirst;
    if (s == "never") return Prepend::kNever;
    return impl.Error(where, absl::StrCat("unknown prepend_scheme ", Dump(s)));
  }
  // Older files: add_prefix_space.
  const auto it = j.find("add_prefix_space");
  if (it != j.end() && it->is_boolean() && !it->get<bool>()) return Prepend::kNever;
  return Prepend::kAlways;
}

}  // namespace

absl::Status HfTokenizer::Impl::ParseNormalizer(const json& j) {
  return ForEachComponent(j, "normalizer", "normalizers", [&](const json& c, const json& type) {
    if (type == "Replace") {
      MOE_ASSIGN_OR_RETURN(std::string from, StringPattern(c, "normalizer Replace", *this));
      MOE_ASSIGN_OR_RETURN(std::string to, StringField(c, "content", "normalizer Replace", *this));
      normalizer.push_back({NormalizerStep::kReplace, std::move(from), std::move(to)});
    } else if (type == "Prepend") {
      MOE_ASSIGN_OR_RETURN(std::string to, StringField(c, "prepend", "normalizer Prepend", *this));
      normalizer.push_back({NormalizerStep::kPrepend, "", std::move(to)});
    } else {
      return Unsupported("normalizer", type);
    }
    return absl::OkStatus();
  });
}

absl::Status HfTokenizer::Impl::ParsePreTokenizer(const json& j) {
  return ForEachComponent(
      j, "pre_tokenizer", "pretokenizers", [&](const json& c, const json& type) {
        PreTokenizerStep step;
        if (type == "Metaspace") {
          step.kind = PreTokenizerStep::kMetaspace;
          MOE_ASSIGN_OR_RETURN(step.replacement,
                               StringField(c, "replacement", "pre_tokenizer Metaspace", *this));
          MOE_ASSIGN_OR_RETURN(step.prepend, PrependScheme(c, "pre_tokenizer Metaspace", *this));
          step.split = c.value("split", true);
        } else if (type == "Split") {
          step.kind = PreTokenizerStep::kSplit;
          const json pattern = c.value("pattern", json());
          const std::string regex =
              pattern.is_object() && pattern.value("Regex", json()).is_string()
                  ? pattern["Regex"].get<std::string>()
                  : "";
          if (regex == kLlama3Pattern) {
            step.pattern = SplitPattern::kLlama3;
          } else if (regex == kGpt2Pattern) {
            step.pattern = SplitPattern::kGpt2;
          } else {
            return Unsupported("pre_tokenizer Split with pattern", pattern);
          }
          if (c.value("behavior", json()) != "Isolated" || c.value("invert", false)) {
            return Unsupported("pre_tokenizer Split with behavior", c.value("behavior", json()));
          }
        } else if (type == "ByteLevel") {
          step.kind = PreTokenizerStep::kByteLevel;
          step.add_prefix_space = c.value("add_prefix_space", false);
          step.use_regex = c.value("use_regex", true);
          step.pattern = SplitPattern::kGpt2;
        } else {
          return Unsupported("pre_tokenizer", type);
        }
        pre_tokenizer.push_back(std::move(step));
        return absl::OkStatus();
      });
}

absl::Status HfTokenizer::Impl::ParseDecoder(const json& j) {
  return ForEachComponent(j, "decoder", "decoders", [&](const json& c, const json& type) {
    DecoderStep step;
    if (type == "Replace") {
      step.kind = DecoderStep::kReplace;
      MOE_ASSIGN_OR_RETURN(step.from, StringPattern(c, "decoder Replace", *this));
      MOE_ASSIGN_OR_RETURN(step.to, StringField(c, "content", "decoder Replace", *this));
    } else if (type == "ByteFallback") {
      step.kind = DecoderStep::kByteFallback;
    } else if (type == "Fuse") {
      step.kind = DecoderStep::kFuse;
    } else if (type == "Strip") {
      step.kind = DecoderStep::kStrip;
      MOE_ASSIGN_OR_RETURN(step.from, StringField(c, "content", "decoder Strip", *this));
      if (!c.value("start", json()).is_number_unsigned() ||
          !c.value("stop", json()).is_number_unsigned()) {
        return Error("decoder Strip", "expected unsigned start and stop");
      }
      step.start = static_cast<int>(std::min<uint64_t>(c["start"].get<uint64_t>(), 1 << 20));
      step.stop = static_cast<int>(std::min<uint64_t>(c["stop"].get<uint64_t>(), 1 << 20));
    } else if (type == "ByteLevel") {
      step.kind = DecoderStep::kByteLevel;
    } else if (type == "Metaspace") {
      step.kind = DecoderStep::kMetaspace;
      MOE_ASSIGN_OR_RETURN(step.from, StringField(c, "replacement", "decoder Metaspace", *this));
      MOE_ASSIGN_OR_RETURN(step.prepend, PrependScheme(c, "decoder Metaspace", *this));
    } else {
      return Unsupported("decoder", type);
    }
    decoder.push_back(std::move(step));
    return absl::OkStatus();
  });
}

absl::Status HfTokenizer::Impl::ParseModel(const json& j, const HfTokenizer& t) {
  if (!j.is_object()) return Error("model", "expected an object");
  const json& type = j.value("type", json("BPE"));
  if (type != "BPE") return Unsupported("model", type);
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (j.contains(key) && !j[key].is_null() && j[key] != "") {
      return Unsupported(absl::StrCat("model ", key), j[key]);
    }
  }
  if (j.contains("dropout") && !j["dropout"].is_null() && j["dropout"] != 0) {
    return Error("model", "BPE dropout is not deterministic; serving needs it off");
  }
  byte_fallback = j.value("byte_fallback", false);
  fuse_unk = j.value("fuse_unk", false);
  ignore_merges = j.value("ignore_merges", false);
  if (!j.contains("vocab") || !j["vocab"].is_object()) {
    return Error("model.vocab", "expected an object of token -> id");
  }
  for (const auto& [token, id] : j["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= t.vocab_size()) {
      return Error("model.vocab", absl::StrCat("\"", token, "\": id ", Dump(id), " is not in [0, ",
                                               t.vocab_size(), ")"));
    }
    vocab.emplace(token, static_cast<int32_t>(id.get<int64_t>()));
  }
  const auto id_of = [&](const std::string& s) -> int32_t {
    const auto it = vocab.find(s);
    return it == vocab.end() ? -1 : it->second;
  };
  if (j.contains("unk_token") && j["unk_token"].is_string()) {
    unk_id = id_of(j["unk_token"].get<std::string>());
    if (unk_id < 0) return Error("model.unk_token", "not in the vocabulary");
  }
  static constexpr char kHex[] = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) {
    byte_ids[b] = id_of(std::string{'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'});
  }
  if (!j.contains("merges") || !j["merges"].is_array()) {
    return Error("model.merges", "expected a list");
  }
  int32_t rank = 0;
  for (const json& m : j["merges"]) {
    std::string a, b;
    if (m.is_string()) {  // "a b"
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return Error("model.merges", absl::StrCat("entry ", rank, " ", Dump(m), " is not \"a b\""));
      }
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return Error("model.merges", absl::StrCat("entry ", rank, " ", Dump(m), " is not a pair"));
    }
    const int32_t ia = id_of(a), ib = id_of(b), merged = id_of(a + b);
    if (ia < 0 || ib < 0 || merged < 0) {
      return Error("model.merges", absl::StrCat("entry ", rank, " ", Dump(m),
                                                ": a part or the merged token is not in the "
                                                "vocabulary"));
    }
    const uint64_t key = (uint64_t{static_cast<uint32_t>(ia)} << 32) | static_cast<uint32_t>(ib);
    merges.try_emplace(key, rank, merged);  // a repeated pair keeps its first (lowest) rank
    ++rank;
  }
  return absl::OkStatus();
}

absl::Status HfTokenizer::Impl::ParsePostProcessor(const json& j, const HfTokenizer& t) {
  return ForEachComponent(j, "post_processor", "processors", [&](const json& c, const json& type) {
    if (type == "ByteLevel") return absl::OkStatus();  // offsets only
    if (type != "TemplateProcessing") return Unsupported("post_processor", type);
    if (!prefix.empty() || !suffix.empty()) {
      return Error("post_processor", "more than one TemplateProcessing");
    }
    return ParseTemplate(c, t);
  });
}

absl::Status HfTokenizer::Impl::ParseTemplate(const json& j, const HfTokenizer& t) {
  if (!j.contains("single") || !j["single"].is_array()) {
    return Error("post_processor", "TemplateProcessing without a \"single\" template");
  }
  const json specials = j.value("special_tokens", json::object());
  bool seen_sequence = false;
  for (const json& item : j["single"]) {
    if (item.contains("Sequence")) {
      if (seen_sequence) return Error("post_processor", "two sequences in \"single\"");
      seen_sequence = true;
      continue;
    }
    if (!item.contains("SpecialToken") || !item["SpecialToken"].contains("id") ||
        !item["SpecialToken"]["id"].is_string()) {
      return Error("post_processor", absl::StrCat("unexpected template item ", Dump(item)));
    }
    const std::string name = item["SpecialToken"]["id"].get<std::string>();
    if (!specials.contains(name) || !specials[name].contains("ids") ||
        !specials[name]["ids"].is_array()) {
      return Error("post_processor", absl::StrCat("special token \"", name, "\" has no ids"));
    }
    for (const json& id : specials[name]["ids"]) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= t.vocab_size()) {
        return Error("post_processor",
                     absl::StrCat("special token \"", name, "\": id ", Dump(id), " out of range"));
      }
      (seen_sequence ? suffix : prefix).push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
  }
  if (!seen_sequence) return Error("post_processor", "\"single\" has no Sequence");
  return absl::OkStatus();
}

// tokenizers' AddedVocabulary::find_matches on one piece: leftmost-longest matches of `tokens`,
// then single_word / lstrip / rstrip.
void HfTokenizer::Impl::Split(const std::vector<Pattern>& patterns, Piece piece,
                              std::vector<Piece>* out) const {
  const std::string_view s = piece.text;
  size_t start_offset = 0;
  const auto emit_text = [&](size_t begin, size_t end) {
    if (end > begin) {
      out->push_back({-1, std::string(s.substr(begin, end - begin)), piece.at_start && begin == 0});
    }
  };
  for (size_t pos = 0; pos < s.size() && !patterns.empty();) {
    const Pattern* match = nullptr;
    for (const Pattern& p : patterns) {
      if (!p.text.empty() && s.compare(pos, p.text.size(), p.text) == 0 &&
          (match == nullptr || p.text.size() > match->text.size())) {
        match = &p;
      }
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    const AddedToken* best = match->token;
    size_t start = pos, stop = pos + match->text.size();
    if (best->single_word) {
      const bool start_ok =
          start == 0 || !IsWordChar(CodePointAt(s, PreviousCodePoint(s, start)).first);
      const bool stop_ok = stop == s.size() || !IsWordChar(CodePointAt(s, stop).first);
      if (!start_ok || !stop_ok) {
        ++pos;
        continue;
      }
    }
    if (best->lstrip) {
      size_t left = start;
      while (left > start_offset) {
        const size_t prev = PreviousCodePoint(s, left);
        if (!IsWhitespace(CodePointAt(s, prev).first)) break;
        left = prev;
      }
      start = left;
    }
    if (best->rstrip) {
      while (stop < s.size()) {
        const auto [c, length] = CodePointAt(s, stop);
        if (!IsWhitespace(c)) break;
        stop += length;
      }
    }
    emit_text(start_offset, start);
    out->push_back({best->id, "", false});
    start_offset = stop;
    pos = stop;
  }
  emit_text(start_offset, s.size());
}

void HfTokenizer::Impl::Normalize(std::string* text) const {
  for (const NormalizerStep& n : normalizer) {
    if (n.kind == NormalizerStep::kReplace) {
      ReplaceAll(text, n.from, n.to);
    } else if (!text->empty()) {
      text->insert(0, n.to);
    }
  }
}

// BPE on one pre-token: characters (or their byte pieces, or unk), then the adjacent pair of
// lowest merge rank is merged, leftmost first, until no adjacent pair has a merge.
void HfTokenizer::Impl::EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (ignore_merges) {
    const auto it = vocab.find(View(word));
    if (it != vocab.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> symbols;
  bool last_unk = false;
  for (size_t pos = 0; pos < word.size();) {
    const int length = std::max(1, Utf8CharLength(word.substr(pos)));
    const std::string_view ch = word.substr(pos, length);
    pos += length;
    if (const auto it = vocab.find(View(ch)); it != vocab.end()) {
      symbols.push_back(it->second);
      last_unk = false;
      continue;
    }
    if (byte_fallback && std::all_of(ch.begin(), ch.end(), [&](char b) {
          return byte_ids[static_cast<unsigned char>(b)] >= 0;
        })) {
      for (const char b : ch) symbols.push_back(byte_ids[static_cast<unsigned char>(b)]);
      last_unk = false;
      continue;
    }
    if (unk_id >= 0 && !(fuse_unk && last_unk)) symbols.push_back(unk_id);
    last_unk = unk_id >= 0;
  }
  // A doubly linked list of symbols and a heap of candidate merges (rank, position); a stale
  // candidate (its symbols changed since) is skipped when it surfaces.
  const auto n = static_cast<int32_t>(symbols.size());
  std::vector<int32_t> prev(n), next(n);
  for (int32_t i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int32_t rank, pos, left, right;  // the pair's ids when it was pushed
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  const auto push = [&](int32_t i) {
    if (i < 0 || next[i] < 0) return;
    const uint64_t key = (uint64_t{static_cast<uint32_t>(symbols[i])} << 32) |
                         static_cast<uint32_t>(symbols[next[i]]);
    const auto it = merges.find(key);
    if (it != merges.end()) heap.push({it->second.first, i, symbols[i], symbols[next[i]]});
  };
  for (int32_t i = 0; i < n; ++i) push(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    const int32_t i = c.pos;
    if (symbols[i] < 0 || next[i] < 0 || symbols[i] != c.left || symbols[next[i]] != c.right) {
      continue;
    }
    const int32_t j = next[i];
    symbols[i] =
        merges
            .find((uint64_t{static_cast<uint32_t>(c.left)} << 32) | static_cast<uint32_t>(c.right))
            ->second.second;
    symbols[j] = -1;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  for (int32_t i = 0; i >= 0 && n > 0; i = next[i]) ids->push_back(symbols[i]);
}

void HfTokenizer::Impl::EncodePiece(const Piece& piece, std::vector<int32_t>* ids) const {
  if (pre_tokenizer.empty()) return EncodeWord(piece.text, ids);
  std::vector<std::string> words = {piece.text};
  for (const PreTokenizerStep& step : pre_tokenizer) {
    std::vector<std::string> split;
    for (std::string& w : words) {
      if (step.kind == PreTokenizerStep::kSplit) {
        for (std::string& p : RegexSplit(w, step.pattern)) split.push_back(std::move(p));
        continue;
      }
      if (step.kind == PreTokenizerStep::kByteLevel) {
        if (step.add_prefix_space && !w.starts_with(' '))
          w = " " + w;  // (insert: GCC 12 -Wrestrict)
        std::vector<std::string> parts;
        if (step.use_regex) {
          parts = RegexSplit(w, step.pattern);
        } else {
          parts.push_back(std::move(w));
        }
        for (const std::string& p : parts) {  // each byte as its stand-in character
          std::string mapped;
          for (const char b : p) mapped += ByteLevel().to_char[static_cast<unsigned char>(b)];
          split.push_back(std::move(mapped));
        }
        continue;
      }
      ReplaceAll(&w, " ", step.replacement);
      if (!w.starts_with(step.replacement) &&
          (step.prepend == Prepend::kAlways ||
           (step.prepend == Prepend::kFirst && piece.at_start))) {
        w.insert(0, step.replacement);
      }
      if (!step.split) {
        split.push_back(std::move(w));
        continue;
      }
      // MergedWithNext: each replacement character starts a new word.
      size_t begin = 0;
      for (size_t hit = w.find(step.replacement, 1); hit != std::string::npos;
           hit = w.find(step.replacement, hit + step.replacement.size())) {
        split.push_back(w.substr(begin, hit - begin));
        begin = hit;
      }
      split.push_back(w.substr(begin));
    }
    words = std::move(split);
  }
  for (const std::string& w : words) EncodeWord(w, ids);
}

HfTokenizer::HfTokenizer() : impl_(std::make_unique<Impl>()) {}
HfTokenizer::~HfTokenizer() = default;

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::FromFile(
    const std::string& path, bool clean_up_tokenization_spaces) {
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat("cannot read ", path));
  return FromJson(text, path, clean_up_tokenization_spaces);
}

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::FromJson(
    std::string_view json_text, const std::string& label, bool clean_up_tokenization_spaces) {
  const json j = json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": malformed JSON (expected an object)"));
  }
  std::unique_ptr<HfTokenizer> t(new HfTokenizer());
  Impl& impl = *t->impl_;
  impl.label = label;
  impl.clean_up = clean_up_tokenization_spaces;
  if (!j.contains("model") || !j["model"].is_object() || !j["model"].contains("vocab") ||
      !j["model"]["vocab"].is_object()) {
    return impl.Error("model", "expected an object with a vocab");
  }
  // The id space: the model's vocabulary and the added tokens (which may extend it).
  int64_t size = static_cast<int64_t>(j["model"]["vocab"].size());
  const json added = j.value("added_tokens", json::array());
  if (!added.is_array()) return impl.Error("added_tokens", "expected a list");
  for (const json& a : added) {
    if (!a.is_object() || !a.value("id", json()).is_number_integer() ||
        !a.value("content", json()).is_string()) {
      return impl.Error("added_tokens", absl::StrCat("entry ", Dump(a), " lacks an id or content"));
    }
    const int64_t id = a["id"].get<int64_t>();
    if (id < 0 || id >= (int64_t{1} << 24)) {
      return impl.Error("added_tokens", absl::StrCat("id ", id, " out of range"));
    }
    size = std::max(size, id + 1);
  }
  t->tokens_.resize(static_cast<size_t>(size));
  t->special_.assign(static_cast<size_t>(size), false);
  MOE_RETURN_IF_ERROR(impl.ParseModel(j["model"], *t));
  for (const auto& [token, id] : impl.vocab) t->tokens_[id] = token;
  for (const json& a : added) {
    AddedToken token;
    token.id = static_cast<int32_t>(a["id"].get<int64_t>());
    token.content = a["content"].get<std::string>();
    token.special = a.value("special", false);
    token.lstrip = a.value("lstrip", false);
    token.rstrip = a.value("rstrip", false);
    token.single_word = a.value("single_word", false);
    token.normalized = a.value("normalized", !token.special);
    if (token.content.empty()) return impl.Error("added_tokens", "an empty token");
    t->tokens_[token.id] = token.content;
    t->special_[token.id] = token.special;
    t->added_.push_back(std::move(token));
  }

  for (size_t id = 0; id < t->tokens_.size(); ++id) {
    if (t->tokens_[id].empty()) {
      return impl.Error("model.vocab", absl::StrCat("no token has id ", id));
    }
    t->token_ids_.try_emplace(t->tokens_[id], static_cast<int32_t>(id));
  }
  MOE_RETURN_IF_ERROR(impl.ParseNormalizer(j.value("normalizer", json())));
  MOE_RETURN_IF_ERROR(impl.ParsePreTokenizer(j.value("pre_tokenizer", json())));
  MOE_RETURN_IF_ERROR(impl.ParseDecoder(j.value("decoder", json())));
  MOE_RETURN_IF_ERROR(impl.ParsePostProcessor(j.value("post_processor", json()), *t));
  for (const AddedToken& a : t->added_) {
    if (!a.normalized) {
      impl.raw_tokens.push_back({a.content, &a});
      continue;
    }
    std::string pattern = a.content;
    impl.Normalize(&pattern);
    impl.normalized_tokens.push_back({std::move(pattern), &a});
  }
  return t;
}

int32_t HfTokenizer::TokenToId(std::string_view token) const {
  const auto it = token_ids_.find(View(token));
  return it == token_ids_.end() ? -1 : it->second;
}

std::vector<int32_t> HfTokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  const Impl& impl = *impl_;
  std::vector<Piece> raw;
  impl.Split(impl.raw_tokens, {-1, std::string(text), true}, &raw);
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = impl.prefix;
  for (Piece& p : raw) {
    if (p.id >= 0) {
      ids.push_back(p.id);
      continue;
    }
    impl.Normalize(&p.text);
    std::vector<Piece> pieces;
    impl.Split(impl.normalized_tokens, std::move(p), &pieces);
    for (const Piece& q : pieces) {
      if (q.id >= 0) {
        ids.push_back(q.id);
      } else {
        impl.EncodePiece(q, &ids);
      }
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), impl.suffix.begin(), impl.suffix.end());
  return ids;
}

std::string HfTokenizer::Decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  for (const int32_t id : ids) {
    if (id < 0 || id >= vocab_size() || (skip_special_tokens && special_[id])) continue;
    tokens.push_back(tokens_[id]);
  }
  for (const DecoderStep& d : impl_->decoder) {
    switch (d.kind) {
      case DecoderStep::kReplace:
        for (std::string& t : tokens) ReplaceAll(&t, d.from, d.to);
        break;
      case DecoderStep::kByteFallback: {
        // A run of byte pieces becomes its text if the run is valid UTF-8 as a whole, else one
        // U+FFFD per byte (tokenizers' ByteFallback).
        std::vector<std::string> out;
        std::string run;
        size_t run_length = 0;
        const auto flush = [&] {
          if (run_length == 0) return;
          bool valid = true;
          for (size_t p = 0; p < run.size() && valid;) {
            const int length = Utf8CharLength(std::string_view(run).substr(p));
            valid = length > 0;
            p += std::max(length, 1);
          }
          if (valid) {
            out.push_back(run);
          } else {
            for (size_t i = 0; i < run_length; ++i) out.emplace_back(kReplacementChar);
          }
          run.clear();
          run_length = 0;
        };
        for (std::string& t : tokens) {
          const int byte = PieceByte(t);  // "<0xNN>", either hex case, as tokenizers reads it
          if (byte >= 0) {
            run.push_back(static_cast<char>(byte));
            ++run_length;
            continue;
          }
          flush();
          out.push_back(std::move(t));
        }
        flush();
        tokens = std::move(out);
        break;
      }
      case DecoderStep::kFuse: {
        std::string all;
        for (const std::string& t : tokens) all += t;
        tokens.assign(1, std::move(all));
        break;
      }
      case DecoderStep::kStrip:
        for (std::string& t : tokens) {
          int cut = 0;
          size_t begin = 0;
          while (cut < d.start && t.compare(begin, d.from.size(), d.from) == 0) {
            begin += d.from.size();
            ++cut;
          }
          size_t end = t.size();
          cut = 0;
          while (cut < d.stop && end >= begin + d.from.size() &&
                 t.compare(end - d.from.size(), d.from.size(), d.from) == 0) {
            end -= d.from.size();
            ++cut;
          }
          t = t.substr(begin, end - begin);
        }
        break;
      case DecoderStep::kByteLevel: {
        // Each character back to its byte (a token with other characters: its own bytes),
        // then UTF-8 with each invalid sequence as U+FFFD.
        std::string bytes;
        for (const std::string& t : tokens) {
          std::string mapped;
          bool all = true;
          for (size_t pos = 0; pos < t.size() && all;) {
            const auto [c, length] = CodePointAt(t, pos);
            const auto it = ByteLevel().to_byte.find(c);
            all = it != ByteLevel().to_byte.end();
            if (all) mapped.push_back(static_cast<char>(it->second));
            pos += length;
          }
          bytes += all ? mapped : t;
        }
        tokens.assign(1, Utf8Lossy(bytes));
        break;
      }
      case DecoderStep::kMetaspace:
        for (size_t i = 0; i < tokens.size(); ++i) {
          ReplaceAll(&tokens[i], d.from,
                     i == 0 && d.prepend != Prepend::kNever ? std::string_view() : " ");
        }
        break;
    }
  }
  std::string text;
  for (const std::string& t : tokens) text += t;
  return impl_->clean_up ? CleanUpTokenization(std::move(text)) : text;
}

}  // namespace moe
