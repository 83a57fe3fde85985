// ChatTemplate::FromTokenizerConfig of a model directory whose
// tokenizer_config.json is the input up to the first NUL, FromName of that
// part, and Render of the chat in the rest: NUL-separated role, content,
// role, content...
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "formats/chat_template.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve;
  const std::vector<absl::string_view> parts =
      fuzz::SplitInput(fuzz::AsText(data, size), absl::string_view("\0", 1), 65);
  std::vector<formats::ChatMessage> messages;
  for (size_t i = 1; i + 1 < parts.size(); i += 2) {
    messages.push_back({std::string(parts[i]), std::string(parts[i + 1])});
  }
  const std::string& dir = fuzz::FreshScratchDir();
  fuzz::WriteFileOrDie(dir + "/tokenizer_config.json", parts[0]);
  std::vector<formats::ChatTemplate> templates;
  if (absl::StatusOr<formats::ChatTemplate> t = formats::ChatTemplate::FromTokenizerConfig(dir);
      t.ok()) {
    templates.push_back(*t);
  }
  if (absl::StatusOr<formats::ChatTemplate> t = formats::ChatTemplate::FromName(parts[0]); t.ok()) {
    templates.push_back(*t);
  }
  for (const formats::ChatTemplate& chat_template : templates) {
    FUZZ_CHECK(!chat_template.stop_strings().empty());
    absl::StatusOr<std::string> prompt = chat_template.Render(messages);
    if (!prompt.ok()) continue;
    FUZZ_CHECK(!messages.empty());
    // The prompt opens the assistant's turn.
    FUZZ_CHECK(absl::EndsWith(*prompt, "<|end_header_id|>\n\n") ||
               absl::EndsWith(*prompt, "<|im_start|>assistant\n") ||
               absl::EndsWith(*prompt, "[/INST]"));
  }
  return 0;
}
