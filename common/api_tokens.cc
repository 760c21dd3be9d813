#include "common/api_tokens.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace moe {

namespace {

bool ConstantTimeEqual(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

absl::StatusOr<ApiTokens> ApiTokens::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in.is_open()) return absl::NotFoundError(absl::StrCat("cannot open token file ", path));
  ApiTokens tokens;
  int line_number = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_number;
    const std::string token(absl::StripAsciiWhitespace(line));
    if (token.empty() || token[0] == '#') continue;
    if (token.size() < kMinLength ||
        std::any_of(token.begin(), token.end(), [](char c) { return absl::ascii_isspace(c); })) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_number, ": a token must be at least ", kMinLength,
                       " characters without whitespace (e.g. `openssl rand -hex 32`)"));
    }
    tokens.tokens_.push_back(token);
  }
  if (tokens.tokens_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " holds no token"));
  }
  return tokens;
}

absl::StatusOr<std::string> ApiTokens::LoadFirst(const std::string& path) {
  absl::StatusOr<ApiTokens> tokens = Load(path);
  if (!tokens.ok()) return tokens.status();
  return tokens->tokens_.front();
}

bool ApiTokens::Accepts(std::string_view authorization) const {
  constexpr std::string_view kScheme = "bearer ";
  if (authorization.size() <= kScheme.size()) return false;
  for (size_t i = 0; i < kScheme.size(); ++i) {
    if (absl::ascii_tolower(authorization[i]) != kScheme[i]) return false;
  }
  std::string_view token = authorization.substr(kScheme.size());
  while (!token.empty() && token.front() == ' ') token.remove_prefix(1);
  bool accepted = false;
  for (const std::string& t : tokens_) accepted |= ConstantTimeEqual(token, t);
  return accepted;
}

}  // namespace moe
