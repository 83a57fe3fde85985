#include "formats/chat_template.h"

#include <cerrno>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/json_depth.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace loraserve::formats {
namespace {

using json = nlohmann::json;

constexpr absl::string_view kValidNames = "llama-2, llama-3, chatml (alias qwen), mistral";

absl::Status CheckKnownRoles(const std::vector<ChatMessage>& messages) {
  if (messages.empty()) {
    return absl::InvalidArgumentError("messages is empty; expected at least one message");
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat("messages[", i, "] has role \"", role,
                                                     "\"; expected system, user or assistant"));
    }
  }
  return absl::OkStatus();
}

// llama-2 and mistral were trained on [INST] pairs only: an optional system
// message, then user/assistant alternating, and the prompt ends with the user
// turn the model answers. Returns whether messages[0] is the system message.
absl::StatusOr<bool> CheckAlternation(const std::vector<ChatMessage>& messages,
                                      absl::string_view family) {
  RETURN_IF_ERROR(CheckKnownRoles(messages));
  const bool has_system = messages[0].role == "system";
  const size_t first = has_system ? 1 : 0;
  const absl::string_view rule =
      "an optional system message, then user and assistant alternating, starting and ending "
      "with user";
  for (size_t i = first; i < messages.size(); ++i) {
    const absl::string_view expected = (i - first) % 2 == 0 ? "user" : "assistant";
    if (messages[i].role != expected) {
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i, "] has role \"", messages[i].role, "\"; ", family,
                       " expects \"", expected, "\" there (", rule, ")"));
    }
  }
  const size_t last = messages.size() - 1;
  if (messages[last].role != "user") {
    return absl::InvalidArgumentError(
        absl::StrCat("messages[", last, "] has role \"", messages[last].role, "\"; ", family,
                     " needs the chat to end with a user message (", rule, ")"));
  }
  return has_system;
}

// meta-llama/Llama-2-7b-chat-hf: every user turn is "<s>[INST] ... [/INST]"
// (the system prompt folded into the first), every assistant turn
// " ... </s>"; each turn's text is stripped.
absl::StatusOr<std::string> RenderLlama2(const std::vector<ChatMessage>& messages) {
  ASSIGN_OR_RETURN(const bool has_system, CheckAlternation(messages, "llama-2"));
  const size_t first = has_system ? 1 : 0;
  std::string out;
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& message = messages[i];
    if (message.role == "assistant") {
      absl::StrAppend(&out, " ", absl::StripAsciiWhitespace(message.content), " </s>");
      continue;
    }
    std::string content = message.content;
    if (i == first && has_system) {
      content = absl::StrCat("<<SYS>>\n", messages[0].content, "\n<</SYS>>\n\n", content);
    }
    // The first BOS is the tokenizer's; later ones are part of the template.
    if (i != first) out += "<s>";
    absl::StrAppend(&out, "[INST] ", absl::StripAsciiWhitespace(content), " [/INST]");
  }
  return out;
}

// mistralai/Mistral-7B-Instruct-v0.1: " [INST] ... [/INST]" per user turn
// (system prompt and a blank line before the first), " ...</s>" per assistant
// turn, contents as given.
absl::StatusOr<std::string> RenderMistral(const std::vector<ChatMessage>& messages) {
  ASSIGN_OR_RETURN(const bool has_system, CheckAlternation(messages, "mistral"));
  const size_t first = has_system ? 1 : 0;
  std::string out;
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& message = messages[i];
    if (message.role == "assistant") {
      absl::StrAppend(&out, " ", message.content, "</s>");
    } else if (i == first && has_system) {
      absl::StrAppend(&out, " [INST] ", messages[0].content, "\n\n", message.content, " [/INST]");
    } else {
      absl::StrAppend(&out, " [INST] ", message.content, " [/INST]");
    }
  }
  return out;
}

// meta-llama/Meta-Llama-3-8B-Instruct: a header per message, contents trimmed.
absl::StatusOr<std::string> RenderLlama3(const std::vector<ChatMessage>& messages) {
  RETURN_IF_ERROR(CheckKnownRoles(messages));
  std::string out;
  for (const ChatMessage& message : messages) {
    absl::StrAppend(&out, "<|start_header_id|>", message.role, "<|end_header_id|>\n\n",
                    absl::StripAsciiWhitespace(message.content), "<|eot_id|>");
  }
  out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

// ChatML as in Qwen/Qwen2-7B-Instruct, without its default system prompt.
absl::StatusOr<std::string> RenderChatMl(const std::vector<ChatMessage>& messages) {
  RETURN_IF_ERROR(CheckKnownRoles(messages));
  std::string out;
  for (const ChatMessage& message : messages) {
    absl::StrAppend(&out, "<|im_start|>", message.role, "\n", message.content, "<|im_end|>\n");
  }
  out += "<|im_start|>assistant\n";
  return out;
}

// The family whose markers `jinja` contains, or "" for none. The Llama-3 and
// ChatML markers are special tokens no other family writes, so they are
// checked before "[INST]", which is plain text.
absl::string_view RecogniseFamily(absl::string_view jinja) {
  if (absl::StrContains(jinja, "<|start_header_id|>")) return "llama-3";
  if (absl::StrContains(jinja, "<|im_start|>")) return "chatml";
  if (absl::StrContains(jinja, "[INST]")) {
    return absl::StrContains(jinja, "<<SYS>>") ? "llama-2" : "mistral";
  }
  return "";
}

// The Jinja text of `config`'s "chat_template"; `path` names the file in errors.
absl::StatusOr<std::string> TemplateText(const json& config, const std::string& path) {
  const auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) {
    return absl::NotFoundError(
        absl::StrCat(path,
                     " has no \"chat_template\": the model has no chat template; choose one "
                     "with --chat-template (",
                     kValidNames, ")"));
  }
  if (it->is_string()) return it->get<std::string>();
  if (it->is_array()) {
    for (const json& entry : *it) {
      if (entry.is_object() && entry.value("name", json()) == "default" &&
          entry.contains("template") && entry["template"].is_string()) {
        return entry["template"].get<std::string>();
      }
    }
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": \"chat_template\" is a list with no {\"name\": \"default\", "
                     "\"template\": string} entry"));
  }
  return absl::InvalidArgumentError(absl::StrCat(path, ": \"chat_template\" is a JSON ",
                                                 it->type_name(),
                                                 "; expected a string or a list of templates"));
}

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::FromName(absl::string_view name) {
  if (name == "llama-2") return ChatTemplate(Family::kLlama2, "llama-2", {"</s>"});
  if (name == "llama-3") return ChatTemplate(Family::kLlama3, "llama-3", {"<|eot_id|>"});
  if (name == "chatml" || name == "qwen") {
    return ChatTemplate(Family::kChatMl, "chatml", {"<|im_end|>"});
  }
  if (name == "mistral") return ChatTemplate(Family::kMistral, "mistral", {"</s>"});
  return absl::InvalidArgumentError(
      absl::StrCat("unknown chat template \"", name, "\"; expected one of ", kValidNames));
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/tokenizer_config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path,
                                              " does not exist: the model has no chat "
                                              "template; choose one with --chat-template (",
                                              kValidNames, ")"));
    }
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  }
  std::ostringstream text;
  text << in.rdbuf();
  RETURN_IF_ERROR(CheckJsonDepth(text.str(), path));
  const json config = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not valid JSON or not an object; expected a JSON object"));
  }
  ASSIGN_OR_RETURN(const std::string jinja, TemplateText(config, path));
  const absl::string_view family = RecogniseFamily(jinja);
  if (family.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": \"chat_template\" is none of the recognised families (llama-2: [INST] with "
                     "<<SYS>>; llama-3: <|start_header_id|>; chatml: <|im_start|>; mistral: [INST] "
                     "without <<SYS>>); choose one with --chat-template"));
  }
  return FromName(family);
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages) const {
  switch (family_) {
    case Family::kLlama2:
      return RenderLlama2(messages);
    case Family::kLlama3:
      return RenderLlama3(messages);
    case Family::kChatMl:
      return RenderChatMl(messages);
    case Family::kMistral:
      return RenderMistral(messages);
  }
  return absl::InternalError("unknown chat template family");
}

}  // namespace loraserve::formats
