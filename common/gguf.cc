#include "common/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace moe {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
constexpr int kMaxDims = 4;                  // GGML_MAX_DIMS

// ggml.c's type_traits: block size and bytes per block.
constexpr struct {
  uint32_t id;
  GgmlTypeInfo info;
} kGgmlTypes[] = {
    {0, {"F32", 1, 4}},         {1, {"F16", 1, 2}},         {2, {"Q4_0", 32, 18}},
    {3, {"Q4_1", 32, 20}},      {6, {"Q5_0", 32, 22}},      {7, {"Q5_1", 32, 24}},
    {8, {"Q8_0", 32, 34}},      {9, {"Q8_1", 32, 40}},      {10, {"Q2_K", 256, 84}},
    {11, {"Q3_K", 256, 110}},   {12, {"Q4_K", 256, 144}},   {13, {"Q5_K", 256, 176}},
    {14, {"Q6_K", 256, 210}},   {15, {"Q8_K", 256, 292}},   {16, {"IQ2_XXS", 256, 66}},
    {17, {"IQ2_XS", 256, 74}},  {18, {"IQ3_XXS", 256, 98}}, {19, {"IQ1_S", 256, 50}},
    {20, {"IQ4_NL", 32, 18}},   {21, {"IQ3_S", 256, 110}},  {22, {"IQ2_S", 256, 82}},
    {23, {"IQ4_XS", 256, 136}}, {24, {"I8", 1, 1}},         {25, {"I16", 1, 2}},
    {26, {"I32", 1, 4}},        {27, {"I64", 1, 8}},        {28, {"F64", 1, 8}},
    {29, {"IQ1_M", 256, 56}},   {30, {"BF16", 1, 2}},       {34, {"TQ1_0", 256, 54}},
    {35, {"TQ2_0", 256, 66}},   {39, {"MXFP4", 32, 17}},
};

absl::Status Error(const std::string& label, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(label, ": ", what));
}

// Sequential little-endian reads from [pos, end), each bounds-checked.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& label)
      : data_(data), size_(size), label_(label) {}

  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }
  // Array elements the metadata may still hold (kMaxGgufArrayElements in all).
  uint64_t& array_elements_left() { return array_elements_left_; }

  template <typename T>
  absl::Status Read(T* out, const std::string& what) {
    if (left() < sizeof(T)) return Truncated(what);
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status ReadString(std::string* out, const std::string& what) {
    uint64_t n = 0;
    MOE_RETURN_IF_ERROR(Read(&n, what));
    if (n > left()) {
      return Error(label_,
                   absl::StrCat(what, ": string length ", n, " at byte ", pos_ - 8,
                                " runs past the end of the file (", left(), " bytes left)"));
    }
    out->assign(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return absl::OkStatus();
  }

  absl::Status Truncated(const std::string& what) const {
    return Error(label_, absl::StrCat("truncated at byte ", pos_, " while reading ", what));
  }

 private:
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
  uint64_t array_elements_left_ = kMaxGgufArrayElements;
  const std::string& label_;
};

// Smallest encoding of one value of `type` (bounds array counts before any allocation).
uint64_t MinValueBytes(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kString:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kArray:
      return 12;  // element type + count
  }
  return 1;
}

bool KnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::kFloat64); }

template <typename T>
absl::Status ReadScalar(Cursor* c, GgufValue* v, const std::string& what) {
  T x{};
  MOE_RETURN_IF_ERROR(c->Read(&x, what));
  if constexpr (std::is_floating_point_v<T>) {
    v->f = static_cast<double>(x);
  } else if constexpr (std::is_signed_v<T>) {
    v->i = static_cast<int64_t>(x);
  } else {
    v->u = static_cast<uint64_t>(x);
  }
  return absl::OkStatus();
}

absl::Status ReadValue(Cursor* c, GgufValueType type, int depth, const std::string& what,
                       const std::string& label, GgufValue* v) {
  v->type = type;
  switch (type) {
    case GgufValueType::kUint8:
      return ReadScalar<uint8_t>(c, v, what);
    case GgufValueType::kInt8:
      return ReadScalar<int8_t>(c, v, what);
    case GgufValueType::kUint16:
      return ReadScalar<uint16_t>(c, v, what);
    case GgufValueType::kInt16:
      return ReadScalar<int16_t>(c, v, what);
    case GgufValueType::kUint32:
      return ReadScalar<uint32_t>(c, v, what);
    case GgufValueType::kInt32:
      return ReadScalar<int32_t>(c, v, what);
    case GgufValueType::kUint64:
      return ReadScalar<uint64_t>(c, v, what);
    case GgufValueType::kInt64:
      return ReadScalar<int64_t>(c, v, what);
    case GgufValueType::kFloat32:
      return ReadScalar<float>(c, v, what);
    case GgufValueType::kFloat64:
      return ReadScalar<double>(c, v, what);
    case GgufValueType::kBool: {
      uint8_t b = 0;
      MOE_RETURN_IF_ERROR(c->Read(&b, what));
      if (b > 1) return Error(label, absl::StrCat(what, ": bool value ", b, " is not 0 or 1"));
      v->b = b == 1;
      return absl::OkStatus();
    }
    case GgufValueType::kString:
      return c->ReadString(&v->s, what);
    case GgufValueType::kArray: {
      if (depth >= kMaxGgufArrayDepth) {
        return Error(label, absl::StrCat(what, ": arrays nested deeper than ", kMaxGgufArrayDepth));
      }
      uint32_t elem = 0;
      uint64_t count = 0;
      MOE_RETURN_IF_ERROR(c->Read(&elem, what));
      MOE_RETURN_IF_ERROR(c->Read(&count, what));
      if (!KnownValueType(elem)) {
        return Error(label, absl::StrCat(what, ": unknown array element type ", elem));
      }
      v->array_type = static_cast<GgufValueType>(elem);
      if (count > c->left() / MinValueBytes(v->array_type)) {
        return Error(label, absl::StrCat(what, ": array of ", count, " elements cannot fit in the ",
                                         c->left(), " bytes left"));
      }
      if (count > c->array_elements_left()) {
        return Error(label, absl::StrCat(what, ": array of ", count,
                                         " elements: the metadata's arrays hold more than ",
                                         kMaxGgufArrayElements, " elements in all"));
      }
      c->array_elements_left() -= count;
      v->array.resize(count);
      for (uint64_t k = 0; k < count; ++k) {
        MOE_RETURN_IF_ERROR(ReadValue(c, v->array_type, depth + 1, what, label, &v->array[k]));
      }
      return absl::OkStatus();
    }
  }
  return Error(label, absl::StrCat(what, ": unknown value type"));
}

bool IsUnsigned(GgufValueType t) {
  return t == GgufValueType::kUint8 || t == GgufValueType::kUint16 || t == GgufValueType::kUint32 ||
         t == GgufValueType::kUint64;
}
bool IsSigned(GgufValueType t) {
  return t == GgufValueType::kInt8 || t == GgufValueType::kInt16 || t == GgufValueType::kInt32 ||
         t == GgufValueType::kInt64;
}
bool IsFloat(GgufValueType t) {
  return t == GgufValueType::kFloat32 || t == GgufValueType::kFloat64;
}

// A non-negative integer of any integer type, as GetUint reads it.
std::optional<uint64_t> AsUint(const GgufValue& v) {
  if (IsUnsigned(v.type)) return v.u;
  if (IsSigned(v.type) && v.i >= 0) return static_cast<uint64_t>(v.i);
  return std::nullopt;
}

// The non-negative integer at `key` of a header, if it has one.
std::optional<uint64_t> UintKey(const GgufHeader& h, const std::string& key) {
  const auto it = h.metadata.find(key);
  if (it == h.metadata.end()) return std::nullopt;
  return AsUint(it->second);
}

absl::Status ReadMetadata(Cursor* c, uint64_t count, const std::string& label, GgufHeader* h) {
  for (uint64_t k = 0; k < count; ++k) {
    std::string key;
    MOE_RETURN_IF_ERROR(c->ReadString(&key, absl::StrCat("metadata key ", k)));
    if (key.empty()) return Error(label, absl::StrCat("metadata key ", k, " is empty"));
    uint32_t type = 0;
    MOE_RETURN_IF_ERROR(c->Read(&type, key));
    if (!KnownValueType(type)) {
      return Error(label, absl::StrCat("metadata ", key, ": unknown value type ", type));
    }
    GgufValue value;
    MOE_RETURN_IF_ERROR(
        ReadValue(c, static_cast<GgufValueType>(type), 0, "metadata " + key, label, &value));
    if (!h->metadata.emplace(key, std::move(value)).second) {
      return Error(label, absl::StrCat("metadata key ", key, " appears twice"));
    }
  }
  auto align = h->metadata.find("general.alignment");
  if (align != h->metadata.end()) {
    const GgufValue& v = align->second;
    if (v.type != GgufValueType::kUint32 || v.u == 0 || (v.u & (v.u - 1)) != 0) {
      return Error(label, "general.alignment must be a UINT32 power of two");
    }
    h->alignment = static_cast<uint32_t>(v.u);
  }
  return absl::OkStatus();
}

absl::Status ReadTensorInfo(Cursor* c, uint64_t index, const std::string& label, GgufTensorInfo* t,
                            uint64_t* relative_offset) {
  MOE_RETURN_IF_ERROR(c->ReadString(&t->name, absl::StrCat("the name of tensor ", index)));
  const std::string who = absl::StrCat("tensor ", t->name);
  uint32_t n_dims = 0;
  MOE_RETURN_IF_ERROR(c->Read(&n_dims, who));
  if (n_dims < 1 || n_dims > kMaxDims) {
    return Error(label,
                 absl::StrCat(who, ": ", n_dims, " dimensions (1 to ", kMaxDims, " allowed)"));
  }
  uint64_t elements = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    uint64_t dim = 0;
    MOE_RETURN_IF_ERROR(c->Read(&dim, who));
    if (dim == 0 || dim > (uint64_t{1} << 40) || __builtin_mul_overflow(elements, dim, &elements) ||
        elements > (uint64_t{1} << 48)) {
      return Error(label, absl::StrCat(who, ": dimension ", d, " = ", dim,
                                       " is zero or makes the tensor impossibly large"));
    }
    t->dims.push_back(static_cast<int64_t>(dim));
  }
  MOE_RETURN_IF_ERROR(c->Read(&t->type_id, who));
  MOE_RETURN_IF_ERROR(c->Read(relative_offset, who));
  t->type = FindGgmlType(t->type_id);
  if (t->type == nullptr) {
    return Error(label, absl::StrCat(who, ": unknown ggml type ", t->type_id));
  }
  if (t->dims[0] % t->type->block_elements != 0) {
    return Error(label, absl::StrCat(who, ": row length ", t->dims[0], " is not a multiple of ",
                                     t->type->name, "'s block of ", t->type->block_elements));
  }
  // Cannot overflow: elements <= 2^48 and block_bytes / block_elements <= 8.
  t->byte_size = elements / t->type->block_elements * t->type->block_bytes;
  return absl::OkStatus();
}

// Every tensor inside the data section, aligned, and no two overlapping.
absl::Status CheckTensorSpans(const std::vector<uint64_t>& relative, uint64_t size,
                              const std::string& label, GgufHeader* h) {
  std::vector<size_t> order(h->tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (size_t i = 0; i < h->tensors.size(); ++i) {
    GgufTensorInfo& t = h->tensors[i];
    const uint64_t data_bytes = size - h->data_offset;
    if (relative[i] % h->alignment != 0) {
      return Error(label, absl::StrCat("tensor ", t.name, ": offset ", relative[i],
                                       " is not a multiple of the alignment ", h->alignment));
    }
    if (relative[i] > data_bytes || t.byte_size > data_bytes - relative[i]) {
      return Error(label, absl::StrCat("tensor ", t.name, ": bytes [", relative[i], ", +",
                                       t.byte_size, ") run past the end of the data section (",
                                       data_bytes, " bytes; truncated file?)"));
    }
    t.file_offset = h->data_offset + relative[i];
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return h->tensors[a].file_offset < h->tensors[b].file_offset;
  });
  for (size_t k = 1; k < order.size(); ++k) {
    const GgufTensorInfo& prev = h->tensors[order[k - 1]];
    const GgufTensorInfo& next = h->tensors[order[k]];
    if (prev.file_offset + prev.byte_size > next.file_offset) {
      return Error(label, absl::StrCat("tensors ", prev.name, " and ", next.name, " overlap"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

const GgmlTypeInfo* FindGgmlType(uint32_t id) {
  for (const auto& t : kGgmlTypes) {
    if (t.id == id) return &t.info;
  }
  return nullptr;
}

const char* GgufValueTypeName(GgufValueType type) {
  static constexpr const char* kNames[] = {"UINT8",  "INT8",    "UINT16", "INT16",  "UINT32",
                                           "INT32",  "FLOAT32", "BOOL",   "STRING", "ARRAY",
                                           "UINT64", "INT64",   "FLOAT64"};
  const auto i = static_cast<uint32_t>(type);
  return i < std::size(kNames) ? kNames[i] : "UNKNOWN";
}

int64_t GgufTensorInfo::rows() const {
  int64_t n = 1;
  for (size_t d = 1; d < dims.size(); ++d) n *= dims[d];
  return n;
}

uint64_t GgufTensorInfo::row_bytes() const {
  return static_cast<uint64_t>(dims[0] / type->block_elements * type->block_bytes);
}

absl::StatusOr<GgufHeader> ParseGgufImage(const uint8_t* data, size_t size,
                                          const std::string& label) {
  Cursor c(data, size, label);
  uint32_t magic = 0;
  GgufHeader h;
  if (!c.Read(&magic, "the magic").ok() || magic != kGgufMagic) {
    return Error(label, "not a GGUF file (no \"GGUF\" magic)");
  }
  MOE_RETURN_IF_ERROR(c.Read(&h.version, "the version"));
  if (h.version != 2 && h.version != 3) {
    return Error(label, absl::StrCat("GGUF version ", h.version,
                                     " is not supported (2 and 3 are; convert the model again "
                                     "with a current llama.cpp)"));
  }
  uint64_t tensor_count = 0, kv_count = 0;
  MOE_RETURN_IF_ERROR(c.Read(&tensor_count, "the tensor count"));
  MOE_RETURN_IF_ERROR(c.Read(&kv_count, "the metadata count"));
  // A metadata entry takes at least 13 bytes (key length, a 1-byte key, type); a tensor info
  // at least 33 (name length, 1-byte name, n_dims, one dim, type, offset).
  if (kv_count > c.left() / 13 || tensor_count > c.left() / 33) {
    return Error(label, absl::StrCat(kv_count, " metadata entries and ", tensor_count,
                                     " tensors cannot fit in a file of ", size, " bytes"));
  }
  MOE_RETURN_IF_ERROR(ReadMetadata(&c, kv_count, label, &h));
  std::vector<uint64_t> relative(tensor_count);
  h.tensors.resize(tensor_count);
  std::map<std::string_view, size_t> names;
  for (uint64_t k = 0; k < tensor_count; ++k) {
    MOE_RETURN_IF_ERROR(ReadTensorInfo(&c, k, label, &h.tensors[k], &relative[k]));
  }
  for (size_t k = 0; k < h.tensors.size(); ++k) {
    if (!names.emplace(h.tensors[k].name, k).second) {
      return Error(label, absl::StrCat("tensor ", h.tensors[k].name, " appears twice"));
    }
  }
  const uint64_t end_of_infos = c.pos();
  h.data_offset = (end_of_infos + h.alignment - 1) / h.alignment * h.alignment;
  if (h.data_offset > size) {
    if (tensor_count == 0) {
      h.data_offset = size;  // a file of metadata only may end without padding
    } else {
      return Error(label, "the data section starts past the end of the file (truncated?)");
    }
  }
  MOE_RETURN_IF_ERROR(CheckTensorSpans(relative, size, label, &h));
  return h;
}

std::string GgufFile::FirstSplitPath(const std::string& path) {
  // NAME-0000K-of-0000N.gguf
  constexpr std::string_view kSuffix = "-00000-of-00000.gguf";
  if (path.size() <= kSuffix.size()) return "";
  const size_t at = path.size() - kSuffix.size();
  const std::string_view tail = std::string_view(path).substr(at);
  for (size_t i = 0; i < kSuffix.size(); ++i) {
    const bool digit = kSuffix[i] == '0';
    if (digit ? !(tail[i] >= '0' && tail[i] <= '9') : tail[i] != kSuffix[i]) return "";
  }
  return absl::StrCat(path.substr(0, at), "-00001", std::string(tail.substr(6)));
}

absl::Status GgufFile::AddPart(const std::string& path, GgufHeader* header) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  Part part;
  part.size = static_cast<uint64_t>(st.st_size);
  if (part.size > 0) {
    void* base = mmap(nullptr, part.size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) {
      close(fd);
      return absl::InternalError(absl::StrCat("cannot map ", path, ": ", std::strerror(errno)));
    }
    part.base = static_cast<const uint8_t*>(base);
  }
  close(fd);  // the mapping keeps the file
  parts_.push_back(part);
  MOE_ASSIGN_OR_RETURN(*header, ParseGgufImage(part.base, part.size, path));
  for (GgufTensorInfo& t : header->tensors) t.part = static_cast<uint32_t>(parts_.size() - 1);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  const std::string first = FirstSplitPath(path);
  f->path_ = first.empty() ? path : first;
  MOE_RETURN_IF_ERROR(f->AddPart(f->path_, &f->header_));
  if (!first.empty()) {
    // -0000K-of-0000N: N from the name must be what the first file says.
    const uint64_t named = std::stoull(first.substr(first.size() - 10, 5));
    if (UintKey(f->header_, "split.count") != named || UintKey(f->header_, "split.no") != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(f->path_, ": named as the first of ", named,
                       " split files, but its split.count / split.no say otherwise"));
    }
    for (uint64_t k = 2; k <= named; ++k) {
      std::string part_path = first;
      const std::string number = absl::StrCat(100000 + k).substr(1);
      part_path.replace(first.size() - 19, 5, number);
      GgufHeader part;
      MOE_RETURN_IF_ERROR(f->AddPart(part_path, &part));
      if (UintKey(part, "split.no") != k - 1) {
        return absl::InvalidArgumentError(
            absl::StrCat(part_path, ": split.no is not ", k - 1, " as its name says"));
      }
      for (GgufTensorInfo& t : part.tensors) f->header_.tensors.push_back(std::move(t));
    }
    const std::optional<uint64_t> total = UintKey(f->header_, "split.tensors.count");
    if (f->FindValue("split.tensors.count") != nullptr && total != f->header_.tensors.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(f->path_, ": split.tensors.count is ",
                       total.has_value() ? absl::StrCat(*total) : std::string("not a count"),
                       " but the ", named, " files hold ", f->header_.tensors.size(), " tensors"));
    }
  }
  MOE_RETURN_IF_ERROR(f->IndexTensors());
  return f;
}

absl::Status GgufFile::IndexTensors() {
  for (size_t i = 0; i < header_.tensors.size(); ++i) {
    if (!tensor_index_.emplace(header_.tensors[i].name, i).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": tensor ", header_.tensors[i].name, " appears in two split files"));
    }
  }
  return absl::OkStatus();
}

GgufFile::~GgufFile() {
  for (const Part& p : parts_) {
    if (p.base != nullptr && p.mapped) munmap(const_cast<uint8_t*>(p.base), p.size);
  }
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromImage(const uint8_t* data, size_t size,
                                                              const std::string& label) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = label;
  f->parts_.push_back({data, size, /*mapped=*/false});
  MOE_ASSIGN_OR_RETURN(f->header_, ParseGgufImage(data, size, label));
  MOE_RETURN_IF_ERROR(f->IndexTensors());
  return f;
}

const GgufValue* GgufFile::FindValue(std::string_view key) const {
  auto it = header_.metadata.find(key);
  return it == header_.metadata.end() ? nullptr : &it->second;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &header_.tensors[it->second];
}

absl::StatusOr<const GgufValue*> GgufFile::Expect(std::string_view key) const {
  const GgufValue* v = FindValue(key);
  if (v == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(path_, ": metadata key ", std::string(key), " is missing"));
  }
  return v;
}

namespace {

absl::Status WrongType(const std::string& path, std::string_view key, const GgufValue& v,
                       const char* wanted) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": metadata ", std::string(key), " is ",
                                                 GgufValueTypeName(v.type), ", expected ", wanted));
}

}  // namespace

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  MOE_ASSIGN_OR_RETURN(const GgufValue* v, Expect(key));
  if (v->type != GgufValueType::kString) return WrongType(path_, key, *v, "STRING");
  return v->s;
}

absl::StatusOr<uint64_t> GgufFile::GetUint(std::string_view key) const {
  MOE_ASSIGN_OR_RETURN(const GgufValue* v, Expect(key));
  if (const std::optional<uint64_t> u = AsUint(*v)) return *u;
  return WrongType(path_, key, *v, "a non-negative integer");
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  MOE_ASSIGN_OR_RETURN(const GgufValue* v, Expect(key));
  if (IsSigned(v->type)) return v->i;
  if (IsUnsigned(v->type) && v->u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return static_cast<int64_t>(v->u);
  }
  return WrongType(path_, key, *v, "an integer");
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  MOE_ASSIGN_OR_RETURN(const GgufValue* v, Expect(key));
  if (!IsFloat(v->type)) return WrongType(path_, key, *v, "FLOAT32 or FLOAT64");
  return v->f;
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  MOE_ASSIGN_OR_RETURN(const GgufValue* v, Expect(key));
  if (v->type != GgufValueType::kBool) return WrongType(path_, key, *v, "BOOL");
  return v->b;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  MOE_ASSIGN_OR_RETURN(const GgufValue* v, Expect(key));
  if (v->type != GgufValueType::kArray || v->array_type != GgufValueType::kString) {
    return WrongType(path_, key, *v, "an array of STRING");
  }
  std::vector<std::string> out;
  out.reserve(v->array.size());
  for (const GgufValue& e : v->array) out.push_back(e.s);
  return out;
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(std::string_view key) const {
  MOE_ASSIGN_OR_RETURN(const GgufValue* v, Expect(key));
  if (v->type != GgufValueType::kArray || !IsFloat(v->array_type)) {
    return WrongType(path_, key, *v, "an array of FLOAT32");
  }
  std::vector<double> out;
  out.reserve(v->array.size());
  for (const GgufValue& e : v->array) out.push_back(e.f);
  return out;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  MOE_ASSIGN_OR_RETURN(const GgufValue* v, Expect(key));
  const bool ok = v->type == GgufValueType::kArray &&
                  (IsSigned(v->array_type) ||
                   (IsUnsigned(v->array_type) && v->array_type != GgufValueType::kUint64));
  if (!ok) return WrongType(path_, key, *v, "an array of integers");
  std::vector<int64_t> out;
  out.reserve(v->array.size());
  for (const GgufValue& e : v->array) {
    out.push_back(IsSigned(v->array_type) ? e.i : static_cast<int64_t>(e.u));
  }
  return out;
}

void GgufFile::Prefault(const GgufTensorInfo& t, uint64_t offset, uint64_t size) const {
  if (size == 0 || offset >= t.byte_size) return;
  size = std::min(size, t.byte_size - offset);
  const Part& part = parts_[t.part];
  const uint64_t start = t.file_offset + offset;
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t begin = start / page * page;
  madvise(const_cast<uint8_t*>(part.base + begin), start + size - begin, MADV_WILLNEED);
  volatile uint8_t sink = 0;
  for (uint64_t p = start; p < start + size; p = (p / page + 1) * page) sink = sink + part.base[p];
  (void)sink;
}

}  // namespace moe
