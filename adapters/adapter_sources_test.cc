#include "adapters/adapter_sources.h"

#include <filesystem>
#include <fstream>

#include "adapters/testing.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::adapters {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::AllOf;
using ::testing::HasSubstr;

std::unique_ptr<AdapterRegistry> Registry() {
  auto registry = AdapterRegistry::Create({.base = test_support::SharedModelShape()});
  EXPECT_OK(registry);
  return std::move(*registry);
}

TEST(AdapterSourcesTest, AdapterDirLoadsEverySubfolderByName) {
  auto registry = Registry();
  ASSERT_OK(
      LoadAdapterDir(*registry, std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k"));
  std::vector<std::string> ids;
  for (const AdapterInfo& info : registry->List()) ids.push_back(info.id);
  EXPECT_THAT(ids, ::testing::ElementsAre("default/all-r8-bf16", "default/attn-r8",
                                          "default/mlp-r16-rslora", "default/ocean",
                                          "default/qv-r4", "default/robot"));
}

TEST(AdapterSourcesTest, AdapterDirNamesTheBrokenFolder) {
  const std::string root = test_support::FreshDir("sources");
  test_support::WriteSmallAdapter(root + "/good");
  std::filesystem::create_directories(root + "/broken");
  std::ofstream(root + "/broken/adapter_config.json") << "{not json";
  auto registry = Registry();
  absl::Status status = LoadAdapterDir(*registry, root);
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr("broken"));
  EXPECT_THAT(LoadAdapterDir(*registry, root + "/missing"), StatusIs(absl::StatusCode::kNotFound));
}

TEST(AdapterSourcesTest, SpecIsNameEqualsDir) {
  auto registry = Registry();
  const std::string dir = test_support::WriteSmallAdapter(test_support::FreshDir("spec"));
  ASSERT_OK(LoadAdapterSpec(*registry, "acme/support=" + dir));
  EXPECT_OK(registry->Get("acme/support"));
  for (const char* bad : {"nodir", "=x", "name="}) {
    absl::Status status = LoadAdapterSpec(*registry, bad);
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument)) << bad;
    EXPECT_THAT(std::string(status.message()), HasSubstr("NAME=DIR"));
  }
}

TEST(AdapterSourcesTest, ResolverFolderLayoutIsRootNameOrRootTenantName) {
  const std::string root = test_support::FreshDir("resolver");
  test_support::WriteSmallAdapter(root + "/bot");
  test_support::WriteSmallAdapter(root + "/acme/bot");
  std::filesystem::create_directories(root + "/empty");
  auto resolve = AdapterFolderResolver(root, "default");
  EXPECT_EQ(*resolve("default/bot"), root + "/bot");
  EXPECT_EQ(*resolve("acme/bot"), root + "/acme/bot");
  for (const char* id : {"default/empty", "acme/other", "zeta/bot", "default/acme"}) {
    absl::StatusOr<std::string> folder = resolve(id);
    EXPECT_THAT(folder, StatusIs(absl::StatusCode::kNotFound)) << id;
    EXPECT_THAT(std::string(folder.status().message()),
                AllOf(HasSubstr(id), HasSubstr("adapter_config.json"),
                      HasSubstr("--adapter-resolver-dir")));
  }
}

}  // namespace
}  // namespace loraserve::adapters
