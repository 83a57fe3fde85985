// Where a server's adapters come from: at start-up `--adapter-dir DIR` (each
// subfolder holding an adapter_config.json is an adapter named by the folder)
// and `--adapter NAME=DIR` (repeatable); on first use `--adapter-resolver-dir
// ROOT` (AdapterFolderResolver, for AdapterRegistryOptions::resolve). All load
// through the registry, so every adapter is validated before it becomes visible.
//
// Example:
//   RETURN_IF_ERROR(LoadAdapterDir(*registry, "/srv/adapters"));
//   RETURN_IF_ERROR(LoadAdapterSpec(*registry, "support=/srv/support-bot"));
//   options.resolve = AdapterFolderResolver("/srv/shared-adapters", "default");
#ifndef LORASERVE_ADAPTERS_ADAPTER_SOURCES_H_
#define LORASERVE_ADAPTERS_ADAPTER_SOURCES_H_

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/registry.h"

namespace loraserve::adapters {

// When the adapters named at start-up are read: all of each at once, or only
// their config and safetensors header, the weights on first use
// (AdapterRegistry::Register), so that a start-up with thousands of adapters
// reads no tensor and holds only their metadata.
enum class StartupLoad { kEager, kLazy };

// Loads every adapter folder of `dir`, in name order; the first failure is
// returned (naming the folder) and later folders are not loaded.
absl::Status LoadAdapterDir(AdapterRegistry& registry, const std::string& dir,
                            StartupLoad how = StartupLoad::kEager);

// `spec` is NAME=DIR.
absl::Status LoadAdapterSpec(AdapterRegistry& registry, const std::string& spec,
                             StartupLoad how = StartupLoad::kEager);

// The folder of an adapter on its first request: ROOT/NAME for
// "DEFAULT_TENANT/NAME", ROOT/TENANT/NAME for any other tenant's id, when it
// holds an adapter_config.json; NotFound naming that path otherwise. Ids are
// canonical (registry.h), so no id reaches outside ROOT. A folder that holds
// an adapter but is not one (say, half-synced) fails its load, not this.
std::function<absl::StatusOr<std::string>(const std::string& canonical_id)> AdapterFolderResolver(
    std::string root, std::string default_tenant);

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_ADAPTER_SOURCES_H_
