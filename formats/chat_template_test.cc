#include "formats/chat_template.h"

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/status_matchers.h"

namespace loraserve::formats {
namespace {

using ::loraserve::test_support::StatusIs;

using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Shortened from the models' tokenizer_config.json, markers and spacing kept
// (the backslash-n pairs are Jinja escapes, as in the files).
constexpr char kLlama2Jinja[] =
    R"({% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %})"
    R"({% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %})"
    R"({% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + )"
    R"(' [/INST]' }}{% endif %}{% endfor %})";
constexpr char kLlama3Jinja[] =
    R"({% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + )"
    R"('<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{{ content }})"
    R"({% endfor %})";
constexpr char kChatMlJinja[] =
    R"({% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + )"
    R"(message['content'] + '<|im_end|>' + '\n'}}{% endfor %})";
constexpr char kMistralJinja[] =
    R"({{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %})"
    R"({{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- endfor %})";

ChatTemplate Named(absl::string_view name) {
  absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::FromName(name);
  EXPECT_OK(chat_template);
  return *chat_template;
}

std::string RenderOrDie(absl::string_view name, const std::vector<ChatMessage>& messages) {
  absl::StatusOr<std::string> prompt = Named(name).Render(messages);
  EXPECT_OK(prompt);
  return prompt.ok() ? *prompt : "";
}

// The error Render gives, or OK.
absl::Status RenderError(absl::string_view name, const std::vector<ChatMessage>& messages) {
  return Named(name).Render(messages).status();
}

TEST(ChatTemplateTest, FromNameGivesCanonicalNamesAndStopStrings) {
  EXPECT_EQ(Named("llama-2").name(), "llama-2");
  EXPECT_THAT(Named("llama-2").stop_strings(), ElementsAre("</s>"));
  EXPECT_THAT(Named("llama-3").stop_strings(), ElementsAre("<|eot_id|>"));
  EXPECT_EQ(Named("qwen").name(), "chatml");
  EXPECT_THAT(Named("chatml").stop_strings(), ElementsAre("<|im_end|>"));
  EXPECT_THAT(Named("mistral").stop_strings(), ElementsAre("</s>"));

  absl::StatusOr<ChatTemplate> unknown = ChatTemplate::FromName("vicuna");
  EXPECT_THAT(unknown, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(unknown.status().message(), HasSubstr("vicuna"));
  EXPECT_THAT(unknown.status().message(),
              HasSubstr("llama-2, llama-3, chatml (alias qwen), mistral"));
}

TEST(ChatTemplateTest, Llama2FoldsSystemIntoFirstInstAndStrips) {
  EXPECT_EQ(RenderOrDie("llama-2", {{"system", "Be terse."}, {"user", "Hi"}}),
            "[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nHi [/INST]");
  EXPECT_EQ(RenderOrDie("llama-2", {{"user", " Hi \n"}}), "[INST] Hi [/INST]");
  // The template strips the folded text as a whole, so the user message's
  // leading space survives after <</SYS>>.
  EXPECT_EQ(RenderOrDie("llama-2", {{"system", "S"}, {"user", " Hi \n"}}),
            "[INST] <<SYS>>\nS\n<</SYS>>\n\n Hi [/INST]");
}

TEST(ChatTemplateTest, Llama2MultiTurnKeepsEosAndLaterBos) {
  EXPECT_EQ(RenderOrDie("llama-2",
                        {{"system", "S"}, {"user", "A"}, {"assistant", " B "}, {"user", " C"}}),
            "[INST] <<SYS>>\nS\n<</SYS>>\n\nA [/INST] B </s><s>[INST] C [/INST]");
}

TEST(ChatTemplateTest, MistralPrependsSystemToFirstUserMessage) {
  EXPECT_EQ(RenderOrDie("mistral", {{"system", "Be terse."}, {"user", "Hi"}}),
            " [INST] Be terse.\n\nHi [/INST]");
  EXPECT_EQ(RenderOrDie("mistral", {{"user", "A"}, {"assistant", "B"}, {"user", "C"}}),
            " [INST] A [/INST] B</s> [INST] C [/INST]");
}

TEST(ChatTemplateTest, Llama3HeadersEveryMessageAndOpensAssistant) {
  EXPECT_EQ(RenderOrDie("llama-3", {{"system", "Be terse."}, {"user", " Hi\n"}}),
            "<|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(RenderOrDie("llama-3", {{"user", "A"}, {"assistant", "B"}, {"user", "C"}}),
            "<|start_header_id|>user<|end_header_id|>\n\nA<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nB<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nC<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplateTest, ChatMlKeepsContentAsIsAndOpensAssistant) {
  EXPECT_EQ(RenderOrDie("chatml", {{"system", "Be terse."}, {"user", " Hi"}}),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n Hi<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(RenderOrDie("qwen", {{"user", "A"}, {"assistant", "B"}, {"user", "C"}}),
            "<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
            "<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, EveryFamilyRejectsEmptyChatsAndUnknownRoles) {
  for (absl::string_view name : {"llama-2", "llama-3", "chatml", "mistral"}) {
    SCOPED_TRACE(name);
    EXPECT_THAT(RenderError(name, {}), StatusIs(absl::StatusCode::kInvalidArgument));
    const absl::Status tool = RenderError(name, {{"user", "A"}, {"tool", "{}"}});
    EXPECT_THAT(tool, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(tool.message(), HasSubstr("messages[1] has role \"tool\""));
  }
}

TEST(ChatTemplateTest, Llama3AndChatMlAcceptAnyOrder) {
  for (absl::string_view name : {"llama-3", "chatml"}) {
    EXPECT_OK(RenderError(name, {{"assistant", "A"}, {"system", "S"}, {"assistant", "B"}}));
  }
}

TEST(ChatTemplateTest, Llama2AndMistralRejectBrokenAlternation) {
  struct Case {
    std::vector<ChatMessage> messages;
    std::string error;
  };
  const std::vector<Case> cases = {
      {{{"assistant", "A"}, {"user", "B"}}, "messages[0] has role \"assistant\""},
      {{{"system", "S"}, {"system", "T"}, {"user", "B"}}, "messages[1] has role \"system\""},
      {{{"user", "A"}, {"system", "S"}}, "messages[1] has role \"system\""},
      {{{"user", "A"}, {"user", "B"}}, "messages[1] has role \"user\""},
      {{{"user", "A"}, {"assistant", "B"}}, "messages[1] has role \"assistant\""},
      {{{"system", "S"}}, "messages[0] has role \"system\""},
  };
  for (absl::string_view name : {"llama-2", "mistral"}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(absl::StrCat(name, ": ", c.error));
      const absl::Status status = RenderError(name, c.messages);
      EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
      EXPECT_THAT(status.message(), HasSubstr(c.error));
      EXPECT_THAT(status.message(), HasSubstr(name));
    }
  }
}

class FromTokenizerConfigTest : public ::testing::Test {
 protected:
  // A fresh model directory holding `config_text` as tokenizer_config.json.
  std::string ModelDir(const std::string& config_text) {
    const std::string dir = ::testing::TempDir() + "/chat_template_test_" +
                            ::testing::UnitTest::GetInstance()->current_test_info()->name() +
                            std::to_string(dirs_++);
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    std::ofstream(dir + "/tokenizer_config.json") << config_text;
    return dir;
  }
  std::string ModelDir(const json& config) { return ModelDir(config.dump()); }

 private:
  int dirs_ = 0;
};

TEST_F(FromTokenizerConfigTest, RecognisesEachFamily) {
  const std::vector<std::pair<const char*, std::string>> cases = {{kLlama2Jinja, "llama-2"},
                                                                  {kLlama3Jinja, "llama-3"},
                                                                  {kChatMlJinja, "chatml"},
                                                                  {kMistralJinja, "mistral"}};
  for (const auto& [jinja, family] : cases) {
    absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::FromTokenizerConfig(
        ModelDir(json{{"bos_token", "<s>"}, {"chat_template", jinja}}));
    ASSERT_OK(chat_template);
    EXPECT_EQ(chat_template->name(), family);
  }
}

TEST_F(FromTokenizerConfigTest, ListFormUsesTheDefaultEntry) {
  absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::FromTokenizerConfig(ModelDir(
      json{{"chat_template", json::array({{{"name", "tool_use"}, {"template", kLlama3Jinja}},
                                          {{"name", "default"}, {"template", kChatMlJinja}}})}}));
  ASSERT_OK(chat_template);
  EXPECT_EQ(chat_template->name(), "chatml");

  absl::StatusOr<ChatTemplate> no_default = ChatTemplate::FromTokenizerConfig(ModelDir(
      json{{"chat_template", json::array({{{"name", "tool_use"}, {"template", kLlama3Jinja}}})}}));
  EXPECT_THAT(no_default, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(no_default.status().message(), HasSubstr("default"));
}

TEST_F(FromTokenizerConfigTest, DeepNestingIsRefusedBeforeParsing) {
  const std::string dir = ModelDir(R"({"chat_template": "x", "y": )" + std::string(100, '[') +
                                   std::string(100, ']') + "}");
  absl::StatusOr<ChatTemplate> chat_template = ChatTemplate::FromTokenizerConfig(dir);
  EXPECT_THAT(chat_template, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(chat_template.status().message(),
              AllOf(HasSubstr("tokenizer_config.json"), HasSubstr("deeper than 64 levels")));
}

TEST_F(FromTokenizerConfigTest, MissingTemplateIsNotFoundAndPointsAtTheFlag) {
  absl::StatusOr<ChatTemplate> no_field =
      ChatTemplate::FromTokenizerConfig(ModelDir(json{{"bos_token", "<s>"}}));
  EXPECT_THAT(no_field, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(no_field.status().message(), HasSubstr("no chat template"));
  EXPECT_THAT(no_field.status().message(), HasSubstr("--chat-template"));

  const std::string empty_dir = ModelDir(json::object());
  std::filesystem::remove(empty_dir + "/tokenizer_config.json");
  absl::StatusOr<ChatTemplate> no_file = ChatTemplate::FromTokenizerConfig(empty_dir);
  EXPECT_THAT(no_file, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(no_file.status().message(), HasSubstr("--chat-template"));
}

TEST_F(FromTokenizerConfigTest, UnknownTemplateOrBadFileIsInvalidArgument) {
  absl::StatusOr<ChatTemplate> alpaca = ChatTemplate::FromTokenizerConfig(ModelDir(
      json{{"chat_template",
            "{% for message in messages %}### {{ message['role'] }}:\n{{ message['content'] }}\n"
            "{% endfor %}"}}));
  EXPECT_THAT(alpaca, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(alpaca.status().message(), HasSubstr("llama-2"));
  EXPECT_THAT(alpaca.status().message(), HasSubstr("<|im_start|>"));

  EXPECT_EQ(ChatTemplate::FromTokenizerConfig(ModelDir(std::string("{\"chat_template\": ")))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ChatTemplate::FromTokenizerConfig(ModelDir(json{{"chat_template", 7}})),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(FromTokenizerConfigTest, RecognisedTemplateRendersLikeTheNamedOne) {
  absl::StatusOr<ChatTemplate> chat_template =
      ChatTemplate::FromTokenizerConfig(ModelDir(json{{"chat_template", kLlama2Jinja}}));
  ASSERT_OK(chat_template);
  EXPECT_EQ(*chat_template->Render({{"system", "S"}, {"user", "Hi"}}),
            "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]");
}

TEST(ChatTemplateSharedModelTest, AidreamsHasNoChatTemplate) {
  absl::StatusOr<ChatTemplate> chat_template =
      ChatTemplate::FromTokenizerConfig(LORASERVE_SHARED_DIR "/models/aidreams-260k");
  EXPECT_THAT(chat_template, StatusIs(absl::StatusCode::kNotFound)) << chat_template.status();
}

}  // namespace
}  // namespace loraserve::formats
