// The storage dtype of a model's weight matrices on the CPU backend, from the
// `--dtype` and `--quantization` flags and the model's config.json, as vLLM
// reads them:
//   --dtype auto       the checkpoint's own dtype (config.json torch_dtype:
//                      float32, bfloat16 or float16; float32 when it names
//                      none), so weights are kept as stored
//   --dtype float32 | bfloat16 | float16   (also float, half): converted
//                      once at load
//   --quantization int8   weight-only int8 in groups of 128 along each row
//                      (kernels/quantization.h), from a checkpoint of any
//                      dtype; --dtype must then stay auto
// Everything else (activations, norms, attention, the KV cache) stays float32.
//
// Example:
//   ASSIGN_OR_RETURN(DType dtype, ChooseWeightDType("auto", "none", config));
#ifndef LORASERVE_SERVER_MODEL_WEIGHT_DTYPE_H_
#define LORASERVE_SERVER_MODEL_WEIGHT_DTYPE_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "formats/model_config.h"
#include "kernels/backend.h"

namespace loraserve::model {

// INVALID_ARGUMENT naming the flag for an unknown value or a contradiction.
absl::StatusOr<kernels::DType> ChooseWeightDType(absl::string_view dtype,
                                                 absl::string_view quantization,
                                                 const formats::ModelConfig& config);

}  // namespace loraserve::model

#endif  // LORASERVE_SERVER_MODEL_WEIGHT_DTYPE_H_
