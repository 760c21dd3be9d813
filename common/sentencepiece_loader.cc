// Loads libmoe_spm.so (see sentencepiece_model.h for why SentencePiece lives in its own shared
// library loaded with RTLD_DEEPBIND).
#include <dlfcn.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/sentencepiece_model.h"

namespace moe {
namespace {

constexpr char kLibraryName[] = "libmoe_spm.so";

struct Shim {
  SentencePieceFactory factory = nullptr;
  std::string error;
};

// Next to the binary (build/bin -> build/lib, or an install's lib/), then the build tree,
// then the system search path.
std::vector<std::string> Candidates() {
  std::vector<std::string> paths;
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const std::filesystem::path dir = exe.parent_path();
    paths.push_back((dir / ".." / "lib" / kLibraryName).string());
    paths.push_back((dir / kLibraryName).string());
    paths.push_back((dir / ".." / "lib" / "moe-cluster" / kLibraryName).string());
  }
#ifdef MOE_SPM_BUILD_PATH
  paths.push_back(MOE_SPM_BUILD_PATH);
#endif
  paths.push_back(kLibraryName);
  return paths;
}

Shim* LoadShim() {
  auto* shim = new Shim();
  std::string tried;
  for (const std::string& path : Candidates()) {
    if (path.find('/') != std::string::npos && !std::filesystem::exists(path)) {
      tried += " " + path;
      continue;
    }
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (handle == nullptr) {
      tried += " " + path + " (" + dlerror() + ")";
      continue;
    }
    shim->factory =
        reinterpret_cast<SentencePieceFactory>(dlsym(handle, kSentencePieceFactorySymbol));
    if (shim->factory != nullptr) return shim;
    tried += " " + path + " (no " + kSentencePieceFactorySymbol + ")";
  }
  shim->error =
      "cannot load the SentencePiece library " + std::string(kLibraryName) + "; tried:" + tried;
  return shim;
}

}  // namespace

std::unique_ptr<SentencePieceModel> SentencePieceModel::FromSerialized(
    const std::string& serialized, std::string* error) {
  static Shim* const shim = LoadShim();  // never unloaded
  if (shim->factory == nullptr) {
    *error = shim->error;
    return nullptr;
  }
  return std::unique_ptr<SentencePieceModel>(shim->factory(serialized, error));
}

}  // namespace moe
