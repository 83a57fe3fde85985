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

// Joins the values of every occurrence of the repeatable flags `names`
// (written with underscores) into one comma-separated occurrence, because an
// Abseil vector flag keeps only its last occurrence:
// `--adapter a=x --adapter b=y` becomes `--adapter=a=x,b=y`.
inline std::vector<std::string> MergeRepeatedFlags(std::vector<std::string> args,
                                                   const std::vector<std::string>& names) {
  for (const std::string& name : names) {
    const std::string flag = "--" + name;
    std::vector<std::string> values;
    std::vector<std::string> kept;
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i] == flag && i + 1 < args.size()) {
        values.push_back(args[++i]);
      } else if (args[i].compare(0, flag.size() + 1, flag + "=") == 0) {
        values.push_back(args[i].substr(flag.size() + 1));
      } else {
        kept.push_back(args[i]);
      }
    }
    if (values.empty()) continue;
    std::string joined;
    for (const std::string& v : values) joined += (joined.empty() ? "" : ",") + v;
    kept.push_back(flag + "=" + joined);
    args = std::move(kept);
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
