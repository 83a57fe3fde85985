#include "adapters/adapter_sources.h"

#include <filesystem>
#include <fstream>

#include "adapters/testing.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace loraserve::adapters {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<AdapterRegistry> Registry() {
  auto registry = AdapterRegistry::Create({.base = testing::SharedModelShape()});
  EXPECT_TRUE(registry.ok()) << registry.status();
  return std::move(*registry);
}

TEST(AdapterSourcesTest, AdapterDirLoadsEverySubfolderByName) {
  auto registry = Registry();
  ASSERT_TRUE(LoadAdapterDir(*registry, std::string(LORASERVE_SHARED_DIR) +
                                            "/adapters/aidreams-260k")
                  .ok());
  std::vector<std::string> ids;
  for (const AdapterInfo& info : registry->List()) ids.push_back(info.id);
  EXPECT_THAT(ids, ::testing::ElementsAre("default/all-r8-bf16", "default/attn-r8",
                                          "default/mlp-r16-rslora", "default/ocean",
                                          "default/qv-r4", "default/robot"));
}

TEST(AdapterSourcesTest, AdapterDirNamesTheBrokenFolder) {
  const std::string root = testing::FreshDir("sources");
  testing::WriteSmallAdapter(root + "/good");
  std::filesystem::create_directories(root + "/broken");
  std::ofstream(root + "/broken/adapter_config.json") << "{not json";
  auto registry = Registry();
  absl::Status status = LoadAdapterDir(*registry, root);
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr("broken"));
  EXPECT_EQ(LoadAdapterDir(*registry, root + "/missing").code(), absl::StatusCode::kNotFound);
}

TEST(AdapterSourcesTest, SpecIsNameEqualsDir) {
  auto registry = Registry();
  const std::string dir = testing::WriteSmallAdapter(testing::FreshDir("spec"));
  ASSERT_TRUE(LoadAdapterSpec(*registry, "acme/support=" + dir).ok());
  EXPECT_TRUE(registry->Get("acme/support").ok());
  for (const char* bad : {"nodir", "=x", "name="}) {
    absl::Status status = LoadAdapterSpec(*registry, bad);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(status.message()), HasSubstr("NAME=DIR"));
  }
}

}  // namespace
}  // namespace loraserve::adapters
