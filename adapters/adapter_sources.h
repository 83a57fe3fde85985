// Where a server's adapters come from at start-up: `--adapter-dir DIR` (each
// subfolder holding an adapter_config.json is an adapter named by the folder)
// and `--adapter NAME=DIR` (repeatable). Both load through the registry, so
// every adapter is validated before it becomes visible.
//
// Example:
//   RETURN_IF_ERROR(LoadAdapterDir(*registry, "/srv/adapters"));
//   RETURN_IF_ERROR(LoadAdapterSpec(*registry, "support=/srv/support-bot"));
#ifndef LORASERVE_ADAPTERS_ADAPTER_SOURCES_H_
#define LORASERVE_ADAPTERS_ADAPTER_SOURCES_H_

#include <string>

#include "absl/status/status.h"
#include "adapters/registry.h"

namespace loraserve::adapters {

// Loads every adapter folder of `dir`, in name order; the first failure is
// returned (naming the folder) and later folders are not loaded.
absl::Status LoadAdapterDir(AdapterRegistry& registry, const std::string& dir);

// `spec` is NAME=DIR.
absl::Status LoadAdapterSpec(AdapterRegistry& registry, const std::string& spec);

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_ADAPTER_SOURCES_H_
