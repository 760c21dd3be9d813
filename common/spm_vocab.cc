#include "common/spm_vocab.h"

#include <algorithm>
#include <functional>
#include <queue>

#include "absl/strings/str_cat.h"
#include "common/utf8.h"

namespace moe {
namespace {

// Length of the well-formed UTF-8 character at the start of `s` (1-4), or 0 when it is not one.
size_t CharLength(std::string_view s) {
  return static_cast<size_t>(std::max(0, Utf8CharLength(s)));
}

// The identity normalizer: a "▁" prefix when asked, " " -> "▁", and every byte that starts no
// well-formed character -> U+FFFD (as SentencePiece's normalizer does).
std::string Normalize(std::string_view text, bool dummy_prefix) {
  std::string out;
  if (dummy_prefix && !text.empty()) out.append(kSpaceSymbol);
  for (size_t pos = 0; pos < text.size();) {
    const size_t n = CharLength(text.substr(pos));
    if (n == 0) {
      out.append(kReplacementChar);
      ++pos;
    } else if (text[pos] == ' ') {
      out.append(kSpaceSymbol);
      ++pos;
    } else {
      out.append(text.substr(pos, n));
      pos += n;
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SpmVocabModel>> SpmVocabModel::Create(SpmVocab vocab,
                                                                     const std::string& label) {
  const size_t n = vocab.pieces.size();
  if (n == 0 || vocab.scores.size() != n || vocab.types.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(
        label, ": the tokenizer has ", n, " pieces, ", vocab.scores.size(), " scores and ",
        vocab.types.size(), " token types (they must be equal and non-zero)"));
  }
  if (vocab.unk_id < 0) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": the tokenizer has no unknown token"));
  }
  for (const int32_t id : {vocab.unk_id, vocab.bos_id, vocab.eos_id}) {
    if (id < -1 || id >= static_cast<int32_t>(n)) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": special token id ", id, " is outside the vocabulary of ", n));
    }
  }
  std::unique_ptr<SpmVocabModel> m(new SpmVocabModel(std::move(vocab)));
  std::fill(std::begin(m->byte_ids_), std::end(m->byte_ids_), -1);
  for (size_t id = 0; id < n; ++id) {
    const int32_t type = m->vocab_.types[id];
    const std::string& piece = m->vocab_.pieces[id];
    if (type < SpmVocab::kNormal || type > SpmVocab::kByte) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": token ", id, " has unknown token type ", type));
    }
    m->any_.emplace(piece, static_cast<int32_t>(id));
    if (type == SpmVocab::kByte) {
      const int byte = PieceByte(piece);
      if (byte < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": byte token ", id, " is \"", piece, "\", not <0xNN>"));
      }
      m->byte_ids_[byte] = static_cast<int32_t>(id);
    } else if (type == SpmVocab::kNormal || type == SpmVocab::kUserDefined ||
               type == SpmVocab::kUnused) {
      m->encodable_.emplace(piece, static_cast<int32_t>(id));  // first id wins, as in SP
      if (type == SpmVocab::kUserDefined && !piece.empty()) m->user_defined_.insert(piece);
    }
  }
  for (const std::string& piece : m->user_defined_) {
    m->user_defined_lengths_.push_back(piece.size());
  }
  std::sort(m->user_defined_lengths_.begin(), m->user_defined_lengths_.end(),
            std::greater<size_t>());
  m->user_defined_lengths_.erase(
      std::unique(m->user_defined_lengths_.begin(), m->user_defined_lengths_.end()),
      m->user_defined_lengths_.end());
  return m;
}

int32_t SpmVocabModel::FindEncodable(std::string_view piece) const {
  const auto it = encodable_.find(absl::string_view(piece.data(), piece.size()));
  return it == encodable_.end() ? -1 : it->second;
}

int SpmVocabModel::PieceToId(std::string_view piece) const {
  const int32_t id = FindEncodable(piece);
  if (id >= 0) return id;
  const auto it = any_.find(absl::string_view(piece.data(), piece.size()));
  return it != any_.end() ? it->second : vocab_.unk_id;
}

std::vector<int> SpmVocabModel::Encode(std::string_view text) const {
  return EncodeNormalized(Normalize(text, vocab_.add_dummy_prefix));
}

std::vector<int> SpmVocabModel::EncodeWithoutDummyPrefix(std::string_view text) const {
  return EncodeNormalized(Normalize(text, /*dummy_prefix=*/false));
}

std::vector<int> SpmVocabModel::EncodeNormalized(const std::string& text) const {
  struct Symbol {
    int prev, next;
    std::string_view piece;
  };
  std::vector<Symbol> symbols;
  const std::string_view s = text;
  for (size_t pos = 0; pos < s.size();) {
    // The longest user-defined piece at `pos` (two pieces of one length cannot both match).
    size_t len = 0;
    for (const size_t length : user_defined_lengths_) {
      if (length <= s.size() - pos &&
          user_defined_.contains(absl::string_view(s.data() + pos, length))) {
        len = length;
        break;
      }
    }
    if (len == 0) len = CharLength(s.substr(pos));  // normalized: always well-formed
    const int index = static_cast<int>(symbols.size());
    symbols.push_back({index - 1, -1, s.substr(pos, len)});
    if (index > 0) symbols[index - 1].next = index;
    pos += len;
  }
  // The agenda: best score first, then the leftmost pair (SentencePiece's SymbolPairComparator).
  struct Pair {
    int left, right;
    float score;
    size_t size;
  };
  const auto worse = [](const Pair& a, const Pair& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> agenda(worse);
  const auto maybe_add = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    // Adjacent symbols are adjacent in the text: their concatenation is a substring of it.
    const std::string_view merged(symbols[left].piece.data(),
                                  symbols[left].piece.size() + symbols[right].piece.size());
    const int32_t id = FindEncodable(merged);
    if (id < 0 || vocab_.types[id] == SpmVocab::kUnused) return;
    agenda.push({left, right, vocab_.scores[id], merged.size()});
  };
  for (size_t i = 1; i < symbols.size(); ++i)
    maybe_add(static_cast<int>(i) - 1, static_cast<int>(i));
  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& left = symbols[top.left];
    Symbol& right = symbols[top.right];
    // Stale: one side was merged away or grew since this pair was queued.
    if (left.piece.empty() || right.piece.empty() ||
        left.piece.size() + right.piece.size() != top.size || left.next != top.right) {
      continue;
    }
    left.piece = std::string_view(left.piece.data(), top.size);
    right.piece = std::string_view();
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.left;
    maybe_add(left.prev, top.left);
    maybe_add(top.left, left.next);
  }
  std::vector<int> ids;
  for (int i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
    const std::string_view piece = symbols[i].piece;
    if (const int32_t id = FindEncodable(piece); id >= 0) {
      ids.push_back(id);
      continue;
    }
    bool all_bytes = true;
    for (unsigned char c : piece) all_bytes = all_bytes && byte_ids_[c] >= 0;
    if (all_bytes) {
      for (unsigned char c : piece) ids.push_back(byte_ids_[c]);
    } else {
      ids.push_back(vocab_.unk_id);  // Create guarantees an unk id
    }
  }
  return ids;
}

}  // namespace moe
