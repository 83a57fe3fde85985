// The Adapters gRPC service (proto/loraserve/v1/adapters.proto) on the
// callback API: Load, Upload, Unload, List, Get.
//
// Adapter changes that read or write files (Load, Upload's final check and
// load, Unload's clean-up) run one at a time on this service's thread
// (JobQueue), so no gRPC thread waits on a disk and two replacements of one id
// never interleave. Upload writes to a private directory per upload under
// --upload-dir; an uploaded adapter's directory stays while it is the current
// version (the registry reloads evicted adapters from it) and is removed when
// the id is replaced or unloaded.
//
// Ownership and threading: the service borrows the registry, which must
// outlive the gRPC server; every method is called on gRPC's threads. Destroy
// the service after the server has shut down (it joins its thread).
//
// Example:
//   ASSIGN_OR_RETURN(auto adapters, AdaptersService::Create(
//       &registry, {.upload_dir = "/tmp/loraserve-uploads", .max_upload_bytes = 1 << 30}));
//   builder.RegisterService(adapters.get());
#ifndef LORASERVE_SERVER_API_ADAPTERS_SERVICE_H_
#define LORASERVE_SERVER_API_ADAPTERS_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "adapters/registry.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "server/api/job_queue.h"

namespace loraserve::api {

struct AdaptersServiceOptions {
  std::string upload_dir;        // created (mode 0700) if missing
  int64_t max_upload_bytes = 0;  // safetensors + config bytes of one Upload
};

class AdaptersService final : public v1::Adapters::CallbackService {
 public:
  // Fails when the upload directory cannot be created.
  static absl::StatusOr<std::unique_ptr<AdaptersService>> Create(
      adapters::AdapterRegistry* registry, AdaptersServiceOptions options);

  grpc::ServerUnaryReactor* Load(grpc::CallbackServerContext* context,
                                 const v1::LoadAdapterRequest* request,
                                 v1::AdapterInfo* response) override;
  grpc::ServerReadReactor<v1::UploadAdapterRequest>* Upload(grpc::CallbackServerContext* context,
                                                            v1::AdapterInfo* response) override;
  grpc::ServerUnaryReactor* Unload(grpc::CallbackServerContext* context,
                                   const v1::UnloadAdapterRequest* request,
                                   v1::UnloadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* List(grpc::CallbackServerContext* context,
                                 const v1::ListAdaptersRequest* request,
                                 v1::ListAdaptersResponse* response) override;
  grpc::ServerUnaryReactor* Get(grpc::CallbackServerContext* context,
                                const v1::GetAdapterRequest* request,
                                v1::AdapterInfo* response) override;

 private:
  friend class UploadReactor;

  AdaptersService(adapters::AdapterRegistry* registry, AdaptersServiceOptions options);

  // Worker thread: loads `dir` as `id` and, once it is in, removes the upload
  // directory of the version it replaced.
  absl::StatusOr<adapters::AdapterInfo> LoadAndReplace(
      const std::string& id, const std::string& dir,
      std::optional<adapters::CompactionTarget> compaction);
  absl::Status UnloadAndClean(const std::string& id);
  // Removes `dir` when it is one of our upload directories.
  void RemoveIfUploaded(const std::string& dir);

  adapters::AdapterRegistry* const registry_;
  const AdaptersServiceOptions options_;
  JobQueue jobs_;  // file work (Load, Upload's commit, Unload), one at a time
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_ADAPTERS_SERVICE_H_
