// The form of POST /v1/adapters after cpp-httplib has split the multipart
// body: which fields it needs, the id the upload creates for its sender, and
// the float32 bytes its tensors take once loaded (what tenant quotas count).
// The safetensors header gets the loader's own checks here, so a header that
// lies about sizes is refused before any byte goes upstream; the server
// validates the adapter itself.
//
// A pure function of its arguments; any thread.
//
// Example:
//   std::map<std::string, absl::string_view> fields;
//   for (const auto& [name, part] : req.files) fields.emplace(name, part.content);
//   ASSIGN_OR_RETURN(UploadForm form, ParseUploadForm(who, fields));
#ifndef LORASERVE_SERVER_API_UPLOAD_FORM_H_
#define LORASERVE_SERVER_API_UPLOAD_FORM_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/api/tenants.h"

namespace loraserve::api {

// What the form must be, for error messages.
inline constexpr absl::string_view kUploadFormFields =
    "multipart/form-data with fields name, adapter_config.json, adapter_model.safetensors "
    "(and optionally replace=true, and one of compact_min_energy and "
    "compact_max_relative_error for rank compaction)";

struct UploadForm {
  std::string id;                               // canonical "tenant/name" (AdapterAccess::OwnedId)
  absl::string_view adapter_config_json;        // into the fields' contents
  absl::string_view adapter_model_safetensors;  // likewise
  bool replace = false;                         // field replace is "true"
  int64_t float32_bytes = 0;                    // the tensors' elements × 4
  // Rank compaction (v1::Compaction): at most one is set; the server checks
  // the ranges.
  std::optional<double> compact_min_energy;
  std::optional<double> compact_max_relative_error;
};

// `fields`: the form's field contents by name (the first of a repeated name),
// which must outlive the result. InvalidArgument for a missing field or a
// safetensors file the loader refuses; OwnedId's errors for the name.
absl::StatusOr<UploadForm> ParseUploadForm(const Principal& who,
                                           const std::map<std::string, absl::string_view>& fields);

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_UPLOAD_FORM_H_
