#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using Json = nlohmann::json;

absl::Status HeaderError(const std::string& label, const std::string& tensor,
                         const std::string& what) {
  if (tensor.empty()) return absl::InvalidArgumentError(absl::StrCat(label, ": ", what));
  return absl::InvalidArgumentError(absl::StrCat(label, ": tensor ", tensor, ": ", what));
}

absl::StatusOr<uint64_t> ReadU64(const Json& j, const std::string& label, const std::string& tensor,
                                 const char* what) {
  if (!j.is_number_unsigned() && !(j.is_number_integer() && j.get<int64_t>() >= 0)) {
    return HeaderError(label, tensor, absl::StrCat(what, " must be a non-negative integer"));
  }
  return j.get<uint64_t>();
}

absl::StatusOr<TensorInfo> ParseEntry(const std::string& name, const Json& entry,
                                      const std::string& label) {
  if (!entry.is_object()) return HeaderError(label, name, "entry is not a JSON object");
  auto dtype_it = entry.find("dtype");
  auto shape_it = entry.find("shape");
  auto offsets_it = entry.find("data_offsets");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return HeaderError(label, name, "missing string field \"dtype\"");
  }
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return HeaderError(label, name, "missing array field \"shape\"");
  }
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
    return HeaderError(label, name, "\"data_offsets\" must be [begin, end]");
  }
  TensorInfo info;
  info.name = name;
  auto dtype = ParseDType(dtype_it->get<std::string>());
  if (!dtype.ok()) return HeaderError(label, name, std::string(dtype.status().message()));
  info.dtype = *dtype;
  if (shape_it->size() > 8) return HeaderError(label, name, "more than 8 dimensions");
  uint64_t elements = 1;
  for (const Json& dim : *shape_it) {
    MOE_ASSIGN_OR_RETURN(uint64_t d, ReadU64(dim, label, name, "shape dimension"));
    if (d > (1ull << 62) || __builtin_mul_overflow(elements, d, &elements)) {
      return HeaderError(label, name, "shape overflows");
    }
    info.shape.push_back(static_cast<int64_t>(d));
  }
  uint64_t bytes;
  if (elements > (1ull << 62) || __builtin_mul_overflow(elements, DTypeSize(info.dtype), &bytes)) {
    return HeaderError(label, name, "shape overflows");
  }
  MOE_ASSIGN_OR_RETURN(uint64_t begin, ReadU64((*offsets_it)[0], label, name, "data_offsets"));
  MOE_ASSIGN_OR_RETURN(uint64_t end, ReadU64((*offsets_it)[1], label, name, "data_offsets"));
  if (end < begin) return HeaderError(label, name, "data_offsets end < begin");
  if (end - begin != bytes) {
    return HeaderError(label, name,
                       absl::StrCat("shape ", DescribeTensor(info.shape, info.dtype), " needs ",
                                    bytes, " bytes but data_offsets span ", end - begin));
  }
  info.num_elements = static_cast<int64_t>(elements);
  info.file_offset = begin;  // relative for now; made absolute by the caller
  info.byte_size = bytes;
  return info;
}

// Validates the u64 length prefix of a file of `size` bytes; returns the header length.
absl::StatusOr<uint64_t> HeaderLength(const uint8_t prefix[8], uint64_t size,
                                      const std::string& label) {
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | prefix[i];
  if (header_len > kMaxSafetensorsHeaderBytes) {
    return HeaderError(label, "",
                       absl::StrCat("header length ", header_len, " exceeds the 100 MB limit"));
  }
  if (header_len > size - 8) {
    return HeaderError(
        label, "",
        absl::StrCat("header length ", header_len, " runs past the end of the file (", size,
                     " bytes): truncated file?"));
  }
  return header_len;
}

}  // namespace

std::string DescribeTensor(const std::vector<int64_t>& shape, DType dtype) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "] ", std::string(DTypeName(dtype)));
}

absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(std::string_view header_json,
                                                               uint64_t data_size,
                                                               const std::string& label) {
  Json header = Json::parse(header_json.begin(), header_json.end(), nullptr,
                            /*allow_exceptions=*/false);
  if (header.is_discarded()) return HeaderError(label, "", "header is not valid JSON");
  if (!header.is_object()) return HeaderError(label, "", "header is not a JSON object");
  std::vector<TensorInfo> tensors;
  tensors.reserve(header.size());
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) return HeaderError(label, "", "__metadata__ is not an object");
      continue;
    }
    MOE_ASSIGN_OR_RETURN(TensorInfo info, ParseEntry(it.key(), it.value(), label));
    tensors.push_back(std::move(info));
  }
  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.file_offset != b.file_offset ? a.file_offset < b.file_offset : a.name < b.name;
  });
  uint64_t expected_begin = 0;
  for (const TensorInfo& t : tensors) {
    if (t.file_offset < expected_begin) {
      return HeaderError(label, t.name, "data_offsets overlap the previous tensor");
    }
    if (t.file_offset > expected_begin) {
      return HeaderError(label, t.name,
                         absl::StrCat("gap before data_offsets begin ", t.file_offset,
                                      " (previous tensor ends at ", expected_begin, ")"));
    }
    expected_begin = t.file_offset + t.byte_size;
  }
  if (expected_begin != data_size) {
    return HeaderError(
        label, "",
        absl::StrCat("tensors cover ", expected_begin, " bytes but the data section has ",
                     data_size, " (truncated or trailing bytes)"));
  }
  return tensors;
}

absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsImage(const uint8_t* data, size_t size,
                                                              const std::string& label) {
  if (size < 8) {
    return HeaderError(label, "", absl::StrCat("file is ", size, " bytes, too short for a header"));
  }
  MOE_ASSIGN_OR_RETURN(uint64_t header_len, HeaderLength(data, size, label));
  std::string_view json(reinterpret_cast<const char*>(data + 8), header_len);
  MOE_ASSIGN_OR_RETURN(std::vector<TensorInfo> tensors,
                       ParseSafetensorsHeader(json, size - 8 - header_len, label));
  for (TensorInfo& t : tensors) t.file_offset += 8 + header_len;
  return tensors;
}

struct TensorStore::File {
  std::string path;
  int fd = -1;
  ~File() {
    if (fd >= 0) close(fd);
  }
};

struct TensorStore::Entry {
  TensorInfo info;
  const File* file = nullptr;
};

struct TensorStore::Mapping {
  void* base = nullptr;
  size_t length = 0;
  const void* data = nullptr;
  ~Mapping() {
    if (base != nullptr) munmap(base, length);
  }
};

TensorStore::TensorStore() = default;
TensorStore::~TensorStore() = default;

absl::Status TensorStore::AddFile(const std::string& path,
                                  const std::vector<std::string>* expected) {
  auto file = std::make_unique<File>();
  file->path = path;
  file->fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file->fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(file->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  // Read the length prefix and the header only; the data section stays on disk.
  uint8_t prefix[8] = {};
  if (size < 8 || pread(file->fd, prefix, 8, 0) != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": file is ", size, " bytes, too short for a header"));
  }
  MOE_ASSIGN_OR_RETURN(uint64_t header_len, HeaderLength(prefix, size, path));
  std::string json(header_len, '\0');
  if (header_len > 0 &&
      pread(file->fd, json.data(), header_len, 8) != static_cast<ssize_t>(header_len)) {
    return absl::DataLossError(absl::StrCat(path, ": short read of the header"));
  }
  MOE_ASSIGN_OR_RETURN(std::vector<TensorInfo> tensors,
                       ParseSafetensorsHeader(json, size - 8 - header_len, path));
  if (expected != nullptr) {
    std::vector<std::string> names;
    for (const TensorInfo& t : tensors) names.push_back(t.name);
    std::sort(names.begin(), names.end());
    for (const std::string& want : *expected) {
      if (!std::binary_search(names.begin(), names.end(), want)) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": tensor ", want, " is assigned to this shard by the index but is not in it"));
      }
    }
  }
  for (TensorInfo& t : tensors) {
    t.file_offset += 8 + header_len;
    std::string name = t.name;
    auto [it, inserted] = entries_.try_emplace(name, Entry{std::move(t), file.get()});
    if (!inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name, " appears in both ", it->second.file->path, " and ", path));
    }
  }
  files_.push_back(std::move(file));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::OpenFiles(
    const std::vector<std::string>& paths) {
  std::unique_ptr<TensorStore> store(new TensorStore());
  for (const std::string& p : paths) MOE_RETURN_IF_ERROR(store->AddFile(p, nullptr));
  return store;
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory ", dir, " does not exist"));
  }
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(index_path, ec)) {
    std::ifstream in(index_path);
    Json index = Json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": not valid JSON with a \"weight_map\" object"));
    }
    std::map<std::string, std::vector<std::string>> shards;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map[\"",
                                                       it.key(), "\"] is not a file name"));
      }
      std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": shard name \"",
                                                       shard, "\" must be a plain file name"));
      }
      shards[shard].push_back(it.key());
    }
    if (shards.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": empty weight_map"));
    }
    std::unique_ptr<TensorStore> store(new TensorStore());
    for (auto& [shard, names] : shards) {
      std::sort(names.begin(), names.end());
      MOE_RETURN_IF_ERROR(store->AddFile((fs::path(dir) / shard).string(), &names));
    }
    return store;
  }
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(single, ec)) return OpenFiles({single.string()});
  std::vector<std::string> paths;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".safetensors") paths.push_back(e.path().string());
  }
  if (paths.empty()) {
    return absl::NotFoundError(
        absl::StrCat("no model.safetensors, model.safetensors.index.json "
                     "or *.safetensors file in ",
                     dir));
  }
  std::sort(paths.begin(), paths.end());
  return OpenFiles(paths);
}

const TensorInfo* TensorStore::Find(std::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second.info;
}

absl::StatusOr<TensorData> TensorStore::Map(std::string_view name) {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor ", std::string(name), " not found in the checkpoint"));
  }
  const Entry& entry = it->second;
  absl::MutexLock lock(&mu_);
  auto m = mappings_.find(name);
  if (m != mappings_.end()) return TensorData{&entry.info, m->second->data};
  auto mapping = std::make_unique<Mapping>();
  static const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t begin = entry.info.file_offset / page * page;
  const uint64_t end = entry.info.file_offset + entry.info.byte_size;
  if (entry.info.byte_size == 0) {
    static const uint64_t kEmpty = 0;
    mapping->data = &kEmpty;
  } else {
    mapping->length = end - begin;
    // MAP_POPULATE faults the pages in now (reading them if they are not cached), so the load
    // pays for it instead of the first requests.
    mapping->base = mmap(nullptr, mapping->length, PROT_READ, MAP_SHARED | MAP_POPULATE,
                         entry.file->fd, static_cast<off_t>(begin));
    if (mapping->base == MAP_FAILED) {
      mapping->base = nullptr;
      return absl::InternalError(absl::StrCat(entry.file->path, ": mmap of tensor ",
                                              std::string(name),
                                              " failed: ", std::strerror(errno)));
    }
    mapping->data = static_cast<const uint8_t*>(mapping->base) + (entry.info.file_offset - begin);
  }
  const void* data = mapping->data;
  mapped_bytes_ += entry.info.byte_size;
  mappings_.emplace(std::string(name), std::move(mapping));
  return TensorData{&entry.info, data};
}

void TensorStore::Release(std::string_view name) {
  absl::MutexLock lock(&mu_);
  auto m = mappings_.find(name);
  if (m == mappings_.end()) return;
  mapped_bytes_ -= entries_.find(name)->second.info.byte_size;
  mappings_.erase(m);
}

std::vector<std::string> TensorStore::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) names.push_back(name);
  return names;
}

uint64_t TensorStore::mapped_tensor_bytes() const {
  absl::MutexLock lock(&mu_);
  return mapped_bytes_;
}

size_t TensorStore::mapped_tensor_count() const {
  absl::MutexLock lock(&mu_);
  return mappings_.size();
}

}  // namespace moe
