#include "common/plugin_loader.h"

#include <dlfcn.h>

#include <filesystem>
#include <vector>

namespace moe {

void* LoadPluginSymbol(const char* library, const char* build_path, const char* symbol, int flags,
                       std::string* error) {
  std::vector<std::string> paths;
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const std::filesystem::path dir = exe.parent_path();
    paths.push_back((dir / ".." / "lib" / library).string());
    paths.push_back((dir / library).string());
    paths.push_back((dir / ".." / "lib" / "moe-cluster" / library).string());
  }
  if (build_path != nullptr) paths.push_back(build_path);
  paths.push_back(library);
  std::string tried;
  for (const std::string& path : paths) {
    if (path.find('/') != std::string::npos && !std::filesystem::exists(path)) {
      tried += " " + path;
      continue;
    }
    void* handle = dlopen(path.c_str(), flags);
    if (handle == nullptr) {
      tried += " " + path + " (" + dlerror() + ")";
      continue;
    }
    if (void* found = dlsym(handle, symbol); found != nullptr) return found;
    tried += " " + path + " (no " + symbol + ")";
  }
  *error = "cannot load " + std::string(library) + "; tried:" + tried;
  return nullptr;
}

}  // namespace moe
