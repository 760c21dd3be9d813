// Loads libmoe_spm.so (see sentencepiece_model.h for why SentencePiece lives in its own shared
// library loaded with RTLD_DEEPBIND).
#include <dlfcn.h>

#include <string>

#include "common/plugin_loader.h"
#include "common/sentencepiece_model.h"

namespace moe {
namespace {

constexpr char kLibraryName[] = "libmoe_spm.so";

struct Shim {
  SentencePieceFactory factory = nullptr;
  std::string error;
};

Shim* LoadShim() {
  auto* shim = new Shim();
#ifdef MOE_SPM_BUILD_PATH
  const char* build_path = MOE_SPM_BUILD_PATH;
#else
  const char* build_path = nullptr;
#endif
  shim->factory = reinterpret_cast<SentencePieceFactory>(
      LoadPluginSymbol(kLibraryName, build_path, kSentencePieceFactorySymbol,
                       RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND, &shim->error));
  if (shim->factory == nullptr) {
    shim->error = "cannot load the SentencePiece library: " + shim->error;
  }
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
