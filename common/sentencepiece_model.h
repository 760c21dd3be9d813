// A std-only view of a SentencePiece model (tokenizer.model).
//
// Debian's libsentencepiece (0.1.97) cannot share a process with the rest of our stack as an
// ordinary dependency:
//  - its sentencepiece_processor.h declares its own absl::string_view, which clashes with
//    Abseil's, so the header is included only by sentencepiece_model.cc, which sees no Abseil;
//  - it embeds its own protobuf-lite 3.14 runtime under the usual google::protobuf names, so in
//    a process that also links libprotobuf 3.21 (gRPC) its symbols get interposed and it aborts
//    at load ("compiled against version 3.14.0").
// So sentencepiece_model.cc is built into a small shared library (libmoe_spm.so, next to the
// binaries in build/lib) that FromSerialized() loads with dlopen(RTLD_LOCAL | RTLD_DEEPBIND):
// SentencePiece then binds to its own embedded protobuf, and we only ever call it through this
// std-only virtual interface.
#ifndef MOE_COMMON_SENTENCEPIECE_MODEL_H_
#define MOE_COMMON_SENTENCEPIECE_MODEL_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

// Thread-safety: immutable after FromSerialized(); all methods may be called concurrently.
class SentencePieceModel {
 public:
  // Parses a serialized ModelProto (the bytes of a tokenizer.model file). Returns nullptr and
  // sets *error (which must not be null) when the bytes are not a usable model.
  // Loads libmoe_spm.so on first use (an error names the paths tried).
  static std::unique_ptr<SentencePieceModel> FromSerialized(const std::string& serialized,
                                                            std::string* error);
  virtual ~SentencePieceModel() = default;

  // Ids of `text` with the model's own normalizer settings (so with the dummy-prefix "▁" when
  // the model has add_dummy_prefix, as SentencePiece's own Encode does).
  virtual std::vector<int> Encode(std::string_view text) const = 0;
  // Ids of `text` with add_dummy_prefix forced off, every other setting as in the model. This is
  // the processor transformers' LlamaTokenizer builds when legacy=False.
  virtual std::vector<int> EncodeWithoutDummyPrefix(std::string_view text) const = 0;

  virtual int piece_size() const = 0;
  // REQUIRES: 0 <= id < piece_size().
  virtual const std::string& IdToPiece(int id) const = 0;
  // unk_id() when `piece` is not in the vocabulary.
  virtual int PieceToId(std::string_view piece) const = 0;
  // Piece types. REQUIRES: 0 <= id < piece_size().
  virtual bool IsControl(int id) const = 0;
  virtual bool IsUnknown(int id) const = 0;
  virtual bool IsByte(int id) const = 0;

  // -1 when the model defines no such piece.
  virtual int unk_id() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;

  // NormalizerSpec settings of the model as stored (before any override).
  virtual bool add_dummy_prefix() const = 0;
  virtual bool remove_extra_whitespaces() const = 0;

 protected:
  SentencePieceModel() = default;
};

// The shim's entry point, looked up with dlsym: FromSerialized without the loading.
using SentencePieceFactory = SentencePieceModel* (*)(const std::string& serialized,
                                                     std::string* error);
inline constexpr char kSentencePieceFactorySymbol[] = "moe_spm_from_serialized";

}  // namespace moe

#endif  // MOE_COMMON_SENTENCEPIECE_MODEL_H_
