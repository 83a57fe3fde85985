#include "server/api/adapters_service.h"

#include <fcntl.h>
#include <stdlib.h>  // mkdtemp
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "base/status_macros.h"
#include "server/api/status_mapping.h"
#include "server/api/upload_assembler.h"

namespace loraserve::api {
namespace {

// The most adapters one List page holds, whatever the caller asks.
constexpr int32_t kMaxListPageSize = 1000;

namespace fs = std::filesystem;

// A request's compaction target: nullopt when it sets none (the server's
// default applies); InvalidArgument for an empty or out-of-range one.
absl::StatusOr<std::optional<adapters::CompactionTarget>> RequestedCompaction(
    bool has_compaction, const v1::Compaction& compaction) {
  if (!has_compaction) return std::nullopt;
  switch (compaction.target_case()) {
    case v1::Compaction::kMinEnergy:
      return adapters::CompactionTargetFrom(compaction.min_energy(), std::nullopt);
    case v1::Compaction::kMaxRelativeError:
      return adapters::CompactionTargetFrom(std::nullopt, compaction.max_relative_error());
    case v1::Compaction::TARGET_NOT_SET:
      break;
  }
  return adapters::CompactionTargetFrom(std::nullopt, std::nullopt);
}

void FillCompaction(const adapters::CompactionReport& report, v1::CompactionInfo* out) {
  out->set_min_energy(report.min_energy);
  for (int rank : report.ranks_before) out->add_ranks_before(rank);
  out->set_bytes_before(static_cast<int64_t>(report.bytes_before));
  for (const adapters::ModuleSpectrum& module : report.modules) {
    v1::ModuleSpectrum* spectrum = out->add_modules();
    spectrum->set_module(module.module);
    spectrum->set_rank_before(module.rank_before);
    spectrum->set_rank(module.rank);
    spectrum->set_kept_energy(module.kept_energy);
    for (double energy : module.energy) spectrum->add_energy(energy);
  }
}

void FillInfo(const adapters::AdapterInfo& info, v1::AdapterInfo* out) {
  out->set_id(info.id);
  out->set_version(info.version);
  out->set_content_hash(info.content_hash);
  for (int rank : info.ranks) out->add_ranks(rank);
  for (const std::string& module : info.target_modules) out->add_target_modules(module);
  out->set_dora(info.dora);
  for (const std::string& module : info.saved_modules) out->add_saved_modules(module);
  out->set_bytes(static_cast<int64_t>(info.bytes));
  out->set_resident_host(info.resident);
  out->set_pinned(info.pinned);
  if (info.compaction) FillCompaction(*info.compaction, out->mutable_compaction());
}

// The status of a failed write of an upload's `file`: RESOURCE_EXHAUSTED when
// the upload store is full, INTERNAL otherwise; either names the id, the file
// (not the server's directory) and the system's reason.
absl::Status WriteError(int error, const std::string& id, absl::string_view file) {
  if (error == ENOSPC || error == EDQUOT) {
    return absl::ResourceExhaustedError(
        absl::StrCat("upload of ", id, ": the server's upload store (--upload-dir) is full: ",
                     "writing ", file, ": ", std::strerror(error)));
  }
  return absl::InternalError(
      absl::StrCat("upload of ", id, ": cannot write ", file, ": ", std::strerror(error)));
}

// Writes all of `data` to `fd`.
absl::Status WriteAll(int fd, absl::string_view data, const std::string& id,
                      absl::string_view file) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return WriteError(n < 0 ? errno : EIO, id, file);
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
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
      : service_(service),
        context_(context),
        response_(response),
        upload_(service->options_.max_upload_bytes) {
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
      if (tensors_fd_ >= 0) ::close(tensors_fd_);  // a failed or abandoned upload
      if (!committed_ && !dir_.empty()) {
        std::error_code ignored;
        fs::remove_all(dir_, ignored);
      }
    }
    delete this;
  }

 private:
  // gRPC thread: takes request_ in; the assembler checks it, this writes it.
  absl::Status Consume() {
    RETURN_IF_ERROR(upload_.Feed(request_));
    if (request_.has_header()) return Begin(upload_.header());
    // A full disk ends the upload at once, not after the last chunk.
    return WriteAll(tensors_fd_, request_.chunk().data(), upload_.header().id(),
                    "adapter_model.safetensors");
  }

  // The upload's directory with its adapter_config.json, and the open
  // safetensors file the chunks go to.
  absl::Status Begin(const v1::UploadHeader& header) {
    ASSIGN_OR_RETURN(compaction_,
                     RequestedCompaction(header.has_compaction(), header.compaction()));
    std::string pattern = (fs::path(service_->options_.upload_dir) / "upload-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) {
      return WriteError(errno, header.id(), "its directory");
    }
    dir_ = pattern;
    const std::string config_path = (fs::path(dir_) / "adapter_config.json").string();
    const int config_fd = ::open(config_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (config_fd < 0) return WriteError(errno, header.id(), "adapter_config.json");
    absl::Status written =
        WriteAll(config_fd, header.adapter_config_json(), header.id(), "adapter_config.json");
    if (::close(config_fd) != 0 && written.ok()) {
      written = WriteError(errno, header.id(), "adapter_config.json");
    }
    RETURN_IF_ERROR(written);
    const std::string tensors_path = (fs::path(dir_) / "adapter_model.safetensors").string();
    tensors_fd_ = ::open(tensors_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (tensors_fd_ < 0) return WriteError(errno, header.id(), "adapter_model.safetensors");
    return absl::OkStatus();
  }

  // Worker thread: the stream is complete; check it and load the adapter.
  absl::Status Commit() {
    if (context_->IsCancelled()) return absl::CancelledError("upload cancelled by the client");
    RETURN_IF_ERROR(upload_.Finish());
    const std::string& id = upload_.header().id();
    const int fd = std::exchange(tensors_fd_, -1);
    if (::close(fd) != 0) return WriteError(errno, id, "adapter_model.safetensors");
    absl::StatusOr<adapters::AdapterInfo> info = service_->LoadAndReplace(id, dir_, compaction_);
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
  UploadAssembler upload_;
  bool committed_ = false;
  std::string dir_;  // empty until the header arrives
  std::optional<adapters::CompactionTarget> compaction_;  // the header's
  int tensors_fd_ = -1;  // adapter_model.safetensors, open from the header to the commit
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

absl::StatusOr<adapters::AdapterInfo> AdaptersService::LoadAndReplace(
    const std::string& id, const std::string& dir,
    std::optional<adapters::CompactionTarget> compaction) {
  // Jobs run one at a time, so the version read here is the one replaced.
  const absl::StatusOr<adapters::AdapterInfo> old = registry_->Get(id);
  ASSIGN_OR_RETURN(adapters::AdapterInfo info, registry_->Load(id, dir, compaction));
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
    absl::StatusOr<std::optional<adapters::CompactionTarget>> compaction =
        RequestedCompaction(request->has_compaction(), request->compaction());
    absl::StatusOr<adapters::AdapterInfo> info =
        compaction.ok() ? LoadAndReplace(request->id(), request->path(), *compaction)
                        : absl::StatusOr<adapters::AdapterInfo>(compaction.status());
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
  if (request->page_size() < 0) {
    return FinishUnary(context,
                       absl::InvalidArgumentError(absl::StrCat(
                           "page_size must be >= 0 (0 lists all), got ", request->page_size())));
  }
  if (request->page_size() == 0) {
    for (const adapters::AdapterInfo& info : registry_->List()) {
      FillInfo(info, response->add_adapters());
    }
    return FinishUnary(context, absl::OkStatus());
  }
  // One more than the page says whether another follows.
  const size_t page = static_cast<size_t>(std::min(request->page_size(), kMaxListPageSize));
  std::vector<adapters::AdapterInfo> infos = registry_->List(request->page_token(), page + 1);
  const bool more = infos.size() > page;
  if (more) infos.resize(page);
  for (const adapters::AdapterInfo& info : infos) FillInfo(info, response->add_adapters());
  if (more) response->set_next_page_token(infos.back().id);
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
