// A std-only view of a SentencePiece model (tokenizer.model).
//
// SentencePiece 0.1.97's sentencepiece_processor.h declares its own absl::string_view, which
// clashes with Abseil's, so that header is included only by sentencepiece_model.cc (compiled in
// its own object library that sees no Abseil header). Everything else talks to SentencePiece
// through this class, whose interface uses only the standard library.
#ifndef MOE_COMMON_SENTENCEPIECE_MODEL_H_
#define MOE_COMMON_SENTENCEPIECE_MODEL_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}  // namespace sentencepiece

namespace moe {

// Thread-safety: immutable after FromSerialized(); all methods may be called concurrently.
class SentencePieceModel {
 public:
  // Parses a serialized ModelProto (the bytes of a tokenizer.model file). Returns nullptr and
  // sets *error (which must not be null) when the bytes are not a usable model.
  static std::unique_ptr<SentencePieceModel> FromSerialized(const std::string& serialized,
                                                            std::string* error);
  ~SentencePieceModel();

  // Ids of `text` with the model's own normalizer settings (so with the dummy-prefix "▁" when
  // the model has add_dummy_prefix, as SentencePiece's own Encode does).
  std::vector<int> Encode(std::string_view text) const;
  // Ids of `text` with add_dummy_prefix forced off, every other setting as in the model. This is
  // the processor transformers' LlamaTokenizer builds when legacy=False.
  std::vector<int> EncodeWithoutDummyPrefix(std::string_view text) const;

  int piece_size() const;
  // REQUIRES: 0 <= id < piece_size().
  const std::string& IdToPiece(int id) const;
  // unk_id() when `piece` is not in the vocabulary.
  int PieceToId(std::string_view piece) const;
  // Piece types. REQUIRES: 0 <= id < piece_size().
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  bool IsByte(int id) const;

  // -1 when the model defines no such piece.
  int unk_id() const;
  int bos_id() const;
  int eos_id() const;

  // NormalizerSpec settings of the model as stored (before any override).
  bool add_dummy_prefix() const { return add_dummy_prefix_; }
  bool remove_extra_whitespaces() const { return remove_extra_whitespaces_; }

 private:
  SentencePieceModel();

  // The model as stored, and the same model with add_dummy_prefix = false.
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_no_prefix_;
  bool add_dummy_prefix_ = true;
  bool remove_extra_whitespaces_ = true;
};

}  // namespace moe

#endif  // MOE_COMMON_SENTENCEPIECE_MODEL_H_
