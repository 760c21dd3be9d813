// The one translation unit that includes sentencepiece_processor.h. It must include no Abseil
// header, directly or through a project header: SentencePiece 0.1.97 declares its own
// absl::string_view (see sentencepiece_model.h).
#include "common/sentencepiece_model.h"

#include <sentencepiece_processor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moe {
namespace {

// Field numbers from SentencePiece's sentencepiece_model.proto.
constexpr uint32_t kModelProtoNormalizerSpec = 3;         // ModelProto.normalizer_spec
constexpr uint32_t kNormalizerAddDummyPrefix = 3;         // NormalizerSpec.add_dummy_prefix
constexpr uint32_t kNormalizerRemoveExtraWhitespace = 4;  // NormalizerSpec.remove_extra_whitespaces

// Just enough of the protobuf wire format to read two bools: the Debian package ships no
// sentencepiece_model.pb.h, so the ModelProto cannot be inspected through its generated class.
class WireReader {
 public:
  explicit WireReader(std::string_view data) : data_(data) {}
  bool done() const { return pos_ >= data_.size(); }

  std::optional<uint64_t> Varint() {
    uint64_t value = 0;
    for (int shift = 0; shift < 64 && pos_ < data_.size(); shift += 7) {
      const uint8_t byte = static_cast<uint8_t>(data_[pos_++]);
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if ((byte & 0x80) == 0) return value;
    }
    return std::nullopt;
  }

  // Reads one field; `*payload` is set for length-delimited fields and `*varint` for varints.
  bool Field(uint32_t* number, uint32_t* wire_type, std::string_view* payload, uint64_t* varint) {
    const std::optional<uint64_t> key = Varint();
    if (!key) return false;
    *number = static_cast<uint32_t>(*key >> 3);
    *wire_type = static_cast<uint32_t>(*key & 7);
    switch (*wire_type) {
      case 0: {
        const std::optional<uint64_t> v = Varint();
        if (!v) return false;
        *varint = *v;
        return true;
      }
      case 1:
        return Skip(8);
      case 2: {
        const std::optional<uint64_t> length = Varint();
        if (!length || *length > data_.size() - pos_) return false;
        *payload = data_.substr(pos_, *length);
        pos_ += *length;
        return true;
      }
      case 5:
        return Skip(4);
      default:  // groups are not used by ModelProto
        return false;
    }
  }

 private:
  bool Skip(size_t n) {
    if (n > data_.size() - pos_) return false;
    pos_ += n;
    return true;
  }

  std::string_view data_;
  size_t pos_ = 0;
};

struct NormalizerFlags {
  bool add_dummy_prefix = true;  // proto defaults
  bool remove_extra_whitespaces = true;
};

// Reads NormalizerSpec's flags from a serialized ModelProto. Repeated occurrences of the
// message merge, so the last value of each field wins, as in protobuf itself.
std::optional<NormalizerFlags> ReadNormalizerFlags(std::string_view model) {
  NormalizerFlags flags;
  WireReader top(model);
  while (!top.done()) {
    uint32_t number = 0, wire_type = 0;
    std::string_view payload;
    uint64_t varint = 0;
    if (!top.Field(&number, &wire_type, &payload, &varint)) return std::nullopt;
    if (number != kModelProtoNormalizerSpec || wire_type != 2) continue;
    WireReader spec(payload);
    while (!spec.done()) {
      if (!spec.Field(&number, &wire_type, &payload, &varint)) return std::nullopt;
      if (wire_type != 0) continue;
      if (number == kNormalizerAddDummyPrefix) flags.add_dummy_prefix = varint != 0;
      if (number == kNormalizerRemoveExtraWhitespace) flags.remove_extra_whitespaces = varint != 0;
    }
  }
  return flags;
}

// Appending a serialized message merges it into the one before it, so this sets
// normalizer_spec.add_dummy_prefix = false and leaves everything else as stored. It is what
// transformers' LlamaTokenizer.get_spm_processor does with ModelProto.MergeFrom.
std::string WithoutDummyPrefix(const std::string& model) {
  constexpr char kPatch[] = {
      static_cast<char>((kModelProtoNormalizerSpec << 3) | 2),  // normalizer_spec, length-delimited
      2,                                                        // length of the spec below
      static_cast<char>(kNormalizerAddDummyPrefix << 3),        // add_dummy_prefix, varint
      0,                                                        // false
  };
  return model + std::string(kPatch, sizeof(kPatch));
}

std::unique_ptr<sentencepiece::SentencePieceProcessor> LoadProcessor(const std::string& serialized,
                                                                     std::string* error) {
  auto processor = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const sentencepiece::util::Status status = processor->LoadFromSerializedProto(serialized);
  if (!status.ok()) {
    *error = status.ToString();
    return nullptr;
  }
  if (processor->GetPieceSize() <= 0) {
    *error = "the model has no pieces";
    return nullptr;
  }
  return processor;
}

}  // namespace

class SentencePieceModelImpl final : public SentencePieceModel {
 public:
  static SentencePieceModel* Create(const std::string& serialized, std::string* error) {
    const std::optional<NormalizerFlags> flags = ReadNormalizerFlags(serialized);
    if (!flags) {
      *error = "not a serialized SentencePiece ModelProto";
      return nullptr;
    }
    std::unique_ptr<SentencePieceModelImpl> model(new SentencePieceModelImpl());
    model->add_dummy_prefix_ = flags->add_dummy_prefix;
    model->remove_extra_whitespaces_ = flags->remove_extra_whitespaces;
    model->processor_ = LoadProcessor(serialized, error);
    if (model->processor_ == nullptr) return nullptr;
    model->processor_no_prefix_ = LoadProcessor(WithoutDummyPrefix(serialized), error);
    if (model->processor_no_prefix_ == nullptr) return nullptr;
    return model.release();
  }

  std::vector<int> Encode(std::string_view text) const override {
    return processor_->EncodeAsIds(text);
  }
  std::vector<int> EncodeWithoutDummyPrefix(std::string_view text) const override {
    return processor_no_prefix_->EncodeAsIds(text);
  }
  int piece_size() const override { return processor_->GetPieceSize(); }
  const std::string& IdToPiece(int id) const override { return processor_->IdToPiece(id); }
  int PieceToId(std::string_view piece) const override { return processor_->PieceToId(piece); }
  bool IsControl(int id) const override { return processor_->IsControl(id); }
  bool IsUnknown(int id) const override { return processor_->IsUnknown(id); }
  bool IsByte(int id) const override { return processor_->IsByte(id); }
  int unk_id() const override { return processor_->unk_id(); }
  int bos_id() const override { return processor_->bos_id(); }
  int eos_id() const override { return processor_->eos_id(); }
  bool add_dummy_prefix() const override { return add_dummy_prefix_; }
  bool remove_extra_whitespaces() const override { return remove_extra_whitespaces_; }

 private:
  SentencePieceModelImpl() = default;

  // The model as stored, and the same model with add_dummy_prefix = false.
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_no_prefix_;
  bool add_dummy_prefix_ = true;
  bool remove_extra_whitespaces_ = true;
};

}  // namespace moe

// Looked up by name (kSentencePieceFactorySymbol) after dlopen.
extern "C" __attribute__((visibility("default"))) moe::SentencePieceModel* moe_spm_from_serialized(
    const std::string& serialized, std::string* error) {
  return moe::SentencePieceModelImpl::Create(serialized, error);
}
