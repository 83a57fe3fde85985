// ParseCompletionRequest (and ParseStringFields, the other JSON bodies) on
// arbitrary text; an accepted request respects the limits, and the error
// body of a refused one is valid JSON text.
#include <cstdint>
#include <string>

#include "server/api/openai_protocol.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve::api;
  const absl::string_view body = loraserve::fuzz::AsText(data, size);
  const ParseLimits limits = {.max_choices = 16, .max_top_logprobs = 20};
  absl::StatusOr<CompletionRequest> request = ParseCompletionRequest(body, limits);
  if (request.ok()) {
    const SamplingOptions& sampling = request->sampling;
    FUZZ_CHECK(!request->prompts.empty());
    FUZZ_CHECK(!sampling.model.empty());
    FUZZ_CHECK(sampling.n >= 1 &&
               sampling.n * static_cast<int64_t>(request->prompts.size()) <= limits.max_choices);
    FUZZ_CHECK(sampling.max_tokens.has_value() && *sampling.max_tokens >= 1);
    FUZZ_CHECK(sampling.top_logprobs >= 0 && sampling.top_logprobs <= limits.max_top_logprobs);
    FUZZ_CHECK(sampling.temperature >= 0 && sampling.temperature <= 2);
    FUZZ_CHECK(sampling.top_p > 0 && sampling.top_p <= 1);
    if (sampling.merged_adapters) {
      const MergedAdapters& merged = *sampling.merged_adapters;
      FUZZ_CHECK(!merged.ids.empty() && merged.weights.size() == merged.ids.size());
      for (const std::string& id : merged.ids) FUZZ_CHECK(!id.empty());
      for (float weight : merged.weights) FUZZ_CHECK(weight != 0.0f);
    }
    for (const Prompt& prompt : request->prompts) {
      if (const auto* ids = std::get_if<std::vector<int32_t>>(&prompt)) {
        for (int32_t id : *ids) FUZZ_CHECK(id >= 0);
      }
    }
  } else {
    JsonText(ErrorBody(request.status()));
  }
  absl::StatusOr<std::vector<std::string>> fields =
      ParseStringFields(body, {"lora_name", "lora_path"});
  if (fields.ok()) FUZZ_CHECK(fields->size() == 2);
  // Text that is not UTF-8 (a token that is part of a character) still
  // becomes JSON text.
  JsonText(nlohmann::json{{"text", std::string(body)}});
  return 0;
}
