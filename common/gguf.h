// Reader for GGUF files (ggml's model format, versions 2 and 3: llama.cpp's docs/gguf.md).
// The file is untrusted input, checked whole before anything is used:
//   magic "GGUF", version 2 or 3; tensor and metadata counts bounded by the bytes left;
//   every string length and array count overflow-checked against the end of the file;
//   metadata value types known, arrays nested at most kMaxGgufArrayDepth deep, keys unique;
//   general.alignment (if present) a UINT32 power of two;
//   per tensor: a unique name, 1..4 dimensions each >= 1, a ggml type known to this reader,
//   dims[0] a multiple of the type's block, an aligned offset, and bytes = rows x row bytes
//   inside the file and not overlapping any other tensor.
// Errors are INVALID_ARGUMENT naming the file and, where there is one, the key or tensor.
//
// Layout: header (magic, version, tensor count, metadata count), metadata (key, type, value)*,
// tensor infos (name, n_dims, dims (ggml order: dims[0] is the contiguous row length), type,
// offset relative to the data section)*, padding to the alignment, then the data section.
#ifndef MOE_COMMON_GGUF_H_
#define MOE_COMMON_GGUF_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace moe {

inline constexpr int kMaxGgufArrayDepth = 3;
// Array elements in all of a file's metadata together: each costs ~100 bytes parsed (a
// GgufValue), so this bounds the memory a small hostile file can make the reader take
// (~400 MB); the largest real vocabularies (256k tokens, scores, types and merges) are ~1M.
inline constexpr uint64_t kMaxGgufArrayElements = uint64_t{1} << 22;
inline constexpr uint32_t kGgufDefaultAlignment = 32;

// The block layout of a ggml type: `block_elements` values stored in `block_bytes` bytes.
struct GgmlTypeInfo {
  const char* name = "";  // "Q4_K"
  int64_t block_elements = 0;
  int64_t block_bytes = 0;
};

// Every type ggml defines (also those moe-cluster cannot compute with, so that files holding
// them still parse); nullptr for an id it does not.
const GgmlTypeInfo* FindGgmlType(uint32_t id);

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
const char* GgufValueTypeName(GgufValueType type);  // "UINT32", ...

// A metadata value. Integers are widened (unsigned types into `u`, signed into `i`), floats
// into `f`; arrays hold their elements (all of `array_type`).
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0;
  bool b = false;
  std::string s;
  GgufValueType array_type = GgufValueType::kUint8;
  std::vector<GgufValue> array;
};

struct GgufTensorInfo {
  std::string name;
  uint32_t type_id = 0;
  const GgmlTypeInfo* type = nullptr;
  std::vector<int64_t> dims;  // ggml order: dims[0] = elements per row (contiguous)
  uint64_t file_offset = 0;   // absolute offset of the first byte in its file
  uint64_t byte_size = 0;
  uint32_t part = 0;  // which file of a split set holds it (GgufFile)

  int64_t row_elements() const { return dims[0]; }
  int64_t rows() const;  // product of dims[1..]
  uint64_t row_bytes() const;
};

// The parsed header of a GGUF file: what ParseGgufImage returns and GgufFile holds.
struct GgufHeader {
  uint32_t version = 0;
  uint32_t alignment = kGgufDefaultAlignment;
  uint64_t data_offset = 0;  // absolute offset of the data section
  std::map<std::string, GgufValue, std::less<>> metadata;
  std::vector<GgufTensorInfo> tensors;  // in file order
};

// Parses and validates a whole GGUF image in memory (the checks above). `label` (the file name)
// prefixes every error. Used by GgufFile::Open and the fuzz target.
absl::StatusOr<GgufHeader> ParseGgufImage(const uint8_t* data, size_t size,
                                          const std::string& label);

// A GGUF model mapped read-only: one file, or a split set NAME-0000K-of-0000N.gguf (llama.cpp's
// gguf-split / --split-max-tensors: the first file holds the metadata, every file
// split.no/split.count and its share of the tensors). The mappings are lazy (pages are read
// when touched), so a process that reads a slice of a tensor (a worker's experts) has only that
// slice resident. Thread-safety: immutable after Open; all methods may be called concurrently.
class GgufFile {
 public:
  // `path`: a .gguf file, or any file of a split set (all N are opened). NOT_FOUND when a file
  // cannot be opened (naming it); INVALID_ARGUMENT for a malformed file or an inconsistent set
  // (split.count or split.no not matching the names, a tensor in two files, a tensor count that
  // differs from split.tensors.count).
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // A model over an image in memory (not owned; it must outlive the result): what Open does
  // after mapping a single file. For the fuzz target and tests.
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromImage(const uint8_t* data, size_t size,
                                                             const std::string& label);
  // The first file of the split set `path` belongs to, or "" when `path` is not named like one.
  static std::string FirstSplitPath(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }  // the (first) file
  // Of the first file; header().tensors lists the tensors of every file of a split set.
  const GgufHeader& header() const { return header_; }
  size_t parts() const { return parts_.size(); }

  // nullptr when absent.
  const GgufValue* FindValue(std::string_view key) const;
  const GgufTensorInfo* FindTensor(std::string_view name) const;

  // Typed metadata reads: NOT_FOUND naming the key when it is absent, INVALID_ARGUMENT naming
  // the key and both types when the stored type does not fit (an integer of any width fits
  // GetUint when non-negative and GetInt when it fits int64; FLOAT32 and FLOAT64 fit GetFloat).
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<uint64_t> GetUint(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;

  // The tensor's bytes from `offset` on. REQUIRES: offset <= t.byte_size.
  const uint8_t* Data(const GgufTensorInfo& t, uint64_t offset = 0) const {
    return parts_[t.part].base + t.file_offset + offset;
  }
  // Reads the pages of the tensor's bytes [offset, offset + size) now, so the first forward pass
  // does not pay the page faults. Only those pages become resident.
  void Prefault(const GgufTensorInfo& t, uint64_t offset, uint64_t size) const;

 private:
  struct Part {
    const uint8_t* base = nullptr;
    uint64_t size = 0;
    bool mapped = true;  // munmap at destruction (false for FromImage)
  };
  GgufFile() = default;
  absl::Status AddPart(const std::string& path, GgufHeader* header);
  // NOT_FOUND naming the key when it is absent.
  absl::StatusOr<const GgufValue*> Expect(std::string_view key) const;
  // Fills tensor_index_; INVALID_ARGUMENT when a name appears twice (across split files).
  absl::Status IndexTensors();

  std::string path_;
  std::vector<Part> parts_;
  GgufHeader header_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace moe

#endif  // MOE_COMMON_GGUF_H_
