// CreateCudaBackend on any machine, GPU or not, CUDA in the build or not: it
// either gives a working backend or a FailedPrecondition that says which of
// the two is missing. No `gpu` label: this runs in every test run.
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

using ::loraserve::test_support::StatusIs;

TEST(CudaFactoryTest, CreatesABackendOrExplainsWhyNot) {
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCudaBackend({});
  if (backend.ok()) {
    EXPECT_EQ((*backend)->name(), "cuda:0");
    EXPECT_OK((*backend)->Synchronize());
    return;
  }
  EXPECT_THAT(backend, StatusIs(absl::StatusCode::kFailedPrecondition)) << backend.status();
  const std::string message(backend.status().message());
  EXPECT_TRUE(message.find("loraserve was built without CUDA") != std::string::npos ||
              message.find("no CUDA GPU found") != std::string::npos)
      << message;
}

TEST(CudaFactoryTest, RejectsUnsupportedWeightDtype) {
  absl::StatusOr<std::unique_ptr<Backend>> backend =
      CreateCudaBackend({.weight_dtype = DType::kF16});
  // Without a GPU the missing device is reported first; with one, the option.
  EXPECT_FALSE(backend.ok());
}

}  // namespace
}  // namespace loraserve::kernels
