// A SentencePiece BPE model rebuilt from its vocabulary alone (pieces, scores, piece types), as
// GGUF files carry it (tokenizer.ggml.model = "llama"), behind the same SentencePieceModel
// interface as libsentencepiece so the Tokenizer on top is unchanged.
//
// Encoding follows SentencePiece's bpe_model.cc: the text is normalized (identity normalizer:
// " " -> "▁", a "▁" prefix when add_dummy_prefix, malformed UTF-8 bytes -> U+FFFD), split
// into UTF-8 characters (user-defined
// pieces kept whole), then the adjacent pair whose concatenation is a piece with the highest
// score is merged (ties: the leftmost), until no pair is a piece. Symbols that are not pieces
// become their UTF-8 bytes' <0xNN> pieces (byte fallback), or unk without them. Normal,
// user-defined and unused pieces take part (unused pieces never result from a merge); control,
// unknown and byte pieces are never produced from text.
#ifndef MOE_COMMON_SPM_VOCAB_H_
#define MOE_COMMON_SPM_VOCAB_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "common/sentencepiece_model.h"

namespace moe {

struct SpmVocab {
  // SentencePiece's piece types (also llama.cpp's token types).
  enum Type : int32_t {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,
    kUserDefined = 4,
    kUnused = 5,
    kByte = 6
  };
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int32_t> types;  // one of Type per piece
  int32_t unk_id = -1, bos_id = -1, eos_id = -1;
  bool add_dummy_prefix = true;
};

class SpmVocabModel : public SentencePieceModel {
 public:
  // INVALID_ARGUMENT (prefixed by `label`) when the lists differ in length, a type is unknown,
  // there is no unk id or a special id is out of range, or a byte piece is not "<0xNN>".
  static absl::StatusOr<std::unique_ptr<SpmVocabModel>> Create(SpmVocab vocab,
                                                               const std::string& label);

  std::vector<int> Encode(std::string_view text) const override;
  std::vector<int> EncodeWithoutDummyPrefix(std::string_view text) const override;
  int piece_size() const override { return static_cast<int>(vocab_.pieces.size()); }
  const std::string& IdToPiece(int id) const override { return vocab_.pieces[id]; }
  int PieceToId(std::string_view piece) const override;
  bool IsControl(int id) const override { return vocab_.types[id] == SpmVocab::kControl; }
  bool IsUnknown(int id) const override { return vocab_.types[id] == SpmVocab::kUnknown; }
  bool IsByte(int id) const override { return vocab_.types[id] == SpmVocab::kByte; }
  int unk_id() const override { return vocab_.unk_id; }
  int bos_id() const override { return vocab_.bos_id; }
  int eos_id() const override { return vocab_.eos_id; }
  bool add_dummy_prefix() const override { return vocab_.add_dummy_prefix; }
  bool remove_extra_whitespaces() const override { return false; }

 private:
  explicit SpmVocabModel(SpmVocab vocab) : vocab_(std::move(vocab)) {}
  std::vector<int> EncodeNormalized(const std::string& normalized) const;

  SpmVocab vocab_;
  // The encodable id of `piece`, or -1 (no allocation: heterogeneous lookup).
  int32_t FindEncodable(std::string_view piece) const;

  // Pieces that text can become (normal, user-defined, unused) -> id.
  absl::flat_hash_map<std::string, int32_t> encodable_;
  // Every piece (control, unknown and byte pieces too) -> its first id, for PieceToId.
  absl::flat_hash_map<std::string, int32_t> any_;
  // Non-empty user-defined pieces, which the text is split at (longest match first), and their
  // distinct byte lengths, longest first.
  absl::flat_hash_set<std::string> user_defined_;
  std::vector<size_t> user_defined_lengths_;
  int32_t byte_ids_[256];  // -1 where the vocabulary has no <0xNN> piece
};

}  // namespace moe

#endif  // MOE_COMMON_SPM_VOCAB_H_
