#include "tests/support/golden_cases.h"

#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "formats/safetensors.h"
#include "nlohmann/json.hpp"

namespace loraserve::test_support {
namespace {

absl::StatusOr<nlohmann::json> ReadManifest() {
  const std::string path = RepoPath("tests/golden/data/manifest.json");
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json manifest = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded()) return absl::DataLossError(absl::StrCat(path, ": invalid JSON"));
  return manifest;
}

absl::StatusOr<GoldenCase> ReadCase(const nlohmann::json& entry) {
  GoldenCase c;
  c.name = entry.value("name", "");
  if (entry.contains("model_dir")) c.model_dir = RepoPath(entry["model_dir"]);
  if (entry.contains("adapter_dir")) c.adapter_dir = RepoPath(entry["adapter_dir"]);
  c.base = entry.value("base", "");
  for (const nlohmann::json& part : entry.value("parts", nlohmann::json::array())) {
    c.parts.push_back({part.value("adapter", ""), RepoPath(part.value("adapter_dir", "")),
                       part.value("weight", 1.0f)});
  }
  ASSIGN_OR_RETURN(auto golden, formats::SafetensorsFile::Open(RepoPath(entry["golden"])));
  const int num_prompts = entry.value("num_prompts", 0);
  for (int i = 0; i < num_prompts; ++i) {
    GoldenPrompt p;
    auto text = golden->metadata().find(absl::StrCat("prompt_text.", i));
    if (text != golden->metadata().end()) p.text = text->second;
    ASSIGN_OR_RETURN(p.ids, golden->ReadInt32(absl::StrCat("prompt.", i)));
    ASSIGN_OR_RETURN(p.greedy, golden->ReadInt32(absl::StrCat("greedy.", i)));
    ASSIGN_OR_RETURN(const formats::TensorInfo* logits, golden->Get(absl::StrCat("logits.", i)));
    p.logits.resize(logits->NumElements());
    std::memcpy(p.logits.data(), logits->data, logits->bytes);
    c.prompts.push_back(std::move(p));
  }
  return c;
}

absl::StatusOr<std::vector<GoldenCase>> LoadCases(const char* key) {
  ASSIGN_OR_RETURN(nlohmann::json manifest, ReadManifest());
  std::vector<GoldenCase> cases;
  if (!manifest.contains(key)) return cases;
  for (const nlohmann::json& entry : manifest[key]) {
    ASSIGN_OR_RETURN(GoldenCase c, ReadCase(entry));
    cases.push_back(std::move(c));
  }
  return cases;
}

}  // namespace

std::string RepoPath(const std::string& relative) {
  return absl::StrCat(LORASERVE_SOURCE_DIR, "/", relative);
}

absl::StatusOr<std::vector<GoldenCase>> LoadModelCases() { return LoadCases("model_cases"); }
absl::StatusOr<std::vector<GoldenCase>> LoadAdapterCases() { return LoadCases("adapter_cases"); }
absl::StatusOr<std::vector<GoldenCase>> LoadCompositionCases() {
  return LoadCases("composition_cases");
}

}  // namespace loraserve::test_support
