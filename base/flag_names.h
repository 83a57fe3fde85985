// Lets users write flags the way vLLM and most servers spell them
// (`--max-tokens 8`) although Abseil flags are declared with underscores
// (`--max_tokens`): dashes in the name part of each `--flag[=value]`
// argument become underscores before absl::ParseCommandLine sees them.
// Values (after '=' or in the next argument) are left alone.
//
// Example:
//   std::vector<std::string> args = DashesToUnderscores(argc, argv);
//   std::vector<char*> argv2 = ArgvOf(args);
//   absl::ParseCommandLine(argv2.size(), argv2.data());
#ifndef LORASERVE_BASE_FLAG_NAMES_H_
#define LORASERVE_BASE_FLAG_NAMES_H_

#include <string>
#include <vector>

namespace loraserve {

inline std::vector<std::string> DashesToUnderscores(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  bool after_double_dash = false;
  for (size_t i = 1; i < args.size(); ++i) {
    std::string& arg = args[i];
    if (arg == "--") after_double_dash = true;
    if (after_double_dash || arg.size() < 3 || arg.compare(0, 2, "--") != 0) continue;
    const size_t name_end = std::min(arg.find('='), arg.size());
    for (size_t j = 2; j < name_end; ++j) {
      if (arg[j] == '-') arg[j] = '_';
    }
  }
  return args;
}

// char* views of `args` (which must outlive them), as ParseCommandLine wants.
inline std::vector<char*> ArgvOf(std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  return argv;
}

}  // namespace loraserve

#endif  // LORASERVE_BASE_FLAG_NAMES_H_
