#include "adapters/adapter_sources.h"

#include <algorithm>
#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"

namespace loraserve::adapters {

namespace {

absl::StatusOr<AdapterInfo> Add(AdapterRegistry& registry, const std::string& id,
                                const std::string& dir, StartupLoad how) {
  return how == StartupLoad::kLazy ? registry.Register(id, dir) : registry.Load(id, dir);
}

}  // namespace

absl::Status LoadAdapterDir(AdapterRegistry& registry, const std::string& dir, StartupLoad how) {
  std::error_code error;
  std::vector<std::filesystem::path> folders;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error)) {
    if (entry.is_directory() && std::filesystem::exists(entry.path() / "adapter_config.json")) {
      folders.push_back(entry.path());
    }
  }
  if (error) {
    return absl::NotFoundError(
        absl::StrCat("--adapter-dir ", dir, ": cannot list it (", error.message(), ")"));
  }
  std::sort(folders.begin(), folders.end());
  for (const auto& folder : folders) {
    absl::StatusOr<AdapterInfo> loaded =
        Add(registry, folder.filename().string(), folder.string(), how);
    if (!loaded.ok()) {
      return absl::Status(loaded.status().code(),
                          absl::StrCat("--adapter-dir ", dir, ": ", loaded.status().message()));
    }
  }
  return absl::OkStatus();
}

absl::Status LoadAdapterSpec(AdapterRegistry& registry, const std::string& spec, StartupLoad how) {
  const size_t eq = spec.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--adapter must be NAME=DIR, got '", spec, "'"));
  }
  absl::StatusOr<AdapterInfo> loaded = Add(registry, spec.substr(0, eq), spec.substr(eq + 1), how);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat("--adapter ", spec, ": ", loaded.status().message()));
  }
  return absl::OkStatus();
}

std::function<absl::StatusOr<std::string>(const std::string&)> AdapterFolderResolver(
    std::string root, std::string default_tenant) {
  return [root = std::move(root),
          default_tenant = std::move(default_tenant)](const std::string& canonical_id)
             -> absl::StatusOr<std::string> {
    const size_t slash = canonical_id.find('/');
    const std::string tenant = canonical_id.substr(0, slash);
    const std::string name = canonical_id.substr(slash + 1);
    const std::filesystem::path folder = tenant == default_tenant
                                             ? std::filesystem::path(root) / name
                                             : std::filesystem::path(root) / tenant / name;
    std::error_code error;
    if (!std::filesystem::is_regular_file(folder / "adapter_config.json", error)) {
      return absl::NotFoundError(absl::StrCat("adapter \"", canonical_id,
                                              "\" is not loaded, and --adapter-resolver-dir has "
                                              "no ",
                                              (folder / "adapter_config.json").string()));
    }
    return folder.string();
  };
}

}  // namespace loraserve::adapters
