// Lets every binary accept both --max-tokens and --max_tokens: Abseil flag names are C
// identifiers, while users of vLLM/llama.cpp type dashes.
#ifndef MOE_COMMON_FLAG_NAMES_H_
#define MOE_COMMON_FLAG_NAMES_H_

#include <string>
#include <vector>

namespace moe {

// Rewrites "--a-b[=v]" to "--a_b[=v]" (the name part only; values and positional arguments
// are untouched; everything after a bare "--" is left alone). `storage` owns the strings the
// returned argv points into.
std::vector<char*> NormalizeFlagNames(int argc, char** argv, std::vector<std::string>* storage);

}  // namespace moe

#endif  // MOE_COMMON_FLAG_NAMES_H_
