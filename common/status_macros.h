// Status propagation macros. Abseil 20220623 ships none, so the project defines its own with a
// MOE_ prefix.
#ifndef MOE_COMMON_STATUS_MACROS_H_
#define MOE_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MOE_STATUS_CONCAT_INNER_(a, b) a##b
#define MOE_STATUS_CONCAT_(a, b) MOE_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define MOE_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::absl::Status moe_status_ = (expr);       \
    if (!moe_status_.ok()) return moe_status_; \
  } while (0)

// `lhs = value` of the absl::StatusOr `rexpr`, or returns its error. `lhs` may declare a
// variable: MOE_ASSIGN_OR_RETURN(auto store, TensorStore::Open(dir));
#define MOE_ASSIGN_OR_RETURN(lhs, rexpr) \
  MOE_ASSIGN_OR_RETURN_IMPL_(MOE_STATUS_CONCAT_(moe_statusor_, __LINE__), lhs, rexpr)

#define MOE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr)   \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // MOE_COMMON_STATUS_MACROS_H_
