#include "server/api/upload_form.h"

#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "formats/safetensors.h"

namespace loraserve::api {
namespace {

// A number field of the form, nullopt when it is absent.
absl::StatusOr<std::optional<double>> NumberField(
    const std::map<std::string, absl::string_view>& fields, const std::string& name) {
  const auto it = fields.find(name);
  if (it == fields.end()) return std::nullopt;
  double value;
  if (!absl::SimpleAtod(it->second, &value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("field \"", name, "\" is \"", it->second, "\", expected a number"));
  }
  return value;
}

}  // namespace

absl::StatusOr<UploadForm> ParseUploadForm(const Principal& who,
                                           const std::map<std::string, absl::string_view>& fields) {
  for (const char* field : {"name", "adapter_config.json", "adapter_model.safetensors"}) {
    if (fields.count(field) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("missing field \"", field, "\": send ", kUploadFormFields));
    }
  }
  UploadForm form;
  ASSIGN_OR_RETURN(form.id, AdapterAccess::OwnedId(who, fields.at("name")));
  form.adapter_config_json = fields.at("adapter_config.json");
  form.adapter_model_safetensors = fields.at("adapter_model.safetensors");
  const auto replace = fields.find("replace");
  form.replace = replace != fields.end() && replace->second == "true";
  ASSIGN_OR_RETURN(form.compact_min_energy, NumberField(fields, "compact_min_energy"));
  ASSIGN_OR_RETURN(form.compact_max_relative_error,
                   NumberField(fields, "compact_max_relative_error"));
  if (form.compact_min_energy && form.compact_max_relative_error) {
    return absl::InvalidArgumentError(
        "send one of compact_min_energy and compact_max_relative_error, not both");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<formats::SafetensorsFile> parsed,
                   formats::SafetensorsFile::FromBuffer(form.adapter_model_safetensors,
                                                        "adapter_model.safetensors"));
  int64_t elements = 0;
  for (const auto& [name, tensor] : parsed->tensors()) elements += tensor.NumElements();
  form.float32_bytes = elements * 4;
  return form;
}

}  // namespace loraserve::api
