// Chat templates: how /v1/chat/completions turns a list of chat messages into
// the prompt text a model was fine-tuned on.
//
// Hugging Face models ship their chat template as Jinja in
// tokenizer_config.json. We do not run Jinja: we recognise the four common
// families by their markers and render each in C++, producing the text the
// family's official template produces with add_generation_prompt=true:
//
//   llama-2: meta-llama/Llama-2-*-chat-hf,
//            "[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST]"
//   llama-3: meta-llama/Meta-Llama-3-*-Instruct,
//            "<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>"
//   chatml:  Qwen2, OpenHermes, ..., "<|im_start|>role\n...<|im_end|>\n"
//   mistral: mistralai/Mistral-7B-Instruct-v0.1, " [INST] ... [/INST]", with
//            the system prompt prepended to the first user turn
//
// Differences from the Jinja originals, on purpose: the leading BOS text
// ("<s>", "<|begin_of_text|>") is left out because the server's tokenizer adds
// BOS itself (BOS text later in a llama-2 prompt stays, as the template writes
// it); llama-2 and mistral prompts must end with a user message, since the
// assistant's turn is the one being opened; chatml adds no default system
// prompt (Qwen2's template adds "You are a helpful assistant." when the chat
// has none; a client that wants it sends it). Trimming ("strip", "| trim")
// removes ASCII whitespace only.
//
// Ownership and threads: a ChatTemplate is a small immutable value; copy it
// freely and call Render from any number of threads at once.
//
// Example:
//   absl::StatusOr<ChatTemplate> chat_template =
//       flags.chat_template.empty() ? ChatTemplate::FromTokenizerConfig(flags.model_dir)
//                                   : ChatTemplate::FromName(flags.chat_template);
//   if (!chat_template.ok()) return chat_template.status();
//   ASSIGN_OR_RETURN(std::string prompt, chat_template->Render(
//       {{"system", "Answer briefly."}, {"user", "What is LoRA?"}}));
//   for (const std::string& stop : chat_template->stop_strings()) request.stop.push_back(stop);
#ifndef LORASERVE_FORMATS_CHAT_TEMPLATE_H_
#define LORASERVE_FORMATS_CHAT_TEMPLATE_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace loraserve::formats {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

class ChatTemplate {
 public:
  // "llama-2", "llama-3", "chatml" (alias "qwen") or "mistral"; anything else
  // is InvalidArgument listing the valid names.
  static absl::StatusOr<ChatTemplate> FromName(absl::string_view name);

  // Recognises the family of <model_dir>/tokenizer_config.json's
  // "chat_template" (a string, or a list of {"name", "template"} objects of
  // which the one named "default" is used). NotFound when the file or the
  // field is absent; InvalidArgument when the file is malformed or the
  // template belongs to none of the families.
  static absl::StatusOr<ChatTemplate> FromTokenizerConfig(const std::string& model_dir);

  // The prompt with the assistant's turn opened, without the leading BOS text.
  // InvalidArgument, naming messages[i], for an empty chat, an unknown role,
  // or (llama-2, mistral) an order other than: an optional system message,
  // then user and assistant alternating, starting and ending with user.
  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages) const;

  // Texts that end an assistant turn in this family ("<|eot_id|>",
  // "<|im_end|>", "</s>"); the gateway adds them to the request's stop strings.
  const std::vector<std::string>& stop_strings() const { return stop_strings_; }

  // The canonical family name ("chatml" for "qwen").
  const std::string& name() const { return name_; }

 private:
  enum class Family { kLlama2, kLlama3, kChatMl, kMistral };

  ChatTemplate(Family family, std::string name, std::vector<std::string> stop_strings)
      : family_(family), name_(std::move(name)), stop_strings_(std::move(stop_strings)) {}

  Family family_;
  std::string name_;
  std::vector<std::string> stop_strings_;
};

}  // namespace loraserve::formats

#endif  // LORASERVE_FORMATS_CHAT_TEMPLATE_H_
