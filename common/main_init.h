// Start-up shared by every binary's main(): flag parsing that accepts --max-tokens as well as
// --max_tokens (Abseil flag names are C identifiers, users of vLLM/llama.cpp type dashes), a
// --help that lists the binary's own flags, and glog to stderr.
#ifndef MOE_COMMON_MAIN_INIT_H_
#define MOE_COMMON_MAIN_INIT_H_

#include <string>
#include <vector>

namespace moe {

// Rewrites "--a-b[=v]" to "--a_b[=v]" (the name part only; values and positional arguments
// are untouched; everything after a bare "--" is left alone). `storage` owns the strings the
// returned argv points into.
std::vector<char*> NormalizeFlagNames(int argc, char** argv, std::vector<std::string>* storage);

// Sets the usage message, makes --help list the flags defined in `main_file` (pass __FILE__),
// parses the command line (dashes or underscores), sends glog to stderr. Returns the positional
// arguments after the program name.
std::vector<std::string> InitMain(int argc, char** argv, const char* main_file,
                                  const std::string& usage);

}  // namespace moe

#endif  // MOE_COMMON_MAIN_INIT_H_
