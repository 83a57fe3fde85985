#include "server/engine/stop_strings.h"

#include "gtest/gtest.h"

namespace loraserve::engine {
namespace {

TEST(StopStringFilterTest, PassesTextWithoutStopStrings) {
  StopStringFilter filter({});
  EXPECT_EQ(filter.Feed("hello").text, "hello");
  EXPECT_EQ(filter.Flush(), "");
}

TEST(StopStringFilterTest, CutsBeforeStopStringAcrossDeltas) {
  StopStringFilter filter({"END"});
  StopStringFilter::Result r = filter.Feed("abc E");
  EXPECT_EQ(r.text, "abc ");  // "E" may start "END": held back
  EXPECT_FALSE(r.stopped);
  r = filter.Feed("N");
  EXPECT_EQ(r.text, "");
  r = filter.Feed("D and more");
  EXPECT_EQ(r.text, "");
  EXPECT_TRUE(r.stopped);
}

TEST(StopStringFilterTest, ReleasesHeldTextWhenPrefixBreaks) {
  StopStringFilter filter({"END"});
  EXPECT_EQ(filter.Feed("xEN").text, "x");
  EXPECT_EQ(filter.Feed("x").text, "ENx");
}

TEST(StopStringFilterTest, EarliestOfSeveralStopsWins) {
  StopStringFilter filter({"b", "\n\n"});
  StopStringFilter::Result r = filter.Feed("a\n\nb");
  EXPECT_EQ(r.text, "a");
  EXPECT_TRUE(r.stopped);
}

TEST(StopStringFilterTest, FlushReturnsHeldBackTail) {
  StopStringFilter filter({"###"});
  EXPECT_EQ(filter.Feed("done ##").text, "done ");
  EXPECT_EQ(filter.Flush(), "##");
}

}  // namespace
}  // namespace loraserve::engine
