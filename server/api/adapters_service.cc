// The Adapters service: Load, Upload, Unload, List, Get.
#include <stdlib.h>  // mkdtemp

#include <filesystem>
#include <fstream>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "base/sha256.h"
#include "base/status_macros.h"
#include "server/api/grpc_services.h"

namespace loraserve::api {
namespace {

namespace fs = std::filesystem;

void FillInfo(const adapters::AdapterInfo& info, v1::AdapterInfo* out) {
  out->set_id(info.id);
  out->set_version(info.version);
  out->set_content_hash(info.content_hash);
  for (int rank : info.ranks) out->add_ranks(rank);
  for (const std::string& module : info.target_modules) out->add_target_modules(module);
  out->set_bytes(static_cast<int64_t>(info.bytes));
  out->set_resident_host(info.resident);
  out->set_pinned(info.pinned);
}

bool IsHexDigest(const std::string& s) {
  if (s.size() != 2 * Sha256::kDigestBytes) return false;
  for (char c : s) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

// One Upload stream. Messages are consumed as they arrive (the file is
// written chunk by chunk and hashed on the way); when the client closes the
// stream, the check and the registry load run on the service's worker, which
// then finishes the call. A failed or abandoned upload's directory is removed
// in OnDone.
class UploadReactor final : public grpc::ServerReadReactor<v1::UploadAdapterRequest> {
 public:
  UploadReactor(AdaptersService* service, grpc::CallbackServerContext* context,
                v1::AdapterInfo* response)
      : service_(service), context_(context), response_(response) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side (or the call was cancelled)
      service_->jobs_.Run([this] {
        absl::Status status;
        {
          std::lock_guard<std::mutex> lock(mu_);
          status = Commit();
        }
        Finish(ToGrpcStatus(status));
      });
      return;
    }
    absl::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      status = Consume();
    }
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!committed_ && !dir_.empty()) {
        std::error_code ignored;
        fs::remove_all(dir_, ignored);
      }
    }
    delete this;
  }

 private:
  // gRPC thread: takes request_ in.
  absl::Status Consume() {
    switch (request_.part_case()) {
      case v1::UploadAdapterRequest::kHeader:
        if (has_header_) return absl::InvalidArgumentError("header: sent twice");
        has_header_ = true;
        return Begin(request_.header());
      case v1::UploadAdapterRequest::kChunk: {
        if (!has_header_) {
          return absl::InvalidArgumentError("chunk: the first message must carry header");
        }
        if (saw_last_) {
          return absl::InvalidArgumentError("chunk: received after the chunk marked last");
        }
        const std::string& data = request_.chunk().data();
        const int64_t total = header_.total_bytes();
        if (received_ + static_cast<int64_t>(data.size()) > total) {
          return absl::InvalidArgumentError(
              absl::StrCat("chunk: ", received_ + static_cast<int64_t>(data.size()) - total,
                           " bytes past header.total_bytes=", total));
        }
        tensors_.write(data.data(), static_cast<std::streamsize>(data.size()));
        hash_.Update(data);
        received_ += static_cast<int64_t>(data.size());
        saw_last_ = request_.chunk().last();
        return absl::OkStatus();
      }
      default:
        return absl::InvalidArgumentError("part: set header or chunk");
    }
  }

  absl::Status Begin(const v1::UploadHeader& header) {
    header_ = header;
    RETURN_IF_ERROR(adapters::CanonicalAdapterId(header.id(), "default").status());
    if (!IsHexDigest(header.sha256())) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.sha256: expected 64 hex digits, got \"", header.sha256(), "\""));
    }
    header_.set_sha256(absl::AsciiStrToLower(header.sha256()));
    if (header.total_bytes() <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.total_bytes: must be positive, got ", header.total_bytes()));
    }
    const int64_t size =
        header.total_bytes() + static_cast<int64_t>(header.adapter_config_json().size());
    const int64_t limit = service_->options_.max_upload_bytes;
    if (size > limit) {
      return absl::ResourceExhaustedError(
          absl::StrCat("upload of ", header.id(), ": ", size,
                       " bytes (header.total_bytes + adapter_config_json) exceed "
                       "--max-upload-bytes=",
                       limit));
    }
    std::string pattern = (fs::path(service_->options_.upload_dir) / "upload-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) {
      return absl::InternalError(
          absl::StrCat("cannot create an upload directory in ", service_->options_.upload_dir));
    }
    dir_ = pattern;
    const fs::path config_path = fs::path(dir_) / "adapter_config.json";
    std::ofstream config(config_path, std::ios::binary);
    config << header.adapter_config_json();
    config.close();
    if (!config) return absl::InternalError(absl::StrCat("cannot write ", config_path.string()));
    tensors_path_ = (fs::path(dir_) / "adapter_model.safetensors").string();
    tensors_.open(tensors_path_, std::ios::binary);
    if (!tensors_) return absl::InternalError(absl::StrCat("cannot write ", tensors_path_));
    return absl::OkStatus();
  }

  // Worker thread: the stream is complete; check it and load the adapter.
  absl::Status Commit() {
    if (context_->IsCancelled()) return absl::CancelledError("upload cancelled by the client");
    if (!has_header_) return absl::InvalidArgumentError("header: the upload sent no messages");
    if (received_ != header_.total_bytes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("upload of ", header_.id(), " ended after ", received_,
                       " of header.total_bytes=", header_.total_bytes(), " bytes"));
    }
    tensors_.close();
    if (!tensors_) return absl::InternalError(absl::StrCat("cannot write ", tensors_path_));
    const std::string digest = hash_.HexDigest();
    if (digest != header_.sha256()) {
      return absl::DataLossError(absl::StrCat("upload of ", header_.id(),
                                              ": the bytes have sha256 ", digest,
                                              ", header.sha256 is ", header_.sha256()));
    }
    absl::StatusOr<adapters::AdapterInfo> info = service_->LoadAndReplace(header_.id(), dir_);
    if (!info.ok()) {
      // The client sent files, not a directory: name the file alone.
      return absl::Status(info.status().code(),
                          absl::StrReplaceAll(info.status().message(), {{dir_ + "/", ""}}));
    }
    committed_ = true;
    FillInfo(*info, response_);
    return absl::OkStatus();
  }

  AdaptersService* const service_;
  grpc::CallbackServerContext* const context_;
  v1::AdapterInfo* const response_;
  // Never contended: gRPC runs one reaction at a time and Commit follows the last one. The
  // lock makes that order visible to TSan, which cannot see it through Debian's
  // uninstrumented gRPC (the reactions run on different gRPC threads). Guards what follows.
  std::mutex mu_;
  v1::UploadAdapterRequest request_;
  v1::UploadHeader header_;
  bool has_header_ = false;
  bool saw_last_ = false;
  bool committed_ = false;
  int64_t received_ = 0;
  std::string dir_;  // empty until the header arrives
  std::string tensors_path_;
  std::ofstream tensors_;
  Sha256 hash_;
};

absl::StatusOr<std::unique_ptr<AdaptersService>> AdaptersService::Create(
    adapters::AdapterRegistry* registry, AdaptersServiceOptions options) {
  std::error_code error;
  fs::create_directories(options.upload_dir, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("--upload-dir ", options.upload_dir, ": ", error.message()));
  }
  // Uploads are private to the server: other users may not read or plant files.
  fs::permissions(options.upload_dir, fs::perms::owner_all, fs::perm_options::replace, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("--upload-dir ", options.upload_dir, ": ", error.message()));
  }
  options.upload_dir = fs::canonical(options.upload_dir).string();
  return std::unique_ptr<AdaptersService>(new AdaptersService(registry, std::move(options)));
}

AdaptersService::AdaptersService(adapters::AdapterRegistry* registry,
                                 AdaptersServiceOptions options)
    : registry_(registry), options_(std::move(options)) {}

void AdaptersService::RemoveIfUploaded(const std::string& dir) {
  if (dir.empty() || !absl::StartsWith(dir, options_.upload_dir + "/")) return;
  std::error_code ignored;
  fs::remove_all(dir, ignored);
}

absl::StatusOr<adapters::AdapterInfo> AdaptersService::LoadAndReplace(const std::string& id,
                                                                      const std::string& dir) {
  // Jobs run one at a time, so the version read here is the one replaced.
  const absl::StatusOr<adapters::AdapterInfo> old = registry_->Get(id);
  ASSIGN_OR_RETURN(adapters::AdapterInfo info, registry_->Load(id, dir));
  if (old.ok() && old->dir != info.dir) RemoveIfUploaded(old->dir);
  return info;
}

absl::Status AdaptersService::UnloadAndClean(const std::string& id) {
  const absl::StatusOr<adapters::AdapterInfo> old = registry_->Get(id);
  RETURN_IF_ERROR(registry_->Unload(id));
  if (old.ok()) RemoveIfUploaded(old->dir);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AdaptersService::Load(grpc::CallbackServerContext* context,
                                                const v1::LoadAdapterRequest* request,
                                                v1::AdapterInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  jobs_.Run([this, reactor, request, response] {
    absl::StatusOr<adapters::AdapterInfo> info = LoadAndReplace(request->id(), request->path());
    if (info.ok()) FillInfo(*info, response);
    reactor->Finish(ToGrpcStatus(info.status()));
  });
  return reactor;
}

grpc::ServerReadReactor<v1::UploadAdapterRequest>* AdaptersService::Upload(
    grpc::CallbackServerContext* context, v1::AdapterInfo* response) {
  return new UploadReactor(this, context, response);
}

grpc::ServerUnaryReactor* AdaptersService::Unload(grpc::CallbackServerContext* context,
                                                  const v1::UnloadAdapterRequest* request,
                                                  v1::UnloadAdapterResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  jobs_.Run(
      [this, reactor, request] { reactor->Finish(ToGrpcStatus(UnloadAndClean(request->id()))); });
  return reactor;
}

grpc::ServerUnaryReactor* AdaptersService::List(grpc::CallbackServerContext* context,
                                                const v1::ListAdaptersRequest* request,
                                                v1::ListAdaptersResponse* response) {
  for (const adapters::AdapterInfo& info : registry_->List()) {
    FillInfo(info, response->add_adapters());
  }
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* AdaptersService::Get(grpc::CallbackServerContext* context,
                                               const v1::GetAdapterRequest* request,
                                               v1::AdapterInfo* response) {
  absl::StatusOr<adapters::AdapterInfo> info = registry_->Resolve(request->id());
  if (info.ok()) FillInfo(*info, response);
  return FinishUnary(context, info.status());
}

}  // namespace loraserve::api
