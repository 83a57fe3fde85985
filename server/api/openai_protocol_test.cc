#include "server/api/openai_protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "server/api/status_mapping.h"
#include "tests/support/status_matchers.h"

namespace loraserve::api {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(ErrorBodyTest, HasOpenAisShape) {
  const nlohmann::json body = ErrorBody(absl::NotFoundError("model \"x\" not found"));
  EXPECT_EQ(body["error"]["message"], "model \"x\" not found");
  EXPECT_EQ(body["error"]["type"], "not_found_error");
  EXPECT_EQ(body["error"]["code"], 404);
  EXPECT_TRUE(body["error"]["param"].is_null());
  EXPECT_EQ(ErrorBody(413, "too large")["error"]["type"], "request_too_large");
  EXPECT_EQ(ErrorBody(ServerOutOfRoom(absl::ResourceExhaustedError("full")))["error"]["type"],
            "insufficient_storage");
}

TEST(ParseCompletionRequestTest, ReadsEveryField) {
  absl::StatusOr<CompletionRequest> request = ParseCompletionRequest(
      R"({"model": "m", "prompt": "Once", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
          "seed": 42, "stop": ["\n", "."], "logprobs": 3, "n": 2, "stream": true,
          "stream_options": {"include_usage": true}, "user": "u", "presence_penalty": 0})",
      {});
  ASSERT_OK(request);
  ASSERT_EQ(request->prompts.size(), 1u);
  EXPECT_EQ(std::get<std::string>(request->prompts[0]), "Once");
  const SamplingOptions& s = request->sampling;
  EXPECT_EQ(s.model, "m");
  EXPECT_EQ(*s.max_tokens, 7);
  EXPECT_FLOAT_EQ(s.temperature, 0.5f);
  EXPECT_FLOAT_EQ(s.top_p, 0.9f);
  EXPECT_EQ(*s.seed, 42u);
  EXPECT_THAT(s.stop, ElementsAre("\n", "."));
  EXPECT_TRUE(s.logprobs);
  EXPECT_EQ(s.top_logprobs, 3);
  EXPECT_EQ(s.n, 2);
  EXPECT_TRUE(s.stream);
  EXPECT_TRUE(s.include_usage);
}

TEST(ParseCompletionRequestTest, DefaultsMaxTokensTo16) {
  absl::StatusOr<CompletionRequest> request =
      ParseCompletionRequest(R"({"model": "m", "prompt": "x"})", {});
  ASSERT_OK(request);
  EXPECT_EQ(*request->sampling.max_tokens, 16);
  EXPECT_FALSE(request->sampling.logprobs);
}

TEST(ParseCompletionRequestTest, AcceptsEveryPromptForm) {
  auto prompts = [](const std::string& prompt) {
    return ParseCompletionRequest(R"({"model": "m", "prompt": )" + prompt + "}", {});
  };
  EXPECT_EQ(prompts(R"(["a", "b"])")->prompts.size(), 2u);
  EXPECT_THAT(std::get<std::vector<int32_t>>(prompts("[1, 2, 3]")->prompts[0]),
              ElementsAre(1, 2, 3));
  EXPECT_EQ(prompts("[[1], [2, 3]]")->prompts.size(), 2u);
  EXPECT_FALSE(prompts("[]").ok());
  EXPECT_FALSE(prompts("[-1]").ok());
  EXPECT_FALSE(prompts("{}").ok());
  EXPECT_FALSE(prompts("[1.5]").ok());
}

TEST(ParseCompletionRequestTest, RejectsBadBodiesNamingTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"not json", "not valid JSON"},
      {"[1]", "JSON object"},
      {R"({"prompt": "x"})", "\"model\" is required"},
      {R"({"model": "m"})", "\"prompt\" is required"},
      {R"({"model": "m", "prompt": "x", "max_tokens": -1})", "\"max_tokens\""},
      {R"({"model": "m", "prompt": "x", "max_tokens": "5"})", "\"max_tokens\" must be an integer"},
      {R"({"model": "m", "prompt": "x", "temperature": -0.1})", "\"temperature\""},
      {R"({"model": "m", "prompt": "x", "top_p": 0})", "\"top_p\""},
      {R"({"model": "m", "prompt": "x", "n": 1000})", "\"n\""},
      {R"({"model": "m", "prompt": ["a", "b", "c"], "n": 6})", "--max-choices"},
      {R"({"model": "m", "prompt": "x", "logprobs": 99})", "\"logprobs\""},
      {R"({"model": "m", "prompt": "x", "stop": 3})", "\"stop\""},
      {R"({"model": "m", "prompt": "x", "bogus": 1})", "unknown field \"bogus\""},
      {R"({"model": "m", "prompt": "x", "echo": true})", "\"echo\""},
      {R"({"model": "m", "prompt": "x", "frequency_penalty": 1})", "\"frequency_penalty\""},
      {R"({"model": "m", "prompt": "x", "logit_bias": {"1": 5}})", "\"logit_bias\""},
      {R"({"model": "m", "prompt": "x", "stream": "yes"})", "\"stream\""},
      {R"({"model": "m", "prompt": "x", "max_tokens": 99999999999999999999})", "\"max_tokens\""},
  };
  for (const auto& [body, expected] : cases) {
    absl::StatusOr<CompletionRequest> request = ParseCompletionRequest(body, {});
    ASSERT_FALSE(request.ok()) << body;
    EXPECT_THAT(request, StatusIs(absl::StatusCode::kInvalidArgument)) << body;
    EXPECT_THAT(request.status().message(), HasSubstr(expected)) << body;
  }
}

// Found by reading the code behind the fuzz targets: a field's error message
// dumped the offending value, and dump() recurses once per level, so a body
// of nested arrays overflowed the gateway thread's stack.
TEST(ParseCompletionRequestTest, RefusesDeeplyNestedBodiesBeforeParsing) {
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  for (const std::string& body :
       {R"({"model": "m", "prompt": "x", "stop": )" + deep + "}",
        R"({"model": "m", "prompt": [)" + deep + "]}", R"({"lora_name": )" + deep + "}"}) {
    absl::StatusOr<CompletionRequest> request = ParseCompletionRequest(body, {});
    ASSERT_FALSE(request.ok());
    EXPECT_THAT(request.status().message(), HasSubstr("deeper than 64 levels"));
    EXPECT_FALSE(ParseChatRequest(body, {}).ok());
    EXPECT_FALSE(ParseStringFields(body, {"lora_name"}).ok());
  }
  const std::string nested_64 = std::string(63, '[') + "1" + std::string(63, ']');
  EXPECT_THAT(
      ParseCompletionRequest(R"({"model": "m", "prompt": "x", "stop": )" + nested_64 + "}", {})
          .status()
          .message(),
      HasSubstr("\"stop\" must be"));
}

TEST(ParseCompletionRequestTest, ReadsMergedAdaptersWithDefaultWeights) {
  absl::StatusOr<CompletionRequest> weighted = ParseCompletionRequest(
      R"({"model": "m", "prompt": "x", "merged_adapters":
          {"ids": ["ocean", "acme/bot"], "weights": [1, -0.5], "merge_strategy": "cat"}})",
      {});
  ASSERT_OK(weighted);
  ASSERT_TRUE(weighted->sampling.merged_adapters.has_value());
  EXPECT_THAT(weighted->sampling.merged_adapters->ids, ElementsAre("ocean", "acme/bot"));
  EXPECT_THAT(weighted->sampling.merged_adapters->weights, ElementsAre(1.0f, -0.5f));
  absl::StatusOr<CompletionRequest> plain = ParseCompletionRequest(
      R"({"model": "m", "prompt": "x", "merged_adapters": {"ids": ["a", "b", "c"]}})", {});
  ASSERT_OK(plain);
  EXPECT_THAT(plain->sampling.merged_adapters->weights, ElementsAre(1.0f, 1.0f, 1.0f));
  absl::StatusOr<CompletionRequest> none =
      ParseCompletionRequest(R"({"model": "m", "prompt": "x", "merged_adapters": null})", {});
  ASSERT_OK(none);
  EXPECT_FALSE(none->sampling.merged_adapters.has_value());
}

TEST(ParseCompletionRequestTest, RejectsBadMergedAdaptersNamingTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("merged_adapters": ["a"])", "\"merged_adapters\" must be an object"},
      {R"("merged_adapters": {})", "\"merged_adapters.ids\" must be a non-empty array"},
      {R"("merged_adapters": {"ids": []})", "\"merged_adapters.ids\" must be a non-empty"},
      {R"("merged_adapters": {"ids": ["a", 3]})", "\"merged_adapters.ids\" must be an array"},
      {R"("merged_adapters": {"ids": ["a", ""]})", "\"merged_adapters.ids\" must be an array"},
      {R"("merged_adapters": {"ids": ["a", "b"], "weights": [1]})",
       "\"merged_adapters.weights\" must be an array of 2 numbers"},
      {R"("merged_adapters": {"ids": ["a"], "weights": ["1"]})", "non-zero numbers"},
      {R"("merged_adapters": {"ids": ["a"], "weights": [0]})", "non-zero numbers"},
      {R"("merged_adapters": {"ids": ["a"], "weights": [1e-300]})", "non-zero numbers"},
      {R"("merged_adapters": {"ids": ["a"], "merge_strategy": "ties"})", "supports only \"cat\""},
      {R"("merged_adapters": {"ids": ["a"], "density": 0.5})", "unknown field \"density\""},
  };
  for (const auto& [field, message] : cases) {
    SCOPED_TRACE(field);
    EXPECT_THAT(
        ParseCompletionRequest(absl::StrCat(R"({"model": "m", "prompt": "x", )", field, "}"), {})
            .status(),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(message)));
  }
}

TEST(ParseChatRequestTest, ReadsMessagesAndLogprobs) {
  absl::StatusOr<ChatRequest> request = ParseChatRequest(
      R"({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
          "logprobs": true, "top_logprobs": 2, "max_completion_tokens": 9})",
      {});
  ASSERT_OK(request);
  ASSERT_EQ(request->messages.size(), 2u);
  EXPECT_EQ(request->messages[0].role, "system");
  EXPECT_EQ(request->messages[1].content, "Hi");
  EXPECT_TRUE(request->sampling.logprobs);
  EXPECT_EQ(request->sampling.top_logprobs, 2);
  EXPECT_EQ(*request->sampling.max_tokens, 9);
}

TEST(ParseChatRequestTest, LeavesMaxTokensUnsetForTheServerToFill) {
  absl::StatusOr<ChatRequest> request =
      ParseChatRequest(R"({"model": "m", "messages": [{"role": "user", "content": "x"}]})", {});
  ASSERT_OK(request);
  EXPECT_FALSE(request->sampling.max_tokens.has_value());
}

TEST(ParseChatRequestTest, RejectsBadMessages) {
  for (const std::string body : {
           R"({"model": "m", "messages": []})",
           R"({"model": "m", "messages": [{"role": "user"}]})",
           R"({"model": "m", "messages": [{"role": 1, "content": "x"}]})",
           R"({"model": "m", "messages": [{"role": "user", "content": "x", "extra": 1}]})",
           R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})",
       }) {
    EXPECT_THAT(ParseChatRequest(body, {}), StatusIs(absl::StatusCode::kInvalidArgument)) << body;
  }
}

TEST(ParseStringFieldsTest, RequiresEachFieldAsAString) {
  absl::StatusOr<std::vector<std::string>> fields =
      ParseStringFields(R"({"lora_name": "a", "lora_path": "/p"})", {"lora_name", "lora_path"});
  ASSERT_OK(fields);
  EXPECT_THAT(*fields, ElementsAre("a", "/p"));
  EXPECT_FALSE(ParseStringFields(R"({"lora_name": "a"})", {"lora_name", "lora_path"}).ok());
  EXPECT_FALSE(ParseStringFields(R"({"lora_name": 3})", {"lora_name"}).ok());
  EXPECT_FALSE(ParseStringFields(R"({"lora_name": "a", "x": "y"})", {"lora_name"}).ok());
}

TEST(LogprobsJsonTest, CompletionShapeHasOffsetsAndTopMaps) {
  const std::vector<TokenLogprobs> tokens = {{"He", -0.5f, {{"He", -0.5f}, {"She", -1.5f}}},
                                             {"llo", -0.25f, {{"llo", -0.25f}}}};
  const nlohmann::json out = CompletionLogprobs(tokens, 10);
  EXPECT_EQ(out["tokens"], nlohmann::json({"He", "llo"}));
  EXPECT_EQ(out["token_logprobs"][1], -0.25);
  EXPECT_EQ(out["top_logprobs"][0]["She"], -1.5);
  EXPECT_EQ(out["text_offset"], nlohmann::json({10, 12}));
}

TEST(LogprobsJsonTest, ChatShapeHasBytes) {
  const nlohmann::json out = ChatLogprobs({{"A", -0.5f, {{"B", -2.0f}}}});
  EXPECT_EQ(out["content"][0]["token"], "A");
  EXPECT_EQ(out["content"][0]["bytes"], nlohmann::json({65}));
  EXPECT_EQ(out["content"][0]["top_logprobs"][0]["token"], "B");
}

TEST(JsonTextTest, ReplacesInvalidUtf8) {
  EXPECT_EQ(JsonText(nlohmann::json("a\xe2")), "\"a\xef\xbf\xbd\"");
}

TEST(DisplayAdapterIdTest, OperatorsAdaptersByBareName) {
  EXPECT_EQ(DisplayAdapterId("default/ocean"), "ocean");
  EXPECT_EQ(DisplayAdapterId("acme/bot"), "acme/bot");
}

}  // namespace
}  // namespace loraserve::api
