// ParseUploadForm, the step of POST /v1/adapters after cpp-httplib has split
// the multipart body. Input: a principal line ("admin" or a tenant name),
// then fields separated by kSeparator, each "NAME\nCONTENT".
#include <cstdint>
#include <map>
#include <string>

#include "absl/strings/match.h"
#include "server/api/upload_form.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

constexpr absl::string_view kSeparator = "\r\n--part\r\n";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve;
  const std::vector<absl::string_view> parts =
      fuzz::SplitInput(fuzz::AsText(data, size), kSeparator, 16);
  api::Principal who;
  who.tenant = std::string(parts[0]);
  who.role = who.tenant == "admin" ? api::Role::kAdmin : api::Role::kTenant;
  std::map<std::string, absl::string_view> fields;
  for (size_t i = 1; i < parts.size(); ++i) {
    const size_t newline = parts[i].find('\n');
    if (newline == absl::string_view::npos) {
      fields.emplace(std::string(parts[i]), absl::string_view());
    } else {
      fields.emplace(std::string(parts[i].substr(0, newline)), parts[i].substr(newline + 1));
    }
  }
  absl::StatusOr<api::UploadForm> form = api::ParseUploadForm(who, fields);
  if (!form.ok()) return 0;
  FUZZ_CHECK(form->float32_bytes >= 0);
  // A tenant's upload lands in its own namespace.
  FUZZ_CHECK(who.is_admin() || absl::StartsWith(form->id, who.tenant + "/"));
  FUZZ_CHECK(api::AdapterAccess::CanChange(who, form->id));
  FUZZ_CHECK(form->adapter_model_safetensors.data() ==
             fields.at("adapter_model.safetensors").data());
  return 0;
}
