// The real `loraserve serve` binary on a loopback port, driven over gRPC.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/wait.h>

#include <atomic>
#include <fstream>
#include <future>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/sha256.h"
#include "gtest/gtest.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "tests/e2e/e2e_lib.h"

namespace loraserve {
namespace {

using e2e::Generate;
using e2e::Greedy;
using e2e::kShared;
using e2e::ServerProcess;
using e2e::Streamed;
using e2e::Upload;
using e2e::Uploaded;
using e2e::UploadMessages;

class GrpcE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = new ServerProcess(); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  std::unique_ptr<v1::Inference::Stub> inference() {
    return v1::Inference::NewStub(server_->channel());
  }
  std::unique_ptr<v1::Adapters::Stub> adapters() {
    return v1::Adapters::NewStub(server_->channel());
  }
  static ServerProcess* server_;
};

ServerProcess* GrpcE2eTest::server_ = nullptr;

TEST_F(GrpcE2eTest, GenerateStreamsWithAndWithoutAdapters) {
  auto stub = inference();
  Streamed base = Generate(*stub, Greedy("", 24));
  ASSERT_TRUE(base.status.ok()) << base.status.error_message();
  EXPECT_TRUE(absl::StartsWith(base.text, "\"Echoes of vectors unfold")) << base.text;
  EXPECT_EQ(base.finish, "length");
  EXPECT_EQ(base.completion_tokens, 24);
  Streamed ocean = Generate(*stub, Greedy("", 24, "ocean"));
  ASSERT_TRUE(ocean.status.ok()) << ocean.status.error_message();
  EXPECT_TRUE(absl::StartsWith(ocean.text, "At low tide the rock pools shine")) << ocean.text;
  Streamed robot = Generate(*stub, Greedy("", 24, "default/robot"));
  EXPECT_TRUE(absl::StartsWith(robot.text, "The robot charged its battery")) << robot.text;
}

TEST_F(GrpcE2eTest, ConcurrentStreamsOverAdaptersGetTheirOwnTokens) {
  const std::vector<std::string> adapters = {"", "ocean", "robot", "qv-r4", "attn-r8"};
  auto stub = inference();
  std::map<std::string, std::vector<int32_t>> alone;
  for (const std::string& a : adapters) {
    Streamed streamed = Generate(*stub, Greedy("The", 16, a));
    ASSERT_TRUE(streamed.status.ok()) << a << ": " << streamed.status.error_message() << "\n"
                                      << server_->log();
    alone[a] = streamed.ids;
  }
  constexpr int kStreams = 64;
  std::vector<Streamed> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      auto own_stub = inference();
      results[i] = Generate(*own_stub, Greedy("The", 16, adapters[i % adapters.size()]));
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message() << "\n"
                                        << server_->log();
    EXPECT_EQ(results[i].ids, alone[adapters[i % adapters.size()]]) << "stream " << i;
  }
}

v1::StatsResponse Stats(v1::Inference::Stub& stub) {
  grpc::ClientContext context;
  v1::StatsResponse stats;
  EXPECT_TRUE(stub.Stats(&context, {}, &stats).ok());
  return stats;
}

// Polls Stats until the engine has stepped past `steps` and then nothing
// runs and no KV block is in use (or 2 s pass). Stats is refreshed after each
// step, while a stream may see its first token during the step: the step
// count tells the refreshed view from the one before the request.
v1::StatsResponse WaitForIdle(v1::Inference::Stub& stub, int64_t steps) {
  v1::StatsResponse stats;
  for (int i = 0; i < 200; ++i) {
    stats = Stats(stub);
    if (stats.steps() > steps && stats.kv_blocks_used() == 0 && stats.running() == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return stats;
}

// A client cancel ends the request in the engine: its KV blocks are free, and
// it took fewer steps than running to max_tokens would (one step per token on
// an otherwise idle server). A passed deadline ends the stream the same way.
TEST(GrpcCancelTest, CancelledStreamFreesItsKvBlocks) {
  // A server of its own on the shared model with an 8192-token context: 6000
  // steps outlast the cancel's way to the engine even on a loaded machine
  // (120 steps, the shared model's whole context, take about 10 ms).
  ServerProcess server({"--model=" + e2e::LongContextModel()});
  auto stub = v1::Inference::NewStub(server.channel());
  constexpr int kMaxTokens = 6000;
  const int64_t steps_before = Stats(*stub).steps();
  {
    grpc::ClientContext context;
    auto reader = stub->Generate(&context, Greedy("", kMaxTokens));
    v1::GenerateResponse response;
    ASSERT_TRUE(reader->Read(&response));
    context.TryCancel();
    while (reader->Read(&response)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  v1::StatsResponse stats = WaitForIdle(*stub, steps_before);
  EXPECT_EQ(stats.running(), 0);
  EXPECT_EQ(stats.kv_blocks_used(), 0);
  EXPECT_GT(stats.kv_blocks_total(), 0);
  EXPECT_LT(stats.steps() - steps_before, kMaxTokens) << "the request was not cut short";

  const int64_t steps_before_deadline = stats.steps();
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(5));
    auto reader = stub->Generate(&context, Greedy("", kMaxTokens));
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  // Not checked here: that the deadline cut the request short. Whether the
  // server's deadline timer fires before 120 fast steps are done depends on
  // how busy the machine is.
  stats = WaitForIdle(*stub, steps_before_deadline);
  EXPECT_EQ(stats.running(), 0);
  EXPECT_EQ(stats.kv_blocks_used(), 0);
}

TEST_F(GrpcE2eTest, MalformedRequestsGetTheirCodesAndTheServerKeepsServing) {
  auto stub = inference();
  v1::GenerateRequest empty_prompt = Greedy("", 4);
  empty_prompt.mutable_token_ids();  // an empty id list
  v1::GenerateRequest no_prompt = Greedy("", 4);
  no_prompt.clear_prompt();
  v1::GenerateRequest bad_temperature = Greedy("a", 4);
  bad_temperature.mutable_sampling()->set_temperature(-1.0f);
  const std::vector<std::pair<v1::GenerateRequest, grpc::StatusCode>> cases = {
      {empty_prompt, grpc::StatusCode::INVALID_ARGUMENT},
      {no_prompt, grpc::StatusCode::INVALID_ARGUMENT},
      {Greedy("a", 0), grpc::StatusCode::INVALID_ARGUMENT},
      {Greedy("a", 500), grpc::StatusCode::INVALID_ARGUMENT},
      {bad_temperature, grpc::StatusCode::INVALID_ARGUMENT},
      {Greedy("a", 4, "bad id!"), grpc::StatusCode::INVALID_ARGUMENT},
      {Greedy("a", 4, "nope"), grpc::StatusCode::NOT_FOUND},
  };
  for (const auto& [request, code] : cases) {
    Streamed out = Generate(*stub, request);
    EXPECT_EQ(out.status.error_code(), code)
        << request.ShortDebugString() << ": " << out.status.error_message();
    EXPECT_FALSE(out.status.error_message().empty());
  }
  EXPECT_TRUE(Generate(*stub, Greedy("a", 4)).status.ok());
}

TEST_F(GrpcE2eTest, TokenIdsPromptLogprobsAndStopStrings) {
  auto stub = inference();
  const Streamed text = Generate(*stub, Greedy("", 24));
  ASSERT_TRUE(text.status.ok()) << text.status.error_message();

  v1::GenerateRequest by_ids = Greedy("", 24);
  by_ids.mutable_token_ids()->add_ids(1);  // BOS: what the empty text encodes to
  by_ids.set_logprobs(3);
  const Streamed ids = Generate(*stub, by_ids);
  ASSERT_TRUE(ids.status.ok()) << ids.status.error_message();
  EXPECT_EQ(ids.ids, text.ids);
  for (const v1::GenerateResponse& response : ids.responses) {
    ASSERT_EQ(response.top_logprobs_size(), 3);
    // Greedy: the chosen token is the most likely alternative.
    EXPECT_EQ(response.top_logprobs(0).token_id(), response.token_id());
    EXPECT_FLOAT_EQ(response.top_logprobs(0).logprob(), response.logprob());
    EXPECT_LE(response.logprob(), 0.0f);
  }
  EXPECT_EQ(ids.responses.back().usage().prompt_tokens(), 1);

  v1::GenerateRequest stopped = Greedy("", 24);
  stopped.add_stop("vectors");
  const Streamed out = Generate(*stub, stopped);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.text, "\"Echoes of ");
  EXPECT_EQ(out.finish, "stop");
}

// grpc.health.v1.Health/Check through the generic stub (the health proto's
// C++ stubs are not installed): an empty request asks about the whole server.
TEST_F(GrpcE2eTest, HealthCheckReportsServing) {
  grpc::Status status;
  EXPECT_EQ(e2e::HealthStatus(server_->channel(), &status), 1) << status.error_message();
}

TEST_F(GrpcE2eTest, TokenizeAndDetokenize) {
  auto stub = inference();
  grpc::ClientContext tokenize_context;
  v1::TokenizeRequest request;
  request.set_text("At low tide");
  request.set_add_special_tokens(true);
  v1::TokenizeResponse tokens;
  ASSERT_TRUE(stub->Tokenize(&tokenize_context, request, &tokens).ok());
  ASSERT_GT(tokens.token_ids_size(), 1);
  EXPECT_EQ(tokens.token_ids(0), 1);  // BOS
  grpc::ClientContext detokenize_context;
  v1::DetokenizeRequest back;
  back.mutable_token_ids()->CopyFrom(tokens.token_ids());
  back.set_skip_special_tokens(true);
  v1::DetokenizeResponse text;
  ASSERT_TRUE(stub->Detokenize(&detokenize_context, back, &text).ok());
  EXPECT_EQ(text.text(), "At low tide");

  grpc::ClientContext bad_context;
  v1::DetokenizeRequest bad;
  bad.add_token_ids(1);
  bad.add_token_ids(1 << 30);
  const grpc::Status status = stub->Detokenize(&bad_context, bad, &text);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StartsWith(status.error_message(), "token_ids[1]")) << status.error_message();
}

TEST_F(GrpcE2eTest, AdapterLoadListGetUnload) {
  auto stub = adapters();
  {
    grpc::ClientContext context;
    v1::ListAdaptersResponse list;
    ASSERT_TRUE(stub->List(&context, {}, &list).ok());
    EXPECT_EQ(list.adapters_size(), 6);
  }
  v1::LoadAdapterRequest load;
  load.set_id("acme/sea");
  load.set_path(kShared + "/adapters/aidreams-260k/ocean");
  v1::AdapterInfo info;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Load(&context, load, &info).ok());
  }
  EXPECT_EQ(info.id(), "acme/sea");
  EXPECT_EQ(info.version(), 1);
  EXPECT_EQ(info.content_hash().size(), 64u);
  {
    grpc::ClientContext context;
    v1::GetAdapterRequest get;
    get.set_id("acme/sea");
    v1::AdapterInfo got;
    ASSERT_TRUE(stub->Get(&context, get, &got).ok());
    EXPECT_EQ(got.content_hash(), info.content_hash());
    EXPECT_EQ(got.ranks(0), 8);
  }
  // The new id generates like the adapter it was loaded from, and shares its
  // device copy (same content hash): the second stream uploads nothing.
  auto inference_stub = inference();
  const int64_t steps_before = Stats(*inference_stub).steps();
  const Streamed sea = Generate(*inference_stub, Greedy("", 12, "acme/sea"));
  const v1::StatsResponse after_sea = WaitForIdle(*inference_stub, steps_before);
  const Streamed ocean = Generate(*inference_stub, Greedy("", 12, "ocean"));
  const v1::StatsResponse after_ocean = WaitForIdle(*inference_stub, after_sea.steps());
  EXPECT_EQ(sea.ids, ocean.ids);
  EXPECT_EQ(after_ocean.device_adapter_uploads(), after_sea.device_adapter_uploads());
  EXPECT_GE(after_ocean.device_adapters_resident(), 1);
  EXPECT_GT(after_ocean.device_adapter_bytes(), 0);
  {
    grpc::ClientContext context;
    v1::UnloadAdapterRequest unload;
    unload.set_id("acme/sea");
    v1::UnloadAdapterResponse done;
    ASSERT_TRUE(stub->Unload(&context, unload, &done).ok());
  }
  EXPECT_EQ(Generate(*inference_stub, Greedy("", 4, "acme/sea")).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
  {
    grpc::ClientContext context;
    v1::LoadAdapterRequest broken;
    broken.set_id("acme/broken");
    broken.set_path(kShared + "/models/aidreams-260k");  // a model, not an adapter
    v1::AdapterInfo ignored;
    const grpc::Status status = stub->Load(&context, broken, &ignored);
    EXPECT_FALSE(status.ok());
    EXPECT_FALSE(status.error_message().empty());
  }
}

TEST_F(GrpcE2eTest, UploadValidatesBeforeTheAdapterBecomesVisible) {
  auto stub = adapters();
  auto inference_stub = inference();
  const Uploaded ok = Upload(*stub, UploadMessages("acme/uploaded", "ocean"));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.info.id(), "acme/uploaded");
  EXPECT_EQ(ok.info.version(), 1);
  EXPECT_TRUE(ok.info.resident_host());
  EXPECT_EQ(Generate(*inference_stub, Greedy("", 12, "acme/uploaded")).ids,
            Generate(*inference_stub, Greedy("", 12, "ocean")).ids);

  std::vector<v1::UploadAdapterRequest> wrong_hash = UploadMessages("acme/bad", "ocean");
  wrong_hash[0].mutable_header()->set_sha256(std::string(64, '0'));
  std::vector<v1::UploadAdapterRequest> after_last = UploadMessages("acme/bad", "ocean");
  after_last.push_back(after_last.back());
  std::vector<v1::UploadAdapterRequest> past_size = UploadMessages("acme/bad", "ocean");
  past_size.back().mutable_chunk()->mutable_data()->append("x");
  past_size.back().mutable_chunk()->set_last(false);
  std::vector<v1::UploadAdapterRequest> short_stream = UploadMessages("acme/bad", "ocean");
  short_stream.pop_back();
  std::vector<v1::UploadAdapterRequest> oversized = UploadMessages("acme/bad", "ocean");
  oversized[0].mutable_header()->set_total_bytes(2000000);  // --max-upload-bytes=1000000
  std::vector<v1::UploadAdapterRequest> no_header = UploadMessages("acme/bad", "ocean");
  no_header.erase(no_header.begin());
  std::vector<v1::UploadAdapterRequest> bad_id = UploadMessages("acme/bad id", "ocean");
  std::vector<v1::UploadAdapterRequest> bad_config = UploadMessages("acme/bad", "ocean");
  bad_config[0].mutable_header()->set_adapter_config_json("{\"r\": 8}");
  const std::vector<std::pair<std::vector<v1::UploadAdapterRequest>, grpc::StatusCode>> cases = {
      {wrong_hash, grpc::StatusCode::DATA_LOSS},
      {after_last, grpc::StatusCode::INVALID_ARGUMENT},
      {past_size, grpc::StatusCode::INVALID_ARGUMENT},
      {short_stream, grpc::StatusCode::INVALID_ARGUMENT},
      {oversized, grpc::StatusCode::RESOURCE_EXHAUSTED},
      {no_header, grpc::StatusCode::INVALID_ARGUMENT},
      {bad_id, grpc::StatusCode::INVALID_ARGUMENT},
      {bad_config, grpc::StatusCode::INVALID_ARGUMENT},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Uploaded bad = Upload(*stub, cases[i].first);
    EXPECT_EQ(bad.status.error_code(), cases[i].second)
        << "case " << i << ": " << bad.status.error_message();
    EXPECT_FALSE(bad.status.error_message().empty()) << "case " << i;
  }
  // None of them became visible; the server keeps serving.
  grpc::ClientContext context;
  v1::GetAdapterRequest get;
  get.set_id("acme/bad");
  v1::AdapterInfo info;
  EXPECT_EQ(stub->Get(&context, get, &info).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(Generate(*inference_stub, Greedy("", 4, "acme/uploaded")).status.ok());
}

// Streams on the base model and two adapters run throughout while an
// uploaded adapter is used, replaced and unloaded: none fails or changes its
// tokens, and a stream that started on the first version finishes on it.
TEST_F(GrpcE2eTest, UploadUseReplaceUnloadWhileStreamsRun) {
  auto stub = adapters();
  auto inference_stub = inference();
  const std::vector<std::string> background = {"", "ocean", "robot"};
  std::map<std::string, std::vector<int32_t>> alone;
  for (const std::string& a : background) {
    alone[a] = Generate(*inference_stub, Greedy("The", 20, a)).ids;
  }
  const std::vector<int32_t> ocean_long = Generate(*inference_stub, Greedy("", 100, "ocean")).ids;
  const std::vector<int32_t> robot_long = Generate(*inference_stub, Greedy("", 100, "robot")).ids;
  ASSERT_NE(ocean_long, robot_long);

  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<int> completed{0};
  std::vector<std::thread> clients;
  for (size_t i = 0; i < 6; ++i) {
    clients.emplace_back([&, i] {
      auto own = inference();
      const std::string& a = background[i % background.size()];
      while (!stop) {
        const Streamed out = Generate(*own, Greedy("The", 20, a));
        if (!out.status.ok() || out.ids != alone[a]) ++failures;
        ++completed;
      }
    });
  }

  ASSERT_TRUE(Upload(*stub, UploadMessages("acme/live", "ocean")).status.ok());
  // A long stream starts on version 1 ...
  grpc::ClientContext long_context;
  auto long_reader = inference_stub->Generate(&long_context, Greedy("", 100, "acme/live"));
  std::vector<int32_t> long_ids;
  v1::GenerateResponse response;
  ASSERT_TRUE(long_reader->Read(&response));
  long_ids.push_back(response.token_id());
  // ... the id is replaced by other weights (version 2) ...
  const Uploaded replaced = Upload(*stub, UploadMessages("acme/live", "robot"));
  ASSERT_TRUE(replaced.status.ok()) << replaced.status.error_message();
  EXPECT_EQ(replaced.info.version(), 2);
  EXPECT_EQ(Generate(*inference_stub, Greedy("", 100, "acme/live")).ids, robot_long);
  // ... and unloaded. The first stream, admitted on version 1 before both
  // (it has sent a token), gets version 1's tokens throughout.
  {
    grpc::ClientContext context;
    v1::UnloadAdapterRequest unload;
    unload.set_id("acme/live");
    v1::UnloadAdapterResponse done;
    ASSERT_TRUE(stub->Unload(&context, unload, &done).ok());
  }
  EXPECT_EQ(Generate(*inference_stub, Greedy("", 4, "acme/live")).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
  while (long_reader->Read(&response)) long_ids.push_back(response.token_id());
  EXPECT_TRUE(long_reader->Finish().ok());
  EXPECT_EQ(long_ids, ocean_long);

  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(failures, 0);
  EXPECT_GT(completed, 0);
}

// Server reflection lists the services, through the generic stub: a
// ServerReflectionRequest with list_services (field 7) set to "", and the
// response's ListServiceResponse names them.
TEST_F(GrpcE2eTest, ReflectionListsTheServices) {
  grpc::GenericStub stub(server_->channel());
  grpc::ClientContext context;
  grpc::CompletionQueue queue;
  void* tag;
  bool ok;
  auto call = stub.PrepareCall(
      &context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &queue);
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(queue.Next(&tag, &ok) && ok);
  grpc::Slice request_slice(std::string("\x3a\x00", 2));
  grpc::ByteBuffer request(&request_slice, 1);
  call->Write(request, reinterpret_cast<void*>(2));
  ASSERT_TRUE(queue.Next(&tag, &ok) && ok);
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(3));
  ASSERT_TRUE(queue.Next(&tag, &ok) && ok);
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(queue.Next(&tag, &ok));
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  ASSERT_TRUE(queue.Next(&tag, &ok));
  EXPECT_TRUE(status.ok()) << status.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(response.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  for (const char* service :
       {"loraserve.v1.Inference", "loraserve.v1.Adapters", "grpc.health.v1.Health"}) {
    EXPECT_TRUE(absl::StrContains(bytes, service)) << service;
  }
}

// A separate server with room for one running and one queued request: a
// burst gets RESOURCE_EXHAUSTED for some streams, the rest their tokens, and
// the server keeps serving.
TEST(GrpcQueueTest, FullQueueIsResourceExhausted) {
  ServerProcess server({"--max-queued-requests=1", "--max-running-requests=1"});
  auto stub = v1::Inference::NewStub(server.channel());
  const std::vector<int32_t> alone = Generate(*stub, Greedy("", 100)).ids;
  constexpr int kStreams = 16;
  std::vector<Streamed> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] { results[i] = Generate(*stub, Greedy("", 100)); });
  }
  for (auto& t : threads) t.join();
  int exhausted = 0;
  for (const Streamed& result : results) {
    if (result.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++exhausted;
      EXPECT_FALSE(result.status.error_message().empty());
    } else {
      EXPECT_TRUE(result.status.ok()) << result.status.error_message();
      EXPECT_EQ(result.ids, alone);
    }
  }
  EXPECT_GT(exhausted, 0);
  EXPECT_LT(exhausted, kStreams);
  EXPECT_EQ(Generate(*stub, Greedy("", 100)).ids, alone);
}

// A separate server whose host tier holds about two adapters: streams on
// adapters evicted from it wait while the server reads them back (off gRPC's
// threads) and get the same tokens as before.
TEST(GrpcHostBudgetTest, EvictedAdaptersReloadOnUse) {
  ServerProcess server({"--adapter-host-bytes=400000"});
  auto stub = v1::Inference::NewStub(server.channel());
  auto adapters = v1::Adapters::NewStub(server.channel());
  const std::vector<std::string> ids = {"ocean", "robot", "qv-r4", "attn-r8", "mlp-r16-rslora"};
  std::map<std::string, std::vector<int32_t>> first;
  for (int round = 0; round < 2; ++round) {
    for (const std::string& id : ids) {
      const Streamed out = Generate(*stub, Greedy("", 16, id));
      ASSERT_TRUE(out.status.ok()) << id << ": " << out.status.error_message();
      if (round == 0) {
        first[id] = out.ids;
      } else {
        EXPECT_EQ(out.ids, first[id]) << id;
      }
    }
  }
  EXPECT_TRUE(absl::StartsWith(Generate(*stub, Greedy("", 24, "ocean")).text,
                               "At low tide the rock pools shine"));
  grpc::ClientContext context;
  v1::ListAdaptersResponse list;
  ASSERT_TRUE(adapters->List(&context, {}, &list).ok());
  int resident = 0;
  for (const v1::AdapterInfo& info : list.adapters()) resident += info.resident_host();
  EXPECT_LT(resident, list.adapters_size());
}

v1::ListAdaptersResponse ListPage(v1::Adapters::Stub& stub, int32_t size, const std::string& token,
                                  grpc::Status* status) {
  grpc::ClientContext context;
  v1::ListAdaptersRequest request;
  request.set_page_size(size);
  request.set_page_token(token);
  v1::ListAdaptersResponse page;
  *status = stub.List(&context, request, &page);
  return page;
}

// --lazy-adapter-load: the start-up adapters are listed, with their ranks
// and bytes, before any of their weights is read; the first request reads
// them (and fixes the content hash) and gets the adapter's own tokens.
// Listing pages over gRPC (page_size / page_token) and HTTP (limit / after).
TEST(GrpcLazyStartupTest, AdaptersLoadOnFirstUseAndListsPage) {
  ServerProcess server({"--lazy-adapter-load", "--http-port=0"});
  auto stub = v1::Inference::NewStub(server.channel());
  auto adapters = v1::Adapters::NewStub(server.channel());
  grpc::Status status;
  v1::ListAdaptersResponse first = ListPage(*adapters, 4, "", &status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(first.adapters_size(), 4);
  for (const v1::AdapterInfo& info : first.adapters()) {
    EXPECT_FALSE(info.resident_host()) << info.id();
    EXPECT_EQ(info.content_hash(), "") << info.id();
    EXPECT_GT(info.bytes(), 0) << info.id();
    EXPECT_GT(info.ranks_size(), 0) << info.id();
  }
  EXPECT_EQ(first.next_page_token(), first.adapters(3).id());
  v1::ListAdaptersResponse second = ListPage(*adapters, 4, first.next_page_token(), &status);
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(second.adapters_size(), 2);  // six shared adapters
  EXPECT_EQ(second.next_page_token(), "");
  ListPage(*adapters, -1, "", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  EXPECT_TRUE(absl::StartsWith(Generate(*stub, Greedy("", 24, "ocean")).text,
                               "At low tide the rock pools shine"));
  grpc::ClientContext context;
  v1::GetAdapterRequest get;
  get.set_id("ocean");
  v1::AdapterInfo ocean;
  ASSERT_TRUE(adapters->Get(&context, get, &ocean).ok());
  EXPECT_TRUE(ocean.resident_host());
  EXPECT_EQ(ocean.content_hash().size(), 64u);

  const e2e::HttpReply page = e2e::HttpCall(server.http_port(), "GET", "/v1/adapters?limit=4");
  ASSERT_EQ(page.status, 200) << page.body;
  const nlohmann::json body = page.Json();
  EXPECT_EQ(body["data"].size(), 4u);
  EXPECT_EQ(body["has_more"], true);
  EXPECT_EQ(body["last_id"], body["data"][3]["id"]);
  const e2e::HttpReply rest =
      e2e::HttpCall(server.http_port(), "GET",
                    "/v1/adapters?limit=4&after=" + body["last_id"].get<std::string>());
  ASSERT_EQ(rest.status, 200) << rest.body;
  EXPECT_EQ(rest.Json()["data"].size(), 2u);
  EXPECT_EQ(rest.Json()["has_more"], false);
  EXPECT_EQ(e2e::HttpCall(server.http_port(), "GET", "/v1/adapters").Json()["data"].size(), 6u);
  for (const char* bad : {"/v1/adapters?limit=0", "/v1/adapters?limit=x", "/v1/adapters?limit=1001",
                          "/v1/adapters?after=nope"}) {
    const e2e::HttpReply refused = e2e::HttpCall(server.http_port(), "GET", bad);
    EXPECT_EQ(refused.status, 400) << bad << ": " << refused.body;
  }
}

}  // namespace
}  // namespace loraserve
