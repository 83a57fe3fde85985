// ParseChatRequest on arbitrary text; an accepted request is rendered by
// every chat template family, as /v1/chat/completions does with the model's.
#include <cstdint>
#include <string>

#include "formats/chat_template.h"
#include "server/api/openai_protocol.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve::api;
  static const std::vector<loraserve::formats::ChatTemplate> kTemplates = [] {
    std::vector<loraserve::formats::ChatTemplate> templates;
    for (const char* name : {"llama-2", "llama-3", "chatml", "mistral"}) {
      templates.push_back(*loraserve::formats::ChatTemplate::FromName(name));
    }
    return templates;
  }();
  const ParseLimits limits = {.max_choices = 16, .max_top_logprobs = 20};
  absl::StatusOr<ChatRequest> request =
      ParseChatRequest(loraserve::fuzz::AsText(data, size), limits);
  if (!request.ok()) {
    JsonText(ErrorBody(request.status()));
    return 0;
  }
  FUZZ_CHECK(!request->sampling.model.empty());
  FUZZ_CHECK(request->sampling.n >= 1 && request->sampling.n <= limits.max_choices);
  FUZZ_CHECK(request->sampling.top_logprobs <= limits.max_top_logprobs);
  for (const loraserve::formats::ChatTemplate& chat_template : kTemplates) {
    absl::StatusOr<std::string> prompt = chat_template.Render(request->messages);
    if (!prompt.ok()) JsonText(ErrorBody(prompt.status()));
  }
  return 0;
}
