// Adapter composition over real sockets: a request names several of the
// shared adapters with weights (gRPC GenerateRequest.adapters, the OpenAI
// body's merged_adapters) and gets peft's add_weighted_adapter(..., "cat")
// greedy tokens, batched beside the base model, a plain adapter and other
// compositions, on the unmerged path and on merged weights; the HTTP text is
// the gRPC one's. Compositions that cannot be served get a clear error and
// the server keeps serving.
#include <future>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "tests/e2e/e2e_lib.h"
#include "tests/support/golden_cases.h"

namespace loraserve {
namespace {

using e2e::Generate;
using e2e::Greedy;
using e2e::HttpCall;
using e2e::HttpReply;
using e2e::ServerProcess;
using e2e::Streamed;
using test_support::GoldenCase;
using test_support::GoldenPrompt;

// A greedy request for `prompt` on the composition of `parts`.
v1::GenerateRequest ComposedGreedy(const GoldenPrompt& prompt,
                                   const std::vector<test_support::GoldenPart>& parts) {
  v1::GenerateRequest request = Greedy("", static_cast<int>(prompt.greedy.size()));
  request.mutable_token_ids()->mutable_ids()->Assign(prompt.ids.begin(), prompt.ids.end());
  for (const test_support::GoldenPart& part : parts) {
    v1::WeightedAdapter* adapter = request.add_adapters();
    adapter->set_id(part.adapter);
    adapter->set_weight(part.weight);
  }
  return request;
}

// The greedy /v1/completions body of `prompt` with merged_adapters.
nlohmann::json HttpComposedBody(const std::string& model, const GoldenPrompt& prompt,
                                const std::vector<test_support::GoldenPart>& parts) {
  nlohmann::json ids = nlohmann::json::array(), weights = nlohmann::json::array();
  for (const test_support::GoldenPart& part : parts) {
    ids.push_back(part.adapter);
    weights.push_back(part.weight);
  }
  return {{"model", model},
          {"prompt", prompt.ids},
          {"max_tokens", prompt.greedy.size()},
          {"temperature", 0},
          {"ignore_eos", true},
          {"merged_adapters", {{"ids", ids}, {"weights", weights}, {"merge_strategy", "cat"}}}};
}

grpc::Status GenerateStatus(v1::Inference::Stub& stub, const v1::GenerateRequest& request) {
  return Generate(stub, request).status;
}

class CompositionE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::vector<GoldenCase>> compositions = test_support::LoadCompositionCases();
    absl::StatusOr<std::vector<GoldenCase>> adapters = test_support::LoadAdapterCases();
    absl::StatusOr<std::vector<GoldenCase>> models = test_support::LoadModelCases();
    ASSERT_TRUE(compositions.ok()) << compositions.status();
    ASSERT_TRUE(adapters.ok()) << adapters.status();
    ASSERT_TRUE(models.ok()) << models.status();
    compositions_ = *std::move(compositions);
    ASSERT_GE(compositions_.size(), 2u);
    for (const GoldenCase& c : *adapters) {
      if (c.name == "ocean") ocean_ = c;
    }
    base_ = models->at(0);
    ASSERT_EQ(base_.name, "aidreams-260k");
    ASSERT_EQ(ocean_.name, "ocean");
  }

  // Every composition's prompts, ocean's and the base's, all at once: each
  // stream must be its golden's greedy tokens.
  void ExpectGoldenStreamsConcurrently(v1::Inference::Stub& stub) {
    struct Expected {
      std::string what;
      const GoldenPrompt* prompt;
      std::future<Streamed> stream;
    };
    std::vector<Expected> streams;
    auto start = [&](std::string what, const GoldenPrompt& prompt, v1::GenerateRequest request) {
      streams.push_back({std::move(what), &prompt,
                         std::async(std::launch::async, [&stub, request = std::move(request)] {
                           return Generate(stub, request);
                         })});
    };
    for (const GoldenCase& c : compositions_) {
      for (const GoldenPrompt& prompt : c.prompts)
        start(c.name, prompt, ComposedGreedy(prompt, c.parts));
    }
    for (const GoldenCase* c : {&ocean_, &base_}) {
      for (const GoldenPrompt& prompt : c->prompts) {
        v1::GenerateRequest request = ComposedGreedy(prompt, {});
        if (c == &ocean_) request.set_adapter("ocean");
        start(c->name, prompt, std::move(request));
      }
    }
    for (Expected& expected : streams) {
      const Streamed got = expected.stream.get();
      ASSERT_TRUE(got.status.ok()) << expected.what << ": " << got.status.error_message();
      EXPECT_EQ(got.ids, expected.prompt->greedy) << expected.what;
    }
  }

  std::vector<GoldenCase> compositions_;
  GoldenCase ocean_;
  GoldenCase base_;
};

TEST_F(CompositionE2eTest, CompositionsServePeftsCatTokensBatchedOverBothApis) {
  ServerProcess server({"--http-port=0", "--lora-mode=unmerged"});
  auto inference = v1::Inference::NewStub(server.channel());
  const int http = server.http_port();
  ExpectGoldenStreamsConcurrently(*inference);

  // The HTTP completion of a composition is the gRPC one's text; model is
  // the base model's name, and the composition is not a listed model.
  const HttpReply models = HttpCall(http, "GET", "/v1/models", "");
  ASSERT_EQ(models.status, 200) << models.body;
  const nlohmann::json listed = models.Json();
  const std::string base_name = listed["data"][0]["id"];
  for (const nlohmann::json& model : listed["data"]) {
    EXPECT_FALSE(absl::StrContains(model["id"].get<std::string>(), "+")) << model.dump();
  }
  const GoldenCase& blend = compositions_[0];
  for (const GoldenPrompt& prompt : blend.prompts) {
    const Streamed grpc_stream = Generate(*inference, ComposedGreedy(prompt, blend.parts));
    ASSERT_TRUE(grpc_stream.status.ok());
    const HttpReply reply = HttpCall(http, "POST", "/v1/completions",
                                     HttpComposedBody(base_name, prompt, blend.parts).dump());
    ASSERT_EQ(reply.status, 200) << reply.body;
    EXPECT_EQ(reply.Json()["choices"][0]["text"], grpc_stream.text);
    EXPECT_EQ(reply.Json()["model"], base_name);
  }
  // Its requests are counted under a label that names the mix.
  EXPECT_GE(e2e::Metric(http,
                        "loraserve_requests_total{adapter=\"ocean*1+robot*0.5\","
                        "status=\"200\",tenant=\"default\"}"),
            static_cast<double>(blend.prompts.size()));
}

TEST_F(CompositionE2eTest, CompositionsServeOnMergedWeights) {
  ServerProcess server({"--http-port=0", "--lora-mode=merged", "--merged-cache-bytes=8388608"});
  auto inference = v1::Inference::NewStub(server.channel());
  // One composition at a time: every step is a single-adapter batch.
  for (const GoldenCase& c : compositions_) {
    for (const GoldenPrompt& prompt : c.prompts) {
      const Streamed got = Generate(*inference, ComposedGreedy(prompt, c.parts));
      ASSERT_TRUE(got.status.ok()) << c.name << ": " << got.status.error_message();
      EXPECT_EQ(got.ids, prompt.greedy) << c.name;
    }
  }
  const int http = server.http_port();
  EXPECT_GE(e2e::Metric(http, "loraserve_merges_total"), 2.0);
  EXPECT_GT(e2e::Metric(http, "loraserve_merged_steps_total"), 0.0);
}

TEST_F(CompositionE2eTest, BadCompositionsGetClearErrorsAndTheServerKeepsServing) {
  ServerProcess server({"--http-port=0", "--max-lora-rank=20"});
  auto inference = v1::Inference::NewStub(server.channel());
  const int http = server.http_port();
  const GoldenPrompt& prompt = compositions_[0].prompts[1];
  auto request = [&](std::vector<std::pair<std::string, float>> parts) {
    std::vector<test_support::GoldenPart> golden_parts;
    for (auto& [id, weight] : parts) golden_parts.push_back({id, "", weight});
    return ComposedGreedy(prompt, golden_parts);
  };
  struct Refused {
    v1::GenerateRequest request;
    grpc::StatusCode code;
    std::string message;
  };
  v1::GenerateRequest both = request({{"ocean", 1}});
  both.set_adapter("robot");
  std::vector<std::pair<std::string, float>> nine(9, {"ocean", 1});
  const std::vector<Refused> refused = {
      {both, grpc::StatusCode::INVALID_ARGUMENT, "not both"},
      {request({{"ocean", 1}, {"nope", 1}}), grpc::StatusCode::NOT_FOUND, "nope"},
      {request({{"ocean", 1}, {"default/ocean", 0.5}}), grpc::StatusCode::INVALID_ARGUMENT,
       "named twice"},
      {request(nine), grpc::StatusCode::INVALID_ARGUMENT, "1 to 8 adapters"},
      {request({{"ocean", 1}, {"robot", 1000}}), grpc::StatusCode::INVALID_ARGUMENT, "robot"},
      // Ranks 8 + 8 + 8 = 24 > --max-lora-rank 20.
      {request({{"ocean", 1}, {"robot", 1}, {"all-r8-bf16", 1}}),
       grpc::StatusCode::INVALID_ARGUMENT, "rank"},
  };
  for (const Refused& r : refused) {
    const grpc::Status status = GenerateStatus(*inference, r.request);
    EXPECT_EQ(status.error_code(), r.code) << status.error_message();
    EXPECT_TRUE(absl::StrContains(status.error_message(), r.message)) << status.error_message();
  }

  const HttpReply models = HttpCall(http, "GET", "/v1/models", "");
  const std::string base_name = models.Json()["data"][0]["id"];
  const std::vector<test_support::GoldenPart> parts = {{"ocean", "", 1}, {"robot", "", 0.5}};
  struct HttpRefused {
    nlohmann::json body;
    int status;
    std::string message;
  };
  nlohmann::json on_adapter = HttpComposedBody("ocean", prompt, parts);
  nlohmann::json unknown = HttpComposedBody(base_name, prompt, {{"nope", "", 1}});
  nlohmann::json ties = HttpComposedBody(base_name, prompt, parts);
  ties["merged_adapters"]["merge_strategy"] = "ties";
  nlohmann::json zero = HttpComposedBody(base_name, prompt, {{"ocean", "", 0}});
  nlohmann::json too_heavy = HttpComposedBody(base_name, prompt, {{"ocean", "", 101}});
  for (const HttpRefused& r : std::vector<HttpRefused>{
           {on_adapter, 400, "must name the base model"},
           {unknown, 404, "\"nope\" is not an adapter you can use"},
           {ties, 400, "supports only \"cat\""},
           {zero, 400, "non-zero numbers"},
           {too_heavy, 400, "weight"},
       }) {
    const HttpReply reply = HttpCall(http, "POST", "/v1/completions", r.body.dump());
    EXPECT_EQ(reply.status, r.status) << reply.body;
    const nlohmann::json error = reply.Json()["error"];
    EXPECT_TRUE(absl::StrContains(error.value("message", ""), r.message)) << reply.body;
  }

  // Nothing was lost: a valid composition and a plain adapter still serve.
  const Streamed composed = Generate(*inference, ComposedGreedy(prompt, compositions_[0].parts));
  ASSERT_TRUE(composed.status.ok()) << composed.status.error_message();
  EXPECT_EQ(composed.ids, prompt.greedy);
  const Streamed plain = Generate(*inference, Greedy("Once upon a time", 8, "ocean"));
  EXPECT_TRUE(plain.status.ok()) << plain.status.error_message();
}

}  // namespace
}  // namespace loraserve
