// The model and adapter endpoints: GET /v1/models[/{id}], the adapter
// upload (POST /v1/adapters, multipart) and its listing, lookup and delete,
// and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter. Each checks
// what the caller's tenant may see and change.
#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/sha256.h"
#include "base/status_macros.h"
#include "formats/safetensors.h"
#include "server/api/http_gateway_impl.h"
#include "server/api/upload_form.h"

namespace loraserve::api {
namespace {

using http_gateway_internal::CallUpstream;
using http_gateway_internal::kAdapterChangeDeadline;
using http_gateway_internal::kUploadChunkBytes;
using http_gateway_internal::ReplyError;
using http_gateway_internal::ReplyJson;
using nlohmann::json;

// The adapter's rank compaction (v1::CompactionInfo), null when it has none.
json CompactionJson(const v1::AdapterInfo& info) {
  if (!info.has_compaction()) return nullptr;
  const v1::CompactionInfo& compaction = info.compaction();
  json modules = json::array();
  for (const v1::ModuleSpectrum& m : compaction.modules()) {
    modules.push_back({{"module", m.module()},
                       {"rank_before", m.rank_before()},
                       {"rank", m.rank()},
                       {"kept_energy", m.kept_energy()},
                       {"energy", std::vector<double>(m.energy().begin(), m.energy().end())}});
  }
  return json{{"min_energy", compaction.min_energy()},
              {"ranks_before", std::vector<int32_t>(compaction.ranks_before().begin(),
                                                    compaction.ranks_before().end())},
              {"bytes_before", compaction.bytes_before()},
              {"modules", modules}};
}

json AdapterJson(const v1::AdapterInfo& info) {
  return json{{"id", DisplayAdapterId(info.id())},
              {"object", "adapter"},
              {"canonical_id", info.id()},
              {"owner", std::string(TenantOf(info.id()).value_or(""))},
              {"version", info.version()},
              {"content_hash", info.content_hash()},
              {"ranks", std::vector<int32_t>(info.ranks().begin(), info.ranks().end())},
              {"target_modules", std::vector<std::string>(info.target_modules().begin(),
                                                          info.target_modules().end())},
              {"dora", info.dora()},
              {"modules_to_save",
               std::vector<std::string>(info.saved_modules().begin(), info.saved_modules().end())},
              {"bytes", info.bytes()},
              {"resident_host", info.resident_host()},
              {"pinned", info.pinned()},
              {"compaction", CompactionJson(info)}};
}

// An entry of GET /v1/models: the base model (`adapter` null) or an adapter.
json ModelJson(const v1::ServerInfo& info, const v1::AdapterInfo* adapter) {
  if (adapter == nullptr) {
    return json{{"id", info.model()},
                {"object", "model"},
                {"created", 0},
                {"owned_by", "loraserve"},
                {"root", info.model()},
                {"parent", nullptr},
                {"max_model_len", info.max_context_tokens()}};
  }
  return json{{"id", DisplayAdapterId(adapter->id())},
              {"object", "model"},
              {"created", 0},
              {"owned_by", std::string(TenantOf(adapter->id()).value_or(""))},
              {"root", adapter->id()},
              {"parent", info.model()},
              {"max_model_len", info.max_context_tokens()}};
}

// The part [begin, end) of `adapters` that a list request's `limit` and
// `after` select.
struct ListPage {
  size_t begin = 0;
  size_t end = 0;
};

absl::StatusOr<ListPage> ListPageOf(const httplib::Request& req,
                                    const std::vector<v1::AdapterInfo>& adapters) {
  ListPage page{0, adapters.size()};
  if (req.has_param("after")) {
    const std::string after = req.get_param_value("after");
    const auto it = std::find_if(adapters.begin(), adapters.end(), [&](const v1::AdapterInfo& a) {
      return a.id() == after || DisplayAdapterId(a.id()) == after;
    });
    if (it == adapters.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("after=", after,
                       " names no adapter you can see (deleted since? list "
                       "again from the first page)"));
    }
    page.begin = static_cast<size_t>(it - adapters.begin()) + 1;
  }
  if (req.has_param("limit")) {
    const std::string text = req.get_param_value("limit");
    int64_t limit = 0;
    if (!absl::SimpleAtoi(text, &limit) || limit < 1 || limit > 1000) {
      return absl::InvalidArgumentError(
          absl::StrCat("limit must be an integer from 1 to 1000, got \"", text, "\""));
    }
    page.end = std::min(adapters.size(), page.begin + static_cast<size_t>(limit));
  }
  page.end = std::max(page.begin, page.end);
  return page;
}

}  // namespace

// GET /v1/adapters[?limit=N&after=ID]: the adapters the caller may see, by
// canonical id; all of them, or pages of `limit` (1..1000) after the adapter
// `after` names (an `id` of the previous page), as OpenAI's lists page.
void HttpGateway::Impl::HandleListAdapters(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  absl::StatusOr<std::vector<v1::AdapterInfo>> visible =
      who.ok() ? ListVisible(*who) : who.status();
  if (!visible.ok()) return ReplyError(res, visible.status());
  absl::StatusOr<ListPage> page = ListPageOf(req, *visible);
  if (!page.ok()) return ReplyError(res, page.status());
  json data = json::array();
  for (size_t i = page->begin; i < page->end; ++i) data.push_back(AdapterJson((*visible)[i]));
  json body = {{"object", "list"}, {"data", data}, {"has_more", page->end < visible->size()}};
  if (!data.empty()) {
    body["first_id"] = data.front()["id"];
    body["last_id"] = data.back()["id"];
  }
  ReplyJson(res, 200, body);
}

void HttpGateway::Impl::HandleGetAdapter(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  absl::StatusOr<v1::AdapterInfo> info =
      who.ok() ? FindVisible(*who, req.matches[1]) : who.status();
  if (!info.ok()) return ReplyError(res, info.status());
  ReplyJson(res, 200, AdapterJson(*info));
}

void HttpGateway::Impl::HandleDeleteAdapter(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  absl::StatusOr<std::string> id = who.ok() ? Unload(*who, req.matches[1]) : who.status();
  if (!id.ok()) return ReplyError(res, id.status());
  ReplyJson(res, 200, {{"id", DisplayAdapterId(*id)}, {"object", "adapter"}, {"deleted", true}});
}

void HttpGateway::Impl::HandleModels(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  absl::StatusOr<v1::ServerInfo> info = Info();
  if (!info.ok()) return ReplyError(res, info.status());
  absl::StatusOr<std::vector<v1::AdapterInfo>> visible = ListVisible(*who);
  if (!visible.ok()) return ReplyError(res, visible.status());
  json data = json::array({ModelJson(*info, nullptr)});
  for (const v1::AdapterInfo& adapter : *visible) data.push_back(ModelJson(*info, &adapter));
  ReplyJson(res, 200, {{"object", "list"}, {"data", std::move(data)}});
}

void HttpGateway::Impl::HandleModel(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  absl::StatusOr<v1::ServerInfo> info = Info();
  if (!info.ok()) return ReplyError(res, info.status());
  const std::string model = req.matches[1];
  if (model == info->model()) return ReplyJson(res, 200, ModelJson(*info, nullptr));
  absl::StatusOr<v1::AdapterInfo> adapter = FindVisible(*who, model);
  if (absl::IsNotFound(adapter.status())) {
    return ReplyError(res, absl::NotFoundError(absl::StrCat(
                               "model \"", model, "\" not found (GET /v1/models lists them)")));
  }
  if (!adapter.ok()) return ReplyError(res, adapter.status());
  ReplyJson(res, 200, ModelJson(*info, &*adapter));
}

void HttpGateway::Impl::HandleUpload(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  // Bodies far above the limit never get here (set_payload_max_length).
  int64_t bytes = static_cast<int64_t>(req.body.size());  // multipart parts are in req.files
  for (const auto& [name, part] : req.files) bytes += static_cast<int64_t>(part.content.size());
  if (bytes > options_.max_upload_bytes) {
    return ReplyJson(
        res, 413,
        ErrorBody(413, absl::StrCat("upload of ", bytes, " bytes exceeds --max-upload-bytes=",
                                    options_.max_upload_bytes)));
  }
  absl::StatusOr<v1::AdapterInfo> info = Upload(*who, req);
  if (HttpStatusFor(info.status()) == 429) {  // the tenant's quota
    json body = ErrorBody(info.status());
    body["error"]["type"] = "insufficient_quota";  // OpenAI's type for quotas
    return ReplyJson(res, 429, body);
  }
  if (!info.ok()) return ReplyError(res, info.status());
  ReplyJson(res, 201, AdapterJson(*info));
}

absl::StatusOr<v1::AdapterInfo> HttpGateway::Impl::Upload(const Principal& who,
                                                          const httplib::Request& req) {
  if (!req.is_multipart_form_data()) {
    return absl::InvalidArgumentError(absl::StrCat("the body must be ", kUploadFormFields));
  }
  std::map<std::string, absl::string_view> fields;  // the first of each name
  for (const auto& [name, part] : req.files) fields.emplace(name, part.content);
  ASSIGN_OR_RETURN(const UploadForm form, ParseUploadForm(who, fields));
  const std::string& id = form.id;
  const absl::string_view tensors = form.adapter_model_safetensors;

  std::lock_guard<std::mutex> lock(uploads_mu_);
  absl::StatusOr<v1::AdapterInfo> existing = GetAdapter(id);
  if (existing.ok() && !form.replace) {
    return absl::AlreadyExistsError(
        absl::StrCat("adapter ", id, " exists (version ", existing->version(),
                     "); send replace=true to upload a new version, or DELETE it first"));
  }
  if (!existing.ok() && !absl::IsNotFound(existing.status())) return existing.status();
  if (!who.is_admin()) {
    ASSIGN_OR_RETURN(std::vector<v1::AdapterInfo> visible, ListVisible(who));
    int64_t count = 0;
    int64_t bytes = 0;
    for (const v1::AdapterInfo& info : visible) {
      if (AdapterAccess::CanChange(who, info.id())) {
        ++count;
        bytes += info.bytes();
      }
    }
    RETURN_IF_ERROR(CheckQuota(options_.tenant_quota, who.tenant, count, bytes, form.float32_bytes,
                               existing.ok(), existing.ok() ? existing->bytes() : 0));
  }

  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kAdapterChangeDeadline));
  v1::AdapterInfo info;
  std::unique_ptr<grpc::ClientWriter<v1::UploadAdapterRequest>> writer =
      adapters_->Upload(&context, &info);
  v1::UploadAdapterRequest header;
  header.mutable_header()->set_id(id);
  header.mutable_header()->set_adapter_config_json(std::string(form.adapter_config_json));
  header.mutable_header()->set_sha256(Sha256Hex(tensors));
  header.mutable_header()->set_total_bytes(static_cast<int64_t>(tensors.size()));
  if (form.compact_min_energy) {
    header.mutable_header()->mutable_compaction()->set_min_energy(*form.compact_min_energy);
  } else if (form.compact_max_relative_error) {
    header.mutable_header()->mutable_compaction()->set_max_relative_error(
        *form.compact_max_relative_error);
  }
  bool ok = writer->Write(header);
  for (size_t offset = 0; ok && offset < tensors.size(); offset += kUploadChunkBytes) {
    v1::UploadAdapterRequest chunk;
    const size_t size = std::min<size_t>(kUploadChunkBytes, tensors.size() - offset);
    chunk.mutable_chunk()->set_data(tensors.data() + offset, size);
    chunk.mutable_chunk()->set_last(offset + size == tensors.size());
    ok = writer->Write(chunk);
  }
  writer->WritesDone();
  // Exhausted here is the server's room (its upload store, its adapter
  // memory), not the tenant's quota.
  RETURN_IF_ERROR(ServerOutOfRoom(FromGrpcStatus(writer->Finish())));
  return info;
}

void HttpGateway::Impl::HandleLoadLora(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  if (!who->is_admin()) {
    return ReplyError(res, absl::PermissionDeniedError(
                               "loading from a server path needs an admin key; tenants upload "
                               "with POST /v1/adapters"));
  }
  absl::StatusOr<std::vector<std::string>> fields =
      ParseStringFields(req.body, {"lora_name", "lora_path"});
  if (!fields.ok()) return ReplyError(res, fields.status());
  absl::StatusOr<std::string> id = AdapterAccess::OwnedId(*who, (*fields)[0]);
  if (!id.ok()) return ReplyError(res, id.status());
  std::lock_guard<std::mutex> lock(uploads_mu_);
  if (GetAdapter(*id).ok()) {
    return ReplyError(res, absl::AlreadyExistsError(absl::StrCat(
                               "adapter ", *id, " is already loaded; unload it first")));
  }
  v1::LoadAdapterRequest request;
  request.set_id(*id);
  request.set_path((*fields)[1]);
  v1::AdapterInfo info;
  absl::Status status = CallUpstream(kAdapterChangeDeadline, [&](grpc::ClientContext* context) {
    return adapters_->Load(context, request, &info);
  });
  if (!status.ok()) return ReplyError(res, status);
  res.set_content(absl::StrCat("Success: LoRA adapter '", (*fields)[0], "' added successfully."),
                  "text/plain");
}

absl::StatusOr<std::string> HttpGateway::Impl::Unload(const Principal& who,
                                                      const std::string& name) {
  ASSIGN_OR_RETURN(v1::AdapterInfo info, FindVisible(who, name));
  if (!AdapterAccess::CanChange(who, info.id())) {
    return absl::PermissionDeniedError(absl::StrCat("adapter ", info.id(),
                                                    " belongs to the operators; tenant \"",
                                                    who.tenant, "\" cannot remove it"));
  }
  std::lock_guard<std::mutex> lock(uploads_mu_);
  v1::UnloadAdapterRequest request;
  request.set_id(info.id());
  v1::UnloadAdapterResponse response;
  RETURN_IF_ERROR(CallUpstream(kAdapterChangeDeadline, [&](grpc::ClientContext* context) {
    return adapters_->Unload(context, request, &response);
  }));
  return info.id();
}

void HttpGateway::Impl::HandleUnloadLora(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  absl::StatusOr<std::vector<std::string>> fields = ParseStringFields(req.body, {"lora_name"});
  if (!fields.ok()) return ReplyError(res, fields.status());
  absl::StatusOr<std::string> id = Unload(*who, (*fields)[0]);
  if (!id.ok()) return ReplyError(res, id.status());
  res.set_content(absl::StrCat("Success: LoRA adapter '", (*fields)[0], "' removed successfully."),
                  "text/plain");
}

}  // namespace loraserve::api
