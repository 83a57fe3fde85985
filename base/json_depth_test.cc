#include "base/json_depth.h"

#include <string>

#include "gtest/gtest.h"

namespace loraserve {
namespace {

std::string Nested(int depth) { return std::string(depth, '[') + std::string(depth, ']'); }

TEST(JsonDepthTest, CountsArraysAndObjects) {
  EXPECT_FALSE(JsonDeeperThan("", 0));
  EXPECT_FALSE(JsonDeeperThan("17", 0));
  EXPECT_TRUE(JsonDeeperThan("[]", 0));
  EXPECT_FALSE(JsonDeeperThan("[]", 1));
  EXPECT_FALSE(JsonDeeperThan(R"({"a": [1, {"b": 2}], "c": [3]})", 3));
  EXPECT_TRUE(JsonDeeperThan(R"({"a": [1, {"b": 2}], "c": [3]})", 2));
  EXPECT_FALSE(JsonDeeperThan(Nested(kMaxJsonDepth), kMaxJsonDepth));
  EXPECT_TRUE(JsonDeeperThan(Nested(kMaxJsonDepth + 1), kMaxJsonDepth));
  EXPECT_TRUE(JsonDeeperThan(Nested(1000000), kMaxJsonDepth));
}

TEST(JsonDepthTest, SkipsBracketsInStrings) {
  EXPECT_FALSE(JsonDeeperThan(R"(["[[[", "{{{"])", 1));
  EXPECT_FALSE(JsonDeeperThan(R"(["\"[[", "\\"])", 1));
  EXPECT_TRUE(JsonDeeperThan(R"(["\\", [[]]])", 2));
}

}  // namespace
}  // namespace loraserve
