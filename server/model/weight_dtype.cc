#include "server/model/weight_dtype.h"

#include "absl/strings/str_cat.h"

namespace loraserve::model {
namespace {

// A floating-point dtype by any of its PyTorch names, or none.
bool ParseFloatDType(absl::string_view name, kernels::DType* dtype) {
  if (name == "float32" || name == "float") {
    *dtype = kernels::DType::kF32;
  } else if (name == "bfloat16") {
    *dtype = kernels::DType::kBF16;
  } else if (name == "float16" || name == "half") {
    *dtype = kernels::DType::kF16;
  } else {
    return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<kernels::DType> ChooseWeightDType(absl::string_view dtype,
                                                 absl::string_view quantization,
                                                 const formats::ModelConfig& config) {
  if (quantization == "int8") {
    if (dtype != "auto") {
      return absl::InvalidArgumentError(
          absl::StrCat("--quantization int8 stores every weight matrix as int8; --dtype must "
                       "stay auto, got ",
                       dtype));
    }
    return kernels::DType::kQ8;
  }
  if (quantization != "none") {
    return absl::InvalidArgumentError(
        absl::StrCat("--quantization must be none or int8, got ", quantization));
  }
  kernels::DType chosen = kernels::DType::kF32;
  if (dtype == "auto") {
    // A torch_dtype we have no storage for (float64, say) keeps float32.
    ParseFloatDType(config.torch_dtype, &chosen);
    return chosen;
  }
  if (!ParseFloatDType(dtype, &chosen)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--dtype must be auto, float32, bfloat16 or float16 (or float, half), got ", dtype));
  }
  return chosen;
}

}  // namespace loraserve::model
