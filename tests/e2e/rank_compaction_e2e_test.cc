// Rank compaction over real sockets: the server's --compact-adapters-energy
// applies to the adapters it starts with and to loads that do not choose; a
// gRPC Load, a gRPC Upload and an HTTP upload may choose their own target or
// none; each adapter's info over both APIs shows the target, the ranks and
// bytes before, and every module's spectrum; bad targets get clear errors and
// the server keeps serving.
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "tests/e2e/e2e_lib.h"

namespace loraserve {
namespace {

using e2e::AdapterDir;
using e2e::Generate;
using e2e::Greedy;
using e2e::HttpCall;
using e2e::HttpReply;
using e2e::ServerProcess;

grpc::Status Load(v1::Adapters::Stub& stub, const v1::LoadAdapterRequest& request,
                  v1::AdapterInfo* info) {
  grpc::ClientContext context;
  return stub.Load(&context, request, info);
}

v1::LoadAdapterRequest OceanAs(const std::string& id) {
  v1::LoadAdapterRequest request;
  request.set_id(id);
  request.set_path(AdapterDir("ocean"));
  return request;
}

TEST(RankCompactionE2eTest, CompactsByFlagAndPerLoadOverBothApis) {
  ServerProcess server({"--http-port=0", "--compact-adapters-energy=0.95"});
  auto adapters = v1::Adapters::NewStub(server.channel());
  auto inference = v1::Inference::NewStub(server.channel());

  // The start-up adapters are compacted by the flag.
  v1::AdapterInfo ocean;
  {
    grpc::ClientContext context;
    v1::GetAdapterRequest get;
    get.set_id("ocean");
    ASSERT_TRUE(adapters->Get(&context, get, &ocean).ok());
  }
  ASSERT_TRUE(ocean.has_compaction());
  EXPECT_DOUBLE_EQ(ocean.compaction().min_energy(), 0.95);
  EXPECT_LT(ocean.bytes(), ocean.compaction().bytes_before());
  ASSERT_GT(ocean.compaction().modules_size(), 0);
  const v1::ModuleSpectrum& first = ocean.compaction().modules(0);
  EXPECT_EQ(first.module(), "layers.0.q_proj");
  EXPECT_EQ(first.rank_before(), 8);
  EXPECT_EQ(first.energy_size(), 8);
  EXPECT_GE(first.kept_energy(), 0.95);

  // A Load may turn it off, or choose an error bound.
  v1::LoadAdapterRequest off = OceanAs("acme/ocean-full");
  off.mutable_compaction()->set_min_energy(1);
  v1::AdapterInfo full;
  ASSERT_TRUE(Load(*adapters, off, &full).ok());
  EXPECT_FALSE(full.has_compaction());
  EXPECT_EQ(full.bytes(), ocean.compaction().bytes_before());
  v1::LoadAdapterRequest bounded = OceanAs("acme/ocean-bounded");
  bounded.mutable_compaction()->set_max_relative_error(0.1);
  v1::AdapterInfo bounded_info;
  ASSERT_TRUE(Load(*adapters, bounded, &bounded_info).ok());
  EXPECT_NEAR(bounded_info.compaction().min_energy(), 0.99, 1e-12);
  EXPECT_GE(bounded_info.bytes(), ocean.bytes());
  EXPECT_NE(bounded_info.content_hash(), full.content_hash());

  // All of them serve, beside each other.
  for (const std::string id : {"ocean", "acme/ocean-full", "acme/ocean-bounded"}) {
    const e2e::Streamed stream = Generate(*inference, Greedy("Once upon a time", 16, id));
    EXPECT_TRUE(stream.status.ok()) << id << ": " << stream.status.error_message();
    EXPECT_EQ(stream.completion_tokens, 16) << id;
  }

  // Bad targets over gRPC, before anything is read or written.
  v1::LoadAdapterRequest too_much = OceanAs("acme/bad");
  too_much.mutable_compaction()->set_min_energy(1.5);
  v1::AdapterInfo ignored;
  grpc::Status status = Load(*adapters, too_much, &ignored);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "min_energy is 1.5"))
      << status.error_message();
  v1::LoadAdapterRequest empty = OceanAs("acme/bad");
  empty.mutable_compaction();
  status = Load(*adapters, empty, &ignored);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "exactly one of"))
      << status.error_message();
  std::vector<v1::UploadAdapterRequest> messages = e2e::UploadMessages("acme/bad", "robot");
  messages[0].mutable_header()->mutable_compaction()->set_max_relative_error(1);
  const e2e::Uploaded upload = e2e::Upload(*adapters, messages);
  EXPECT_EQ(upload.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(upload.status.error_message(), "max_relative_error"))
      << upload.status.error_message();
  // A gRPC upload with its own target.
  messages[0].mutable_header()->mutable_compaction()->set_min_energy(0.8);
  const e2e::Uploaded robot = e2e::Upload(*adapters, messages);
  ASSERT_TRUE(robot.status.ok()) << robot.status.error_message();
  EXPECT_DOUBLE_EQ(robot.info.compaction().min_energy(), 0.8);

  // Over HTTP: an upload field, the info in the upload's answer and GET.
  const int http = server.http_port();
  const HttpReply uploaded =
      e2e::HttpUpload(http, "mine", "robot", false, {{"compact_min_energy", "0.9"}});
  ASSERT_EQ(uploaded.status, 201) << uploaded.body;
  const nlohmann::json compaction = uploaded.Json()["compaction"];
  EXPECT_EQ(compaction["min_energy"], 0.9);
  ASSERT_FALSE(compaction["modules"].empty());
  EXPECT_EQ(compaction["modules"][0]["energy"].size(), compaction["modules"][0]["rank_before"]);
  const HttpReply got = HttpCall(http, "GET", "/v1/adapters/mine");
  ASSERT_EQ(got.status, 200) << got.body;
  EXPECT_EQ(got.Json()["compaction"], compaction);
  EXPECT_EQ(got.Json()["bytes"], uploaded.Json()["bytes"]);
  const HttpReply plain =
      e2e::HttpUpload(http, "plain", "robot", false, {{"compact_max_relative_error", "0"}});
  ASSERT_EQ(plain.status, 201) << plain.body;
  EXPECT_TRUE(plain.Json()["compaction"].is_null());

  for (const auto& [fields, message] :
       std::vector<std::pair<std::vector<std::pair<std::string, std::string>>, std::string>>{
           {{{"compact_min_energy", "lots"}}, "expected a number"},
           {{{"compact_min_energy", "0.9"}, {"compact_max_relative_error", "0.1"}}, "not both"},
           {{{"compact_min_energy", "0"}}, "min_energy is 0"}}) {
    const HttpReply refused = e2e::HttpUpload(http, "refused", "robot", false, fields);
    EXPECT_EQ(refused.status, 400) << refused.body;
    EXPECT_TRUE(absl::StrContains(refused.body, message)) << refused.body;
  }
  EXPECT_EQ(HttpCall(http, "GET", "/v1/adapters/refused").status, 404);
  const HttpReply completion =
      HttpCall(http, "POST", "/v1/completions", e2e::CompletionBody("mine", 8, false, "Hi"));
  EXPECT_EQ(completion.status, 200) << completion.body;
}

}  // namespace
}  // namespace loraserve
