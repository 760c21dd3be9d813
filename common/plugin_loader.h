// Shared libraries that moe-cluster loads at run time with dlopen instead of linking: SentencePiece
// (libmoe_spm.so, whose embedded protobuf clashes with gRPC's) and the CUDA backend
// (libmoe_cuda.so: cuBLAS linked into a binary takes so much static TLS that civetweb's small
// thread stacks no longer fit, and CPU-only runs need none of it).
#ifndef MOE_COMMON_PLUGIN_LOADER_H_
#define MOE_COMMON_PLUGIN_LOADER_H_

#include <string>

namespace moe {

// Opens `library` (next to the binary: ../lib/, the binary's own directory, ../lib/moe-cluster/;
// then `build_path` when not null; then the system search path) with dlopen(`flags`) and
// returns its `symbol`, or null with *error naming every path tried and why it failed. The
// library is never unloaded.
void* LoadPluginSymbol(const char* library, const char* build_path, const char* symbol, int flags,
                       std::string* error);

}  // namespace moe

#endif  // MOE_COMMON_PLUGIN_LOADER_H_
