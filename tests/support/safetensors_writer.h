// Writes safetensors files for tests (valid ones, or deliberately broken).
#ifndef LORASERVE_TESTS_SUPPORT_SAFETENSORS_WRITER_H_
#define LORASERVE_TESTS_SUPPORT_SAFETENSORS_WRITER_H_

#include <cstdint>
#include <string>
#include <vector>

namespace loraserve::testing {

struct TestTensor {
  std::string name;
  std::string dtype;  // "F32", "F16", "BF16", "I32", ...
  std::vector<int64_t> shape;
  std::string bytes;  // raw little-endian contents
};

// F32 tensor bytes from floats.
std::string F32Bytes(const std::vector<float>& values);

// The full file contents (header + data) for `tensors`, laid out in order.
std::string SafetensorsBytes(const std::vector<TestTensor>& tensors);

// Writes `contents` to `path`; returns false on failure.
bool WriteFile(const std::string& path, const std::string& contents);

}  // namespace loraserve::testing

#endif  // LORASERVE_TESTS_SUPPORT_SAFETENSORS_WRITER_H_
