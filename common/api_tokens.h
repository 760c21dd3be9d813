// Bearer tokens for the public APIs (--api-token-file): a client must send
// "Authorization: Bearer <token>" (HTTP) or the `authorization` metadata "Bearer <token>" (gRPC)
// with one of the file's tokens.
#ifndef MOE_COMMON_API_TOKENS_H_
#define MOE_COMMON_API_TOKENS_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace moe {

class ApiTokens {
 public:
  // One token per line; blank lines and lines starting with '#' are skipped, surrounding
  // whitespace is trimmed. NOT_FOUND naming the file when unreadable, INVALID_ARGUMENT when it
  // holds no token or a token shorter than 16 characters or with whitespace inside.
  static absl::StatusOr<ApiTokens> Load(const std::string& path);
  // The first token of a file (for clients: moe-cli --api-token-file).
  static absl::StatusOr<std::string> LoadFirst(const std::string& path);

  // Whether `authorization` ("Bearer <token>", scheme case-insensitive) carries one of the
  // tokens. Compares in time independent of where the token differs.
  bool Accepts(std::string_view authorization) const;

  static constexpr size_t kMinLength = 16;

 private:
  std::vector<std::string> tokens_;
};

}  // namespace moe

#endif  // MOE_COMMON_API_TOKENS_H_
