// Reads the reference goldens of tests/golden/data (made by
// tests/golden/generate.py from transformers + peft) for C++ tests.
//
// Example:
//   ASSERT_OK_AND_ASSIGN(std::vector<GoldenCase> cases, LoadModelCases());
//   for (const GoldenCase& c : cases) { ... c.prompts[0].logits ... }
#ifndef LORASERVE_TESTS_SUPPORT_GOLDEN_CASES_H_
#define LORASERVE_TESTS_SUPPORT_GOLDEN_CASES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace loraserve::test_support {

struct GoldenPrompt {
  std::string text;               // empty for id-only prompts
  std::vector<int32_t> ids;       // [len], BOS included when the model adds it
  std::vector<float> logits;      // [len, vocab]
  std::vector<int32_t> greedy;    // 64 greedy tokens, EOS not stopping
};

// One adapter of a composition case.
struct GoldenPart {
  std::string adapter;      // the adapter case's name
  std::string adapter_dir;  // absolute
  float weight = 1.0f;
};

struct GoldenCase {
  std::string name;
  std::string model_dir;    // absolute
  std::string adapter_dir;  // absolute; empty for model and composition cases
  std::string base;         // adapter and composition cases: name of the base model case
  std::vector<GoldenPart> parts;  // composition cases: peft's cat of these
  std::vector<GoldenPrompt> prompts;
};

// Paths in the manifest are relative to the repository root.
std::string RepoPath(const std::string& relative);

absl::StatusOr<std::vector<GoldenCase>> LoadModelCases();
absl::StatusOr<std::vector<GoldenCase>> LoadAdapterCases();
absl::StatusOr<std::vector<GoldenCase>> LoadCompositionCases();

}  // namespace loraserve::test_support

#endif  // LORASERVE_TESTS_SUPPORT_GOLDEN_CASES_H_
