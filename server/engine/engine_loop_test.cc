// The engine's scheduling (chunked prefill, fairness, cancellation) and the
// thread-safe EngineLoop around it.
#include "server/engine/engine_loop.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::engine {
namespace {

using ::loraserve::test_support::StatusIs;

const std::string& SharedModel() {
  static const std::string dir = std::string(LORASERVE_SHARED_DIR) + "/models/aidreams-260k";
  return dir;
}

// absl::Notification's handover, on std::mutex: TSan does not see the lock inside Debian's
// uninstrumented libabsl, so the results a callback left for the test would look raced.
class Notification {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    notified_ = true;
    cv_.notify_all();
  }
  bool WaitForNotificationWithTimeout(absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return notified_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool notified_ = false;
};

struct Fixture {
  explicit Fixture(EngineOptions options = {}) {
    backend = std::move(*kernels::CreateCpuBackend({}));
    model = std::move(*model::LlamaModel::Load(backend.get(), SharedModel(), {}));
    cache = std::move(*KvCache::Create(backend.get(), model->kv_shape(), 16, 64 << 20));
    engine = std::make_unique<Engine>(model.get(), nullptr, cache.get(), nullptr, options);
  }
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<model::LlamaModel> model;
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<Engine> engine;
};

GenerationRequest Greedy(std::vector<int32_t> prompt, int32_t max_tokens,
                         std::string tenant = "") {
  GenerationRequest r;
  r.prompt_ids = std::move(prompt);
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  r.sampling.temperature = 0.0f;
  r.tenant = std::move(tenant);
  return r;
}

std::vector<int32_t> Prompt(int n) {
  std::vector<int32_t> p = {1};
  for (int i = 1; i < n; ++i) p.push_back(3 + (i * 37) % 500);
  return p;
}

std::vector<int32_t> RunAlone(EngineOptions options, const GenerationRequest& r) {
  Fixture f(options);
  std::vector<int32_t> ids;
  EXPECT_OK(f.engine->Add(r, [&](const TokenEvent& e) { ids.push_back(e.token_id); }));
  while (f.engine->HasWork()) EXPECT_OK(f.engine->Step());
  return ids;
}

TEST(EngineSchedulingTest, ChunkedPrefillGivesTheSameTokens) {
  const GenerationRequest r = Greedy(Prompt(60), 20);
  const std::vector<int32_t> whole = RunAlone({.max_batch_tokens = 2048}, r);
  const std::vector<int32_t> chunked = RunAlone({.max_batch_tokens = 7}, r);
  EXPECT_EQ(whole, chunked);
  EXPECT_EQ(chunked.size(), 20u);
}

TEST(EngineSchedulingTest, DecodesKeepGoingWhileALongPromptPrefills) {
  Fixture f({.max_batch_tokens = 8});
  std::vector<int> order;  // request index per event
  ASSERT_OK(f.engine->Add(Greedy(Prompt(2), 12), [&](const TokenEvent&) { order.push_back(0); }));
  ASSERT_OK(f.engine->Step());  // request 0 prefilled, first token
  ASSERT_OK(f.engine->Add(Greedy(Prompt(70), 2), [&](const TokenEvent&) { order.push_back(1); }));
  // 70 prompt tokens at 7 per step (one slot goes to request 0's decode):
  // request 0 emits a token every step meanwhile.
  for (int step = 0; step < 5; ++step) ASSERT_OK(f.engine->Step());
  EXPECT_EQ(order, std::vector<int>(6, 0));
}

TEST(EngineSchedulingTest, CancelFreesBlocksAndEndsTheStream) {
  Fixture f;
  std::vector<TokenEvent> events;
  auto id = f.engine->Add(Greedy(Prompt(40), 60), [&](const TokenEvent& e) { events.push_back(e); });
  ASSERT_OK(id);
  for (int i = 0; i < 3; ++i) ASSERT_OK(f.engine->Step());
  EXPECT_LT(f.cache->free_blocks(), f.cache->num_blocks());
  f.engine->Cancel(*id);
  ASSERT_OK(f.engine->Step());
  EXPECT_EQ(f.cache->free_blocks(), f.cache->num_blocks());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().finish, FinishReason::kCancelled);
  EXPECT_EQ(events.size(), 4u);  // three tokens, then the cancellation
  EXPECT_FALSE(f.engine->HasWork());
}

// Tenant "flood" queues 20 requests before tenant "calm" queues 2; with room
// for 2 running requests, calm is served long before flood's queue drains.
TEST(EngineSchedulingTest, AFloodingTenantDoesNotStarveOthers) {
  Fixture f({.max_running_requests = 2});
  std::vector<std::string> finished;
  auto add = [&](const std::string& tenant) {
    ASSERT_OK(f.engine->Add(Greedy(Prompt(4), 4, tenant), [&, tenant](const TokenEvent& e) {
      if (e.finish != FinishReason::kNone) finished.push_back(tenant);
    }));
  };
  for (int i = 0; i < 20; ++i) add("flood");
  ASSERT_OK(f.engine->Step());  // flood's first two are running
  for (int i = 0; i < 2; ++i) add("calm");
  while (f.engine->HasWork()) ASSERT_OK(f.engine->Step());
  ASSERT_EQ(finished.size(), 22u);
  // Both calm requests finish among the first six completions.
  int calm_seen = 0;
  for (int i = 0; i < 6; ++i) calm_seen += finished[i] == "calm";
  EXPECT_EQ(calm_seen, 2);
}

TEST(EngineSchedulingTest, PrefixCacheReusesFullBlocksWithIdenticalResults) {
  const GenerationRequest first = Greedy(Prompt(50), 10);
  GenerationRequest second = first;
  second.prompt_ids.push_back(77);  // same 50-token prefix, one more token
  const std::vector<int32_t> expected = RunAlone({}, second);
  Fixture f({.enable_prefix_cache = true});
  std::vector<int32_t> ids;
  for (const GenerationRequest& r : {first, second}) {
    ids.clear();
    ASSERT_OK(f.engine->Add(r, [&](const TokenEvent& e) { ids.push_back(e.token_id); }));
    while (f.engine->HasWork()) ASSERT_OK(f.engine->Step());
  }
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(f.engine->stats().prefix_cached_tokens, 48);  // three full blocks of 16
  EXPECT_EQ(f.cache->free_blocks(), f.cache->num_blocks());
}

TEST(EngineSchedulingTest, SamplingParametersShareThePrefixCache) {
  Fixture f({.enable_prefix_cache = true});
  auto run = [&](GenerationRequest r) {
    ASSERT_OK(f.engine->Add(r, [](const TokenEvent&) {}));
    while (f.engine->HasWork()) ASSERT_OK(f.engine->Step());
  };
  GenerationRequest base = Greedy(Prompt(40), 2);
  run(base);
  GenerationRequest sampled = base;
  sampled.sampling = {.temperature = 0.7f, .seed = 5};  // sampling does not change KV
  run(sampled);
  EXPECT_EQ(f.engine->stats().prefix_cached_tokens, 32);
}

TEST(EngineLoopTest, ConcurrentSubmittersGetTheirOwnTokens) {
  Fixture f;
  const std::vector<int32_t> expected = RunAlone({}, Greedy(Prompt(5), 16));
  EngineLoop loop(f.engine.get(), {});
  loop.Start();
  constexpr int kThreads = 8;
  std::vector<std::vector<int32_t>> got(kThreads);
  std::vector<Notification> done(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto id = loop.Submit(Greedy(Prompt(5), 16), [&, t](const TokenEvent& e) {
        got[t].push_back(e.token_id);
        if (e.finish != FinishReason::kNone) done[t].Notify();
      });
      ASSERT_OK(id);
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE(done[t].WaitForNotificationWithTimeout(absl::Seconds(30)));
    EXPECT_EQ(got[t], expected) << t;
  }
  // The snapshot is refreshed after each step: it settles once the last
  // step's bookkeeping is done.
  EngineSnapshot snapshot = loop.Snapshot();
  for (int i = 0; i < 1000 && snapshot.running > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));
    snapshot = loop.Snapshot();
  }
  EXPECT_EQ(snapshot.running, 0);
  EXPECT_EQ(snapshot.kv_blocks_used, 0);
}

TEST(EngineLoopTest, RejectsBadRequestsAndAFullQueue) {
  Fixture f;
  EngineLoop loop(f.engine.get(), {.max_queued_requests = 2});
  // Not started: requests stay queued.
  EXPECT_THAT(loop.Submit(Greedy({}, 4), [](const TokenEvent&) {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(loop.Submit(Greedy(Prompt(3), 4), [](const TokenEvent&) {}));
  ASSERT_OK(loop.Submit(Greedy(Prompt(3), 4), [](const TokenEvent&) {}));
  EXPECT_THAT(loop.Submit(Greedy(Prompt(3), 4), [](const TokenEvent&) {}),
              StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST(EngineLoopTest, TheQueueBoundCountsRequestsTheEngineThreadHasTakenButNotStepped) {
  // One running, two queued: while nothing has finished, at most three are accepted,
  // however the submissions interleave with the engine thread taking them.
  Fixture f({.max_running_requests = 1});
  EngineLoop loop(f.engine.get(), {.max_queued_requests = 2});
  loop.Start();
  std::atomic<int> finished{0};
  int accepted = 0;
  for (int i = 0; i < 200 && finished.load() == 0; ++i) {
    absl::StatusOr<RequestId> id = loop.Submit(Greedy(Prompt(3), 120), [&](const TokenEvent& e) {
      if (e.finish != FinishReason::kNone) ++finished;
    });
    if (id.ok()) {
      ++accepted;
    } else {
      ASSERT_THAT(id, StatusIs(absl::StatusCode::kResourceExhausted)) << id.status();
    }
    EXPECT_LE(accepted, 3 + finished.load()) << "after " << i + 1 << " submissions";
  }
  loop.Drain(absl::Seconds(30));
}

TEST(EngineLoopTest, TheSnapshotHasTheCacheBoundsBeforeTheFirstStep) {
  Fixture f;
  EngineLoop loop(f.engine.get(), {});
  const EngineSnapshot snapshot = loop.Snapshot();
  EXPECT_EQ(snapshot.kv_blocks_total, f.cache->num_blocks());
  EXPECT_EQ(snapshot.kv_blocks_used, 0);
  EXPECT_EQ(snapshot.kv_cache_bytes, static_cast<int64_t>(f.cache->bytes()));
}

TEST(EngineLoopTest, CancelAndDrain) {
  Fixture f;
  EngineLoop loop(f.engine.get(), {});
  loop.Start();
  Notification cancelled, finished;
  auto long_id = loop.Submit(Greedy(Prompt(3), 120), [&](const TokenEvent& e) {
    if (e.finish == FinishReason::kCancelled) cancelled.Notify();
  });
  ASSERT_OK(long_id);
  auto short_id = loop.Submit(Greedy(Prompt(3), 3), [&](const TokenEvent& e) {
    if (e.finish == FinishReason::kLength) finished.Notify();
  });
  ASSERT_OK(short_id);
  ASSERT_TRUE(finished.WaitForNotificationWithTimeout(absl::Seconds(30)));
  loop.Cancel(*long_id);
  ASSERT_TRUE(cancelled.WaitForNotificationWithTimeout(absl::Seconds(30)));
  loop.Drain(absl::Seconds(5));
  EXPECT_THAT(loop.Submit(Greedy(Prompt(3), 3), [](const TokenEvent&) {}),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(f.cache->free_blocks(), f.cache->num_blocks());
}

TEST(EngineLoopTest, DrainKeepsItsDeadlineWhileTheEngineIsBusy) {
  // One request at a time, 400 of 100 tokens: seconds of steps, each of which
  // wakes the draining thread.
  Fixture f({.max_running_requests = 1});
  EngineLoop loop(f.engine.get(), {.max_queued_requests = 1000});
  loop.Start();
  std::atomic<int> completed{0};
  for (int i = 0; i < 400; ++i) {
    ASSERT_OK(loop.Submit(Greedy(Prompt(3), 100), [&](const TokenEvent& e) {
      if (e.finish == FinishReason::kLength) ++completed;
    }));
  }
  const absl::Time start = absl::Now();
  loop.Drain(absl::Milliseconds(100));
  const absl::Duration took = absl::Now() - start;
  EXPECT_LT(took, absl::Seconds(3)) << "Drain(100 ms) took " << took;
  EXPECT_LT(completed.load(), 400) << "the work outlasted the deadline, as the test needs";
}

}  // namespace
}  // namespace loraserve::engine
