#include "server/model/weight_dtype.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/support/status_matchers.h"

namespace loraserve::model {
namespace {

using ::loraserve::test_support::StatusIs;

using kernels::DType;
using ::testing::HasSubstr;

formats::ModelConfig WithTorchDType(const std::string& torch_dtype) {
  formats::ModelConfig config;
  config.torch_dtype = torch_dtype;
  return config;
}

TEST(ChooseWeightDTypeTest, AutoKeepsTheCheckpointDType) {
  EXPECT_EQ(*ChooseWeightDType("auto", "none", WithTorchDType("bfloat16")), DType::kBF16);
  EXPECT_EQ(*ChooseWeightDType("auto", "none", WithTorchDType("float16")), DType::kF16);
  EXPECT_EQ(*ChooseWeightDType("auto", "none", WithTorchDType("float32")), DType::kF32);
  // No torch_dtype, or one with no storage here: float32.
  EXPECT_EQ(*ChooseWeightDType("auto", "none", WithTorchDType("")), DType::kF32);
  EXPECT_EQ(*ChooseWeightDType("auto", "none", WithTorchDType("float64")), DType::kF32);
}

TEST(ChooseWeightDTypeTest, AnExplicitDTypeConvertsWhateverTheCheckpointHolds) {
  const formats::ModelConfig bf16 = WithTorchDType("bfloat16");
  EXPECT_EQ(*ChooseWeightDType("float32", "none", bf16), DType::kF32);
  EXPECT_EQ(*ChooseWeightDType("float", "none", bf16), DType::kF32);
  EXPECT_EQ(*ChooseWeightDType("float16", "none", bf16), DType::kF16);
  EXPECT_EQ(*ChooseWeightDType("half", "none", bf16), DType::kF16);
  EXPECT_EQ(*ChooseWeightDType("bfloat16", "none", WithTorchDType("float32")), DType::kBF16);
}

TEST(ChooseWeightDTypeTest, Int8QuantizesAnyCheckpoint) {
  for (const char* torch_dtype : {"float32", "bfloat16", "float16", ""}) {
    EXPECT_EQ(*ChooseWeightDType("auto", "int8", WithTorchDType(torch_dtype)), DType::kQ8);
  }
}

TEST(ChooseWeightDTypeTest, RefusesUnknownValuesAndContradictions) {
  const formats::ModelConfig config = WithTorchDType("bfloat16");
  absl::StatusOr<DType> bad = ChooseWeightDType("fp8", "none", config);
  EXPECT_THAT(bad, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad.status().message(), HasSubstr("--dtype must be auto, float32"));
  bad = ChooseWeightDType("auto", "int4", config);
  EXPECT_THAT(bad, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad.status().message(), HasSubstr("--quantization must be none or int8, got int4"));
  bad = ChooseWeightDType("bfloat16", "int8", config);
  EXPECT_THAT(bad, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad.status().message(), HasSubstr("--dtype must stay auto"));
}

}  // namespace
}  // namespace loraserve::model
