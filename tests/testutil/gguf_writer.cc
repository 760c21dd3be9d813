#include "tests/testutil/gguf_writer.h"

#include <cstring>

#include "common/gguf.h"

namespace moe::testing {
namespace {

template <typename T>
void Put(std::vector<uint8_t>* out, T v) {
  const size_t at = out->size();
  out->resize(at + sizeof(T));
  std::memcpy(out->data() + at, &v, sizeof(T));
}

void PutString(std::vector<uint8_t>* out, const std::string& s) {
  Put<uint64_t>(out, s.size());
  out->insert(out->end(), s.begin(), s.end());
}

template <typename T>
std::vector<uint8_t> Scalar(T v) {
  std::vector<uint8_t> out;
  Put(&out, v);
  return out;
}

}  // namespace

GgufBuilder& GgufBuilder::Version(uint32_t version) {
  version_ = version;
  return *this;
}

GgufBuilder& GgufBuilder::Alignment(uint32_t alignment) {
  alignment_ = alignment;
  return U32("general.alignment", alignment);
}

GgufBuilder& GgufBuilder::RawValue(const std::string& key, uint32_t type,
                                   const std::vector<uint8_t>& bytes) {
  kvs_.push_back({key, type, bytes});
  return *this;
}

GgufBuilder& GgufBuilder::U32(const std::string& key, uint32_t v) {
  return RawValue(key, 4, Scalar(v));
}
GgufBuilder& GgufBuilder::I32(const std::string& key, int32_t v) {
  return RawValue(key, 5, Scalar(v));
}
GgufBuilder& GgufBuilder::U64(const std::string& key, uint64_t v) {
  return RawValue(key, 10, Scalar(v));
}
GgufBuilder& GgufBuilder::F32(const std::string& key, float v) {
  return RawValue(key, 6, Scalar(v));
}
GgufBuilder& GgufBuilder::Bool(const std::string& key, bool v) {
  return RawValue(key, 7, Scalar<uint8_t>(v ? 1 : 0));
}
GgufBuilder& GgufBuilder::String(const std::string& key, const std::string& v) {
  std::vector<uint8_t> bytes;
  PutString(&bytes, v);
  return RawValue(key, 8, bytes);
}
GgufBuilder& GgufBuilder::StringArray(const std::string& key, const std::vector<std::string>& v) {
  std::vector<uint8_t> bytes;
  Put<uint32_t>(&bytes, 8);
  Put<uint64_t>(&bytes, v.size());
  for (const std::string& s : v) PutString(&bytes, s);
  return RawValue(key, 9, bytes);
}
GgufBuilder& GgufBuilder::F32Array(const std::string& key, const std::vector<float>& v) {
  std::vector<uint8_t> bytes;
  Put<uint32_t>(&bytes, 6);
  Put<uint64_t>(&bytes, v.size());
  for (float f : v) Put(&bytes, f);
  return RawValue(key, 9, bytes);
}
GgufBuilder& GgufBuilder::I32Array(const std::string& key, const std::vector<int32_t>& v) {
  std::vector<uint8_t> bytes;
  Put<uint32_t>(&bytes, 5);
  Put<uint64_t>(&bytes, v.size());
  for (int32_t i : v) Put(&bytes, i);
  return RawValue(key, 9, bytes);
}

GgufBuilder& GgufBuilder::Tensor(const std::string& name, const std::vector<uint64_t>& dims,
                                 uint32_t type_id, const std::vector<uint8_t>& data,
                                 std::optional<uint64_t> offset) {
  tensors_.push_back({name, dims, type_id, data, offset});
  return *this;
}

bool GgufBuilder::Has(const std::string& key) const {
  for (const Kv& kv : kvs_) {
    if (kv.key == key) return true;
  }
  return false;
}

std::vector<uint8_t> GgufBuilder::Build() const {
  std::vector<uint8_t> out;
  Put<uint32_t>(&out, 0x46554747);
  Put<uint32_t>(&out, version_);
  Put<uint64_t>(&out, tensors_.size());
  Put<uint64_t>(&out, kvs_.size());
  for (const Kv& kv : kvs_) {
    PutString(&out, kv.key);
    Put<uint32_t>(&out, kv.type);
    out.insert(out.end(), kv.value.begin(), kv.value.end());
  }
  // Data-relative offsets: declared, or packed at aligned positions in order.
  std::vector<uint64_t> offsets;
  uint64_t next = 0;
  for (const TensorEntry& t : tensors_) {
    const uint64_t at = t.offset.value_or(next);
    offsets.push_back(at);
    next = (at + t.data.size() + alignment_ - 1) / alignment_ * alignment_;
  }
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const TensorEntry& t = tensors_[i];
    PutString(&out, t.name);
    Put<uint32_t>(&out, static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) Put<uint64_t>(&out, d);
    Put<uint32_t>(&out, t.type_id);
    Put<uint64_t>(&out, offsets[i]);
  }
  if (tensors_.empty()) return out;
  const uint64_t data_start = (out.size() + alignment_ - 1) / alignment_ * alignment_;
  out.resize(data_start, 0);
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const uint64_t at = data_start + offsets[i];
    // A declared offset past what is written so far stays unbacked (a truncated file).
    if (tensors_[i].offset.has_value() && at > out.size()) continue;
    if (out.size() < at + tensors_[i].data.size()) out.resize(at + tensors_[i].data.size(), 0);
    std::memcpy(out.data() + at, tensors_[i].data.data(), tensors_[i].data.size());
  }
  return out;
}

std::vector<uint8_t> PatternTensorBytes(uint32_t type_id, int64_t n, uint32_t seed) {
  const GgmlTypeInfo* type = FindGgmlType(type_id);
  const int64_t blocks = n / type->block_elements;
  std::vector<uint8_t> bytes(blocks * type->block_bytes);
  uint32_t state = seed * 2654435761u + 1;
  for (uint8_t& b : bytes) {
    state = state * 1664525u + 1013904223u;
    b = static_cast<uint8_t>(state >> 24);
  }
  // Half-float fields -> small finite values (sign, exponent 8..14 of 31, random mantissa).
  const auto fix_half = [&](uint8_t* p) {
    state = state * 1664525u + 1013904223u;
    const uint16_t h = static_cast<uint16_t>(((state >> 16) & 0x8000u) |
                                             (((state >> 20) % 7 + 8) << 10) | (state & 0x3ffu));
    std::memcpy(p, &h, 2);
  };
  const bool element = type->block_elements == 1;
  for (int64_t b = 0; b < (element ? n : blocks); ++b) {
    uint8_t* block = bytes.data() + b * type->block_bytes;
    switch (type_id) {
      case 1:   // F16
      case 30:  // BF16 (exponent field differs but any pattern without inf/NaN is fine)
        fix_half(block);
        if (type_id == 30) block[1] = static_cast<uint8_t>((block[1] & 0x80) | 0x3c);
        break;
      case 0: {  // F32
        state = state * 1664525u + 1013904223u;
        const float f = static_cast<float>(static_cast<int32_t>(state)) * 1e-9f;
        std::memcpy(block, &f, 4);
        break;
      }
      case 2:  // Q4_0, Q5_0, Q8_0: d first
      case 6:
      case 8:
        fix_half(block);
        break;
      case 3:  // Q4_1, Q5_1, Q4_K, Q5_K: d, then m / dmin
      case 7:
      case 12:
      case 13:
        fix_half(block);
        fix_half(block + 2);
        break;
      case 14:  // Q6_K: d last
        fix_half(block + 208);
        break;
      default:
        break;
    }
  }
  return bytes;
}

}  // namespace moe::testing
