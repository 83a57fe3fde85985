#include "adapters/adapter_sources.h"

#include <filesystem>
#include <fstream>

#include "adapters/testing.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace loraserve::adapters {
namespace {

using ::testing::AllOf;
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

TEST(AdapterSourcesTest, ResolverFolderLayoutIsRootNameOrRootTenantName) {
  const std::string root = testing::FreshDir("resolver");
  testing::WriteSmallAdapter(root + "/bot");
  testing::WriteSmallAdapter(root + "/acme/bot");
  std::filesystem::create_directories(root + "/empty");
  auto resolve = AdapterFolderResolver(root, "default");
  EXPECT_EQ(*resolve("default/bot"), root + "/bot");
  EXPECT_EQ(*resolve("acme/bot"), root + "/acme/bot");
  for (const char* id : {"default/empty", "acme/other", "zeta/bot", "default/acme"}) {
    absl::StatusOr<std::string> folder = resolve(id);
    EXPECT_EQ(folder.status().code(), absl::StatusCode::kNotFound) << id;
    EXPECT_THAT(std::string(folder.status().message()),
                AllOf(HasSubstr(id), HasSubstr("adapter_config.json"),
                      HasSubstr("--adapter-resolver-dir")));
  }
}

}  // namespace
}  // namespace loraserve::adapters
