// The real server on the goldens' random models, serving the PEFT features
// other servers refuse: DoRA, LoRA on embed_tokens and lm_head, and
// modules_to_save. Each adapter is loaded or uploaded over gRPC or HTTP, says
// what it is in its info over both APIs, and generates peft's greedy tokens
// while the base model and the other adapters stream beside it in the same
// batches; the HTTP completion of a prompt is the gRPC one's text. Requests
// the server cannot serve exactly get a clear error and nothing else changes.
#include <filesystem>
#include <future>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "tests/e2e/e2e_lib.h"
#include "tests/support/golden_cases.h"

namespace loraserve {
namespace {

namespace fs = std::filesystem;
using e2e::Generate;
using e2e::Greedy;
using e2e::HttpCall;
using e2e::HttpReply;
using e2e::ServerProcess;
using e2e::Streamed;
using test_support::GoldenCase;
using test_support::GoldenPrompt;

const GoldenCase& Find(const std::vector<GoldenCase>& cases, const std::string& name) {
  for (const GoldenCase& c : cases) {
    if (c.name == name) return c;
  }
  ADD_FAILURE() << "no golden case " << name;
  static const GoldenCase* const kNone = new GoldenCase();
  return *kNone;
}

// A server on `model` (a golden model case) with no adapters of its own and
// the shared tokenizer: the random models have none, and their prompts are
// token ids (a vocabulary of 128 within the tokenizer's 512).
class GoldenModelServer {
 public:
  explicit GoldenModelServer(const GoldenCase& model)
      : empty_adapters_(fs::temp_directory_path() / ("loraserve-no-adapters-" + model.name)),
        server_(Flags(model, empty_adapters_)) {}
  ~GoldenModelServer() {
    std::error_code ignored;
    fs::remove_all(empty_adapters_, ignored);
  }
  ServerProcess& process() { return server_; }
  std::unique_ptr<v1::Inference::Stub> inference() {
    return v1::Inference::NewStub(server_.channel());
  }
  std::unique_ptr<v1::Adapters::Stub> adapters() {
    return v1::Adapters::NewStub(server_.channel());
  }

 private:
  static std::vector<std::string> Flags(const GoldenCase& model, const fs::path& adapters) {
    fs::create_directories(adapters);
    return {"--model=" + model.model_dir, "--tokenizer=" + e2e::kShared + "/models/aidreams-260k",
            "--adapter-dir=" + adapters.string(), "--http-port=0"};
  }
  fs::path empty_adapters_;
  ServerProcess server_;
};

v1::GenerateRequest GreedyIds(const GoldenPrompt& prompt, const std::string& adapter) {
  v1::GenerateRequest request = Greedy("", static_cast<int>(prompt.greedy.size()), adapter);
  request.mutable_token_ids()->mutable_ids()->Assign(prompt.ids.begin(), prompt.ids.end());
  return request;
}

// Every prompt of every case at once, `adapter_ids` naming each case's adapter
// ("" for the model case): each stream must be peft's greedy tokens.
void ExpectGoldenStreamsConcurrently(GoldenModelServer& server,
                                     const std::map<std::string, const GoldenCase*>& cases) {
  std::vector<std::pair<std::string, std::future<Streamed>>> streams;
  for (const auto& [adapter, golden] : cases) {
    for (const GoldenPrompt& prompt : golden->prompts) {
      streams.emplace_back(adapter, std::async(std::launch::async, [&server, &prompt, adapter] {
                             return Generate(*server.inference(), GreedyIds(prompt, adapter));
                           }));
    }
  }
  std::map<std::string, int> next_prompt;
  for (auto& [adapter, stream] : streams) {
    const Streamed got = stream.get();
    const GoldenPrompt& prompt = cases.at(adapter)->prompts[next_prompt[adapter]++];
    ASSERT_TRUE(got.status.ok()) << adapter << ": " << got.status.error_message();
    EXPECT_EQ(got.ids, prompt.greedy)
        << "adapter \"" << adapter << "\" (case " << cases.at(adapter)->name << ")";
  }
}

// POST /v1/completions of `prompt` as token ids, greedy.
HttpReply HttpGreedy(int port, const std::string& model, const GoldenPrompt& prompt,
                     double adapter_scale = 1) {
  nlohmann::json body = {{"model", model},
                         {"prompt", prompt.ids},
                         {"max_tokens", prompt.greedy.size()},
                         {"temperature", 0},
                         {"ignore_eos", true}};
  if (adapter_scale != 1) body["adapter_scale"] = adapter_scale;
  return HttpCall(port, "POST", "/v1/completions", body.dump());
}

std::string Joined(const nlohmann::json& strings) {
  return absl::StrJoin(strings.get<std::vector<std::string>>(), ",");
}

class PeftFeaturesE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::vector<GoldenCase>> models = test_support::LoadModelCases();
    absl::StatusOr<std::vector<GoldenCase>> adapters = test_support::LoadAdapterCases();
    ASSERT_TRUE(models.ok()) << models.status();
    ASSERT_TRUE(adapters.ok()) << adapters.status();
    models_ = *std::move(models);
    adapters_ = *std::move(adapters);
  }
  std::vector<GoldenCase> models_;
  std::vector<GoldenCase> adapters_;
};

TEST_F(PeftFeaturesE2eTest, DoraAndHeadLoraServeBesideTheBaseOverBothApis) {
  const GoldenCase& dora = Find(adapters_, "dora");
  const GoldenCase& heads = Find(adapters_, "embed-lm-head");
  ASSERT_EQ(dora.base, "untied");
  ASSERT_EQ(heads.base, "untied");
  GoldenModelServer server(Find(models_, "untied"));
  const int http = server.process().http_port();

  // DoRA over gRPC's Load, the head LoRA over an HTTP upload.
  v1::AdapterInfo dora_info;
  {
    grpc::ClientContext context;
    v1::LoadAdapterRequest load;
    load.set_id("dora");
    load.set_path(dora.adapter_dir);
    const grpc::Status status = server.adapters()->Load(&context, load, &dora_info);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  EXPECT_TRUE(dora_info.dora());
  EXPECT_EQ(dora_info.target_modules_size(), 7);
  const HttpReply uploaded = e2e::HttpUpload(http, "heads", heads.adapter_dir);
  ASSERT_EQ(uploaded.status, 201) << uploaded.body;
  const nlohmann::json heads_json = uploaded.Json();
  EXPECT_EQ(heads_json["dora"], false);
  EXPECT_EQ(Joined(heads_json["target_modules"]), "q_proj,v_proj,embed_tokens,lm_head");
  // peft saved the embedding and lm_head it targets beside the A/B pairs
  // (base_layer copies): they are the adapter's own, as saved modules.
  EXPECT_EQ(Joined(heads_json["modules_to_save"]), "lm_head,model.embed_tokens");
  const HttpReply dora_json = HttpCall(http, "GET", "/v1/adapters/dora");
  ASSERT_EQ(dora_json.status, 200) << dora_json.body;
  EXPECT_EQ(dora_json.Json()["dora"], true);

  ExpectGoldenStreamsConcurrently(
      server, {{"", &Find(models_, "untied")}, {"dora", &dora}, {"heads", &heads}});

  // The REST completion is the gRPC one.
  for (const auto& [adapter, golden] :
       std::vector<std::pair<std::string, const GoldenCase*>>{{"dora", &dora}, {"heads", &heads}}) {
    const Streamed grpc_stream =
        Generate(*server.inference(), GreedyIds(golden->prompts[0], adapter));
    const HttpReply rest = HttpGreedy(http, adapter, golden->prompts[0]);
    ASSERT_EQ(rest.status, 200) << rest.body;
    EXPECT_EQ(rest.Json()["choices"][0]["text"], grpc_stream.text) << adapter;
  }

  // DoRA's norm is of W + s·B·A at the adapter's own scale: another scale is
  // refused on both APIs (as peft has no such thing), and the server goes on.
  v1::GenerateRequest scaled = GreedyIds(dora.prompts[0], "dora");
  scaled.set_adapter_scale(0.5f);
  const Streamed refused = Generate(*server.inference(), scaled);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(refused.status.error_message().find("DoRA"), std::string::npos)
      << refused.status.error_message();
  const HttpReply rest_refused = HttpGreedy(http, "dora", dora.prompts[0], 0.5);
  EXPECT_EQ(rest_refused.status, 400) << rest_refused.body;
  EXPECT_NE(rest_refused.body.find("DoRA"), std::string::npos) << rest_refused.body;
  const HttpReply heads_scaled = HttpGreedy(http, "heads", heads.prompts[0], 0.5);
  EXPECT_EQ(heads_scaled.status, 200) << heads_scaled.body;
  ExpectGoldenStreamsConcurrently(server, {{"dora", &dora}});
}

TEST_F(PeftFeaturesE2eTest, SavedModulesServeOnlyTheirAdaptersTokensOverBothApis) {
  const GoldenCase& saved = Find(adapters_, "modules-to-save");
  ASSERT_EQ(saved.base, "sharded");
  GoldenModelServer server(Find(models_, "sharded"));
  const int http = server.process().http_port();

  // Over gRPC's streamed upload as "saved", over HTTP as "saved-too".
  const e2e::Uploaded uploaded =
      e2e::Upload(*server.adapters(), e2e::UploadMessages("saved", saved.adapter_dir));
  ASSERT_TRUE(uploaded.status.ok()) << uploaded.status.error_message();
  EXPECT_FALSE(uploaded.info.dora());
  const std::vector<std::string> saved_modules(uploaded.info.saved_modules().begin(),
                                               uploaded.info.saved_modules().end());
  EXPECT_NE(std::find(saved_modules.begin(), saved_modules.end(), "lm_head"), saved_modules.end())
      << absl::StrJoin(saved_modules, ",");
  EXPECT_NE(std::find(saved_modules.begin(), saved_modules.end(), "model.norm"),
            saved_modules.end())
      << absl::StrJoin(saved_modules, ",");
  const HttpReply also = e2e::HttpUpload(http, "saved-too", saved.adapter_dir);
  ASSERT_EQ(also.status, 201) << also.body;
  EXPECT_EQ(Joined(also.Json()["modules_to_save"]), absl::StrJoin(saved_modules, ","));
  // The same files make the same adapter, saved copies counted, over both APIs.
  EXPECT_EQ(also.Json()["bytes"], uploaded.info.bytes());

  ExpectGoldenStreamsConcurrently(
      server, {{"", &Find(models_, "sharded")}, {"saved", &saved}, {"saved-too", &saved}});
  const Streamed grpc_stream = Generate(*server.inference(), GreedyIds(saved.prompts[0], "saved"));
  const HttpReply rest = HttpGreedy(http, "saved-too", saved.prompts[0]);
  ASSERT_EQ(rest.status, 200) << rest.body;
  EXPECT_EQ(rest.Json()["choices"][0]["text"], grpc_stream.text);
}

TEST_F(PeftFeaturesE2eTest, DoraOnTheLmHeadOfATiedBiasedModel) {
  const GoldenCase& dora = Find(adapters_, "dora-qwen2");
  ASSERT_EQ(dora.base, "qwen2");
  GoldenModelServer server(Find(models_, "qwen2"));
  const HttpReply uploaded = e2e::HttpUpload(server.process().http_port(), "dq", dora.adapter_dir);
  ASSERT_EQ(uploaded.status, 201) << uploaded.body;
  EXPECT_EQ(uploaded.Json()["dora"], true);
  EXPECT_EQ(Joined(uploaded.Json()["modules_to_save"]), "lm_head");
  ExpectGoldenStreamsConcurrently(server, {{"", &Find(models_, "qwen2")}, {"dq", &dora}});
}

}  // namespace
}  // namespace loraserve
