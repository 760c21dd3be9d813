// Reader for Hugging Face safetensors checkpoints: single files and sharded sets
// (model.safetensors.index.json). Headers are parsed and validated up front; tensor bytes are
// mapped read-only on demand, one mapping per requested tensor, so a process that asks for a
// subset of the tensors (a worker's experts, the coordinator's shared weights) maps only those.
//
// Format: u64 little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {...}}
// then the data section; offsets are relative to the data section.
#ifndef MOE_COMMON_SAFETENSORS_H_
#define MOE_COMMON_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/dtype.h"

namespace moe {

// Largest header accepted (the format's own limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int64_t num_elements = 0;
  uint64_t file_offset = 0;  // absolute offset of the first byte in the file
  uint64_t byte_size = 0;    // == num_elements * DTypeSize(dtype)
};

// "[2048, 1024] BF16" — for error messages.
std::string DescribeTensor(const std::vector<int64_t>& shape, DType dtype);

// Parses and validates a header JSON. `data_size` is the size of the data section; `label`
// (the file name) prefixes every error. Checks: well-formed JSON object, each entry has a known
// dtype, a shape of non-negative dims, and data_offsets [begin, end] with
// end - begin == product(shape) * dtype size (overflow-checked); the spans, sorted, start at 0,
// are contiguous, do not overlap and end at `data_size`. Returns tensors sorted by offset.
// Errors are INVALID_ARGUMENT naming the file and the tensor.
absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(std::string_view header_json,
                                                               uint64_t data_size,
                                                               const std::string& label);

// Validates a whole in-memory file image (length prefix, header, data section bounds): the
// checks TensorStore makes when it opens a file (which reads only the prefix and the header),
// on bytes in memory. Used by the fuzz target.
absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsImage(const uint8_t* data, size_t size,
                                                              const std::string& label);

// Bytes of one tensor, valid while the TensorStore that returned it lives.
struct TensorData {
  const TensorInfo* info = nullptr;
  const void* data = nullptr;
};

// A set of safetensors files forming one checkpoint.
// Thread-safety: all methods may be called concurrently.
class TensorStore {
 public:
  // Opens the checkpoint in `dir`: model.safetensors.index.json when present (every shard it
  // names must exist and hold exactly the tensors the index assigns to it), else
  // model.safetensors, else every *.safetensors file in the directory. NOT_FOUND when none exist.
  static absl::StatusOr<std::unique_ptr<TensorStore>> Open(const std::string& dir);
  // Opens exactly these files (absolute or relative paths).
  static absl::StatusOr<std::unique_ptr<TensorStore>> OpenFiles(
      const std::vector<std::string>& paths);
  ~TensorStore();
  TensorStore(const TensorStore&) = delete;
  TensorStore& operator=(const TensorStore&) = delete;

  // nullptr when absent.
  const TensorInfo* Find(std::string_view name) const;
  // Maps the tensor's bytes (once; later calls return the same bytes) and faults them in.
  // NOT_FOUND naming it.
  absl::StatusOr<TensorData> Map(std::string_view name);
  // Unmaps the tensor (after its bytes were converted elsewhere); a later Map maps it again.
  // REQUIRES: nothing still points into it.
  void Release(std::string_view name);
  // Names of every tensor, sorted.
  std::vector<std::string> TensorNames() const;
  // Sum of byte_size over the tensors mapped so far.
  uint64_t mapped_tensor_bytes() const;
  // Number of tensors mapped so far.
  size_t mapped_tensor_count() const;

 private:
  struct File;
  struct Entry;
  struct Mapping;
  TensorStore();
  absl::Status AddFile(const std::string& path, const std::vector<std::string>* expected);

  // Constant after construction.
  std::vector<std::unique_ptr<File>> files_;
  std::map<std::string, Entry, std::less<>> entries_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<Mapping>, std::less<>> mappings_ ABSL_GUARDED_BY(mu_);
  uint64_t mapped_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moe

#endif  // MOE_COMMON_SAFETENSORS_H_
