#include "server/api/label_limiter.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

namespace loraserve::api {
namespace {

TEST(LabelLimiterTest, PassesTheFirstValuesAndFoldsTheRestIntoOther) {
  LabelLimiter limiter(2);
  EXPECT_EQ(limiter.Bound("tenant-a"), "tenant-a");
  EXPECT_EQ(limiter.Bound("tenant-b"), "tenant-b");
  EXPECT_EQ(limiter.Bound("tenant-c"), "other");
  EXPECT_EQ(limiter.Bound("tenant-a"), "tenant-a");
  EXPECT_EQ(limiter.Bound("tenant-d"), "other");
}

TEST(LabelLimiterTest, ConcurrentCallersAgreeOnTheLimit) {
  LabelLimiter limiter(3);
  constexpr int kThreads = 8;
  std::vector<std::string> bound(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 1000; ++i) bound[t] = limiter.Bound(absl::StrCat("v", t));
    });
  }
  for (std::thread& thread : threads) thread.join();
  int own = 0;
  for (int t = 0; t < kThreads; ++t) own += bound[t] == absl::StrCat("v", t) ? 1 : 0;
  EXPECT_EQ(own, 3);
}

}  // namespace
}  // namespace loraserve::api
