#include "common/checkpoint.h"

#include <filesystem>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/chat_template.h"
#include "common/fingerprint.h"
#include "common/gguf_model.h"
#include "common/status_macros.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

// The GGUF file to load for `path`, or "" when `path` is a safetensors directory.
absl::StatusOr<std::string> GgufPath(const std::string& path) {
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    if (absl::EndsWith(path, ".gguf")) return path;
    return absl::InvalidArgumentError(absl::StrCat(
        path, " is a file but not a .gguf file; pass a GGUF file or a checkpoint directory"));
  }
  if (!fs::is_directory(path, ec)) {
    return absl::NotFoundError(absl::StrCat(
        "model ", path,
        " does not exist (expected a checkpoint directory with config.json, or a .gguf file)"));
  }
  if (fs::exists(fs::path(path) / "config.json", ec)) return std::string();
  std::vector<std::string> ggufs;
  for (const auto& e : fs::directory_iterator(path, ec)) {
    if (e.is_regular_file() && e.path().extension() == ".gguf") {
      ggufs.push_back(e.path().string());
    }
  }
  std::sort(ggufs.begin(), ggufs.end());
  if (ggufs.empty()) return std::string();  // reported by LoadModelConfig: config.json missing
  if (ggufs.size() == 1) return ggufs[0];
  // Every file one shard of the same split set: open it from its first file.
  const std::string first = GgufFile::FirstSplitPath(ggufs.front());
  if (!first.empty() && std::all_of(ggufs.begin(), ggufs.end(), [&](const std::string& g) {
        return GgufFile::FirstSplitPath(g) == first;
      })) {
    return first;
  }
  return absl::InvalidArgumentError(absl::StrCat(path, " holds several GGUF files (",
                                                 absl::StrJoin(ggufs, ", "),
                                                 "); pass --model with the one to load"));
}

}  // namespace

absl::StatusOr<std::shared_ptr<Checkpoint>> Checkpoint::Open(const std::string& path) {
  std::shared_ptr<Checkpoint> c(new Checkpoint());
  c->path_ = path;
  MOE_ASSIGN_OR_RETURN(std::string gguf_path, GgufPath(path));
  if (!gguf_path.empty()) {
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(gguf_path));
    c->path_ = gguf_path;
    c->gguf_ = std::move(file);
    MOE_ASSIGN_OR_RETURN(c->config_, ModelConfigFromGguf(*c->gguf_));
    c->fingerprint_ = GgufFingerprint(c->config_, *c->gguf_);
    return c;
  }
  MOE_ASSIGN_OR_RETURN(c->config_, LoadModelConfig(path));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::Open(path));
  c->store_ = std::move(store);
  c->fingerprint_ = ModelFingerprint(c->config_, *c->store_);
  return c;
}

absl::StatusOr<std::unique_ptr<ModelWeights>> Checkpoint::LoadWeights(
    const WeightsOptions& options) const {
  if (gguf_ != nullptr) return ModelWeights::LoadGguf(gguf_, config_, options);
  return ModelWeights::Load(store_, config_, options);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Checkpoint::LoadTokenizer() const {
  if (gguf_ != nullptr) return Tokenizer::FromGguf(*gguf_);
  return Tokenizer::Load(path_);
}

absl::StatusOr<std::string> Checkpoint::ChatTemplateSource() const {
  if (gguf_ == nullptr) return ChatTemplate::FindSource(path_);
  absl::StatusOr<std::string> source = gguf_->GetString("tokenizer.chat_template");
  if (absl::IsNotFound(source.status())) {
    return absl::NotFoundError(absl::StrCat(
        path_,
        " has no chat template (no tokenizer.chat_template); give one with --chat-template"));
  }
  return source;
}

}  // namespace moe
