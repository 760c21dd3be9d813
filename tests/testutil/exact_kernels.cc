// Linked into every test binary (cmake/moe_helpers.cmake): before main, MOE_KERNELS=exact
// unless the environment already says otherwise, so the comparisons with transformers get the
// exact f32 MatMul (kernels.h, MatMulMode) however the binary is started, and the binaries a
// test starts inherit it. Tests of the fast paths select them with SetMatMulMode.
#include <cstdlib>

namespace {

const bool kExactKernels = [] { return setenv("MOE_KERNELS", "exact", /*overwrite=*/0) == 0; }();

}  // namespace
