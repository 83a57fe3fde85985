#include "formats/safetensors.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/status_matchers.h"

namespace loraserve::formats {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using json = nlohmann::json;
using kernels::DType;

using TestTensor = SerializedTensor;

std::string Bytes(size_t n, uint8_t first = 0) {
  std::string bytes(n, '\0');
  for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<uint8_t>(first + i);
  return bytes;
}

// A fresh directory per test, so tests can run in parallel under ctest.
std::string TestDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string dir =
      ::testing::TempDir() + "safetensors_test_" + info->test_suite_name() + "_" + info->name();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// Length prefix + header + data, as the format lays them out.
std::string Serialize(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

std::string SafetensorsBytes(const std::vector<TestTensor>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  return SerializeSafetensors(tensors, metadata);
}

void WriteSafetensorsOrFail(const std::string& path, const std::vector<TestTensor>& tensors) {
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok()) << path;
}

std::vector<TestTensor> SampleTensors() {
  return {{"a.weight", "F32", {2, 3}, Bytes(24, 1)},
          {"b.weight", "F16", {4}, Bytes(8, 50)},
          {"c.weight", "BF16", {2, 1, 2}, Bytes(8, 90)},
          {"scalar", "F32", {}, Bytes(4, 7)},
          {"empty", "F32", {0, 5}, {}}};
}

TEST(SafetensorsFileTest, ReadsTensorsAndMetadata) {
  std::string path = TestDir() + "/x.safetensors";
  WriteBytes(path, SafetensorsBytes(SampleTensors(), {{"format", "pt"}}));
  auto file = SafetensorsFile::Open(path);
  ASSERT_OK(file);
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ((*file)->tensors().size(), 5u);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");

  for (const TestTensor& t : SampleTensors()) {
    const TensorInfo* info = (*file)->Find(t.name);
    ASSERT_NE(info, nullptr) << t.name;
    EXPECT_EQ(info->name, t.name);
    EXPECT_EQ(kernels::DTypeName(info->dtype), t.dtype);
    EXPECT_EQ(info->shape, t.shape);
    EXPECT_EQ(info->file, path);
    ASSERT_EQ(info->bytes, t.bytes.size());
    EXPECT_EQ(static_cast<size_t>(info->NumElements()) * kernels::DTypeSize(info->dtype),
              info->bytes);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(info->data), info->bytes), t.bytes)
        << t.name;
  }
  EXPECT_EQ((*file)->Find("scalar")->NumElements(), 1);
  EXPECT_EQ((*file)->Find("nope"), nullptr);
  auto missing = (*file)->Get("nope");
  EXPECT_THAT(missing, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(missing.status().message(), AllOf(HasSubstr("nope"), HasSubstr(path)));
}

TEST(SafetensorsFileTest, IntegerTensorsAreValidatedButNotExposed) {
  std::string path = TestDir() + "/x.safetensors";
  WriteSafetensorsOrFail(path,
                         {{"w", "F32", {2}, Bytes(8)}, {"position_ids", "I64", {1, 3}, Bytes(24)}});
  auto file = SafetensorsFile::Open(path);
  ASSERT_OK(file);
  EXPECT_EQ((*file)->tensors().size(), 1u);
  EXPECT_EQ((*file)->Find("position_ids"), nullptr);
  auto ids = (*file)->Get("position_ids");
  EXPECT_THAT(ids, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(ids.status().message(), "unsupported dtype I64 for tensor position_ids in file " +
                                        path + "; expected F32, F16 or BF16");
  EXPECT_OK((*file)->Get("w"));

  // Their layout is checked like any other tensor's.
  WriteSafetensorsOrFail(path, {{"position_ids", "I64", {1, 3}, Bytes(16)}});
  EXPECT_THAT(SafetensorsFile::Open(path).status().message(),
              AllOf(HasSubstr("position_ids"), HasSubstr("I64"), HasSubstr("span 16")));
}

// One malformed file per row: the error must name the file, the culprit and
// what was expected.
struct BadCase {
  const char* label;
  std::string bytes;
  std::vector<std::string> expected;  // substrings of the message
};

std::string Entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return "{\"dtype\":" + dtype + ",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

std::string OneTensor(const std::string& entry, size_t data_bytes) {
  return Serialize("{\"t\":" + entry + "}", std::string(data_bytes, 'x'));
}

std::vector<BadCase> BadCases() {
  std::string huge_length(8, '\xff');
  std::string past_end = Serialize("{}", "");
  past_end[0] = 100;
  return {
      {"empty file", "", {"0 bytes", "expected at least the 8-byte header length"}},
      {"short file", "abc", {"3 bytes"}},
      {"header past end", past_end, {"header length 100", "expected at most 2"}},
      {"absurd header", huge_length + "{}", {"header length 18446744073709551615"}},
      {"invalid json", Serialize("{\"t\": [", ""), {"not valid JSON"}},
      {"not an object", Serialize("[1, 2]", ""), {"header is a JSON array", "expected an object"}},
      {"entry not object", Serialize("{\"t\": 3}", ""), {"'t'", "not an object"}},
      {"missing dtype", OneTensor("{\"shape\":[1],\"data_offsets\":[0,4]}", 4), {"'t'", "dtype"}},
      {"dtype not string", OneTensor(Entry("5", "[1]", "[0,4]"), 4), {"'t'", "dtype"}},
      {"unknown dtype",
       OneTensor(Entry("\"Q4_K\"", "[1]", "[0,4]"), 4),
       {"'t'", "unknown dtype Q4_K", "expected"}},
      {"missing shape",
       OneTensor("{\"dtype\":\"F32\",\"data_offsets\":[0,4]}", 4),
       {"'t'", "shape"}},
      {"shape not array", OneTensor(Entry("\"F32\"", "4", "[0,4]"), 4), {"'t'", "shape"}},
      {"negative dim",
       OneTensor(Entry("\"F32\"", "[2,-1]", "[0,4]"), 4),
       {"'t'", "shape[1] is -1", "non-negative"}},
      {"float dim",
       OneTensor(Entry("\"F32\"", "[1.5]", "[0,4]"), 4),
       {"'t'", "shape[0] is 1.5", "integer"}},
      {"overflowing shape",
       OneTensor(Entry("\"F32\"", "[4294967296,4294967296]", "[0,4]"), 4),
       {"'t'", "overflows"}},
      {"missing offsets",
       OneTensor("{\"dtype\":\"F32\",\"shape\":[1]}", 4),
       {"'t'", "data_offsets", "[begin, end]"}},
      {"three offsets", OneTensor(Entry("\"F32\"", "[1]", "[0,4,8]"), 8), {"'t'", "[begin, end]"}},
      {"negative offset",
       OneTensor(Entry("\"F32\"", "[1]", "[-4,0]"), 4),
       {"'t'", "data_offsets[0] is -4"}},
      {"begin after end",
       OneTensor(Entry("\"F32\"", "[0]", "[4,0]"), 4),
       {"'t'", "begin after end"}},
      {"past data section",
       OneTensor(Entry("\"F32\"", "[2]", "[0,8]"), 4),
       {"'t'", "extend past the data section of 4 bytes"}},
      {"size mismatch",
       OneTensor(Entry("\"F32\"", "[3]", "[0,8]"), 8),
       {"'t'", "needs 3 x 4 bytes but data_offsets span 8"}},
      {"overlap",
       Serialize("{\"a\":" + Entry("\"F32\"", "[2]", "[0,8]") +
                     ",\"b\":" + Entry("\"F16\"", "[2]", "[4,8]") + "}",
                 std::string(8, 'x')),
       {"'b'", "overlap those of tensor 'a'"}},
      {"metadata not object", Serialize("{\"__metadata__\": 1}", ""), {"__metadata__", "object"}},
      {"metadata value not string",
       Serialize("{\"__metadata__\": {\"k\": 1}}", ""),
       {"__metadata__ entry 'k'", "expected a string"}},
  };
}

TEST(SafetensorsFileTest, RejectsMalformedFilesWithNamedErrors) {
  std::string path = TestDir() + "/bad.safetensors";
  for (const BadCase& c : BadCases()) {
    SCOPED_TRACE(c.label);
    WriteBytes(path, c.bytes);
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok());
    EXPECT_THAT(file, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(file.status().message(), HasSubstr(path));
    for (const std::string& part : c.expected) {
      EXPECT_THAT(file.status().message(), HasSubstr(part));
    }
  }
}

// An upload in memory gets the same index and the same errors as a file.
TEST(SafetensorsFileTest, FromBufferMatchesOpen) {
  const std::string bytes = SafetensorsBytes(SampleTensors());
  auto file = SafetensorsFile::FromBuffer(bytes, "upload.safetensors");
  ASSERT_OK(file);
  EXPECT_EQ((*file)->tensors().size(), 5u);
  for (const TestTensor& t : SampleTensors()) {
    const TensorInfo* info = (*file)->Find(t.name);
    ASSERT_NE(info, nullptr) << t.name;
    EXPECT_EQ(info->shape, t.shape);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(info->data), info->bytes), t.bytes);
  }
  for (const BadCase& c : BadCases()) {
    SCOPED_TRACE(c.label);
    auto bad = SafetensorsFile::FromBuffer(c.bytes, "upload.safetensors");
    ASSERT_FALSE(bad.ok());
    EXPECT_THAT(bad, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(bad.status().message(), HasSubstr("upload.safetensors"));
    for (const std::string& part : c.expected) {
      EXPECT_THAT(bad.status().message(), HasSubstr(part));
    }
  }
}

// Found by reading the code behind the fuzz targets: a shape's error message
// dumped it, and dump() recurses once per level, so an uploaded header of
// nested arrays overflowed the stack.
TEST(SafetensorsFileTest, RefusesDeeplyNestedHeadersBeforeParsing) {
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  const std::string bytes = Serialize(
      R"({"t": {"dtype": "F32", "shape": [)" + deep + R"(], "data_offsets": [0, 0]}})", "");
  auto file = SafetensorsFile::FromBuffer(bytes, "upload.safetensors");
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(file, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(file.status().message(),
              AllOf(HasSubstr("upload.safetensors"), HasSubstr("deeper than 64 levels")));
}

TEST(SafetensorsFileTest, MissingFileIsNotFound) {
  std::string path = TestDir() + "/absent.safetensors";
  auto file = SafetensorsFile::Open(path);
  EXPECT_THAT(file, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(file.status().message(), HasSubstr(path));
}

// Reads every byte of every exposed tensor, so a tensor pointing outside the
// mapping would fault here.
uint64_t TouchAll(const SafetensorsFile& file) {
  uint64_t sum = 0;
  for (const auto& [name, info] : file.tensors()) {
    for (size_t i = 0; i < info.bytes; ++i) sum += info.data[i];
  }
  return sum;
}

TEST(SafetensorsFileTest, SurvivesTruncationsAndByteFlips) {
  std::string path = TestDir() + "/fuzz.safetensors";
  const std::string valid = SafetensorsBytes(SampleTensors(), {{"format", "pt"}});
  for (size_t length = 0; length < valid.size(); ++length) {
    WriteBytes(path, valid.substr(0, length));
    // The last tensor ends at the end of the file, so every truncation fails.
    EXPECT_FALSE(SafetensorsFile::Open(path).ok()) << "length " << length;
  }
  size_t data_bytes = 0;
  for (const TestTensor& t : SampleTensors()) data_bytes += t.bytes.size();
  std::mt19937 rng(1234);
  int opened = 0;
  for (int round = 0; round < 3000; ++round) {
    std::string bytes = valid;
    int flips = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < flips; ++i) {
      // Three rounds in four flip only the length prefix and header, where parsing happens.
      size_t at = rng() % (round % 4 == 0 ? bytes.size() : bytes.size() - data_bytes);
      bytes[at] = static_cast<char>(rng() & 0xff);
    }
    WriteBytes(path, bytes);
    auto file = SafetensorsFile::Open(path);
    if (file.ok()) {
      ++opened;
      TouchAll(**file);
    } else {
      EXPECT_FALSE(file.status().message().empty());
    }
  }
  // Flips inside the data section or in header whitespace still parse.
  EXPECT_GT(opened, 0);
}

TEST(CheckpointTest, OpensSingleFile) {
  std::string dir = TestDir();
  WriteSafetensorsOrFail(dir + "/model.safetensors", SampleTensors());
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_OK(ckpt);
  EXPECT_THAT((*ckpt)->Names(), ElementsAre("a.weight", "b.weight", "c.weight", "empty", "scalar"));
  ASSERT_NE((*ckpt)->Find("b.weight"), nullptr);
  EXPECT_EQ((*ckpt)->Find("b.weight")->dtype, DType::kF16);
  EXPECT_EQ((*ckpt)->Find("zzz"), nullptr);
  auto missing = (*ckpt)->Get("zzz");
  EXPECT_THAT(missing, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(missing.status().message(), AllOf(HasSubstr("zzz"), HasSubstr(dir)));
}

TEST(CheckpointTest, NeitherFileIsNotFoundNamingBoth) {
  std::string dir = TestDir();
  auto ckpt = Checkpoint::Open(dir);
  EXPECT_THAT(ckpt, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(ckpt.status().message(), AllOf(HasSubstr(dir), HasSubstr("model.safetensors "),
                                             HasSubstr("model.safetensors.index.json")));
}

void WriteIndex(const std::string& dir, const json& weight_map) {
  WriteBytes(dir + "/model.safetensors.index.json",
             json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump());
}

TEST(CheckpointTest, OpensShardsFromIndex) {
  std::string dir = TestDir();
  WriteSafetensorsOrFail(dir + "/model-00001-of-00002.safetensors",
                         {{"x", "F32", {2}, Bytes(8)}, {"ids", "I32", {2}, Bytes(8)}});
  WriteSafetensorsOrFail(dir + "/model-00002-of-00002.safetensors",
                         {{"y", "BF16", {3}, Bytes(6, 9)}});
  // The index wins over a stale single file beside it.
  WriteSafetensorsOrFail(dir + "/model.safetensors", {{"stale", "F32", {1}, Bytes(4)}});
  WriteIndex(dir, {{"x", "model-00001-of-00002.safetensors"},
                   {"ids", "model-00001-of-00002.safetensors"},
                   {"y", "model-00002-of-00002.safetensors"}});
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_OK(ckpt);
  EXPECT_THAT((*ckpt)->Names(), ElementsAre("x", "y"));
  ASSERT_NE((*ckpt)->Find("y"), nullptr);
  EXPECT_EQ((*ckpt)->Find("y")->file, dir + "/model-00002-of-00002.safetensors");
  EXPECT_EQ((*ckpt)->Find("y")->data[0], 9);
  EXPECT_EQ((*ckpt)->Find("stale"), nullptr);
  EXPECT_THAT((*ckpt)->Get("ids").status().message(),
              HasSubstr("unsupported dtype I32 for tensor ids in file " + dir +
                        "/model-00001-of-00002.safetensors"));
}

TEST(CheckpointTest, ShardErrors) {
  std::string dir = TestDir();
  const std::string index = dir + "/model.safetensors.index.json";
  WriteSafetensorsOrFail(dir + "/a.safetensors", {{"x", "F32", {1}, Bytes(4)}});
  WriteSafetensorsOrFail(dir + "/b.safetensors",
                         {{"y", "F32", {1}, Bytes(4)}, {"x", "F32", {1}, Bytes(4)}});

  WriteIndex(dir, {{"x", "a.safetensors"}, {"z", "missing.safetensors"}});
  auto status = Checkpoint::Open(dir).status();
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(status.message(), AllOf(HasSubstr(dir + "/missing.safetensors"), HasSubstr(index)));

  WriteIndex(dir, {{"x", "a.safetensors"}, {"w", "a.safetensors"}});
  EXPECT_THAT(Checkpoint::Open(dir).status().message(),
              AllOf(HasSubstr("tensor w"), HasSubstr("a.safetensors but that shard lacks it")));

  WriteIndex(dir, {{"x", "a.safetensors"}, {"y", "b.safetensors"}});
  EXPECT_THAT(Checkpoint::Open(dir).status().message(),
              AllOf(HasSubstr("tensor x is in both"), HasSubstr(dir + "/a.safetensors"),
                    HasSubstr(dir + "/b.safetensors")));

  WriteIndex(dir, {{"x", "../a.safetensors"}});
  EXPECT_THAT(Checkpoint::Open(dir).status().message(),
              AllOf(HasSubstr("tensor 'x'"), HasSubstr("expected a file name")));

  WriteBytes(index, "{\"weight_map\": ");
  EXPECT_THAT(Checkpoint::Open(dir).status().message(),
              AllOf(HasSubstr(index), HasSubstr("not valid JSON")));

  WriteBytes(index, "{\"metadata\": {}}");
  EXPECT_THAT(Checkpoint::Open(dir).status().message(),
              AllOf(HasSubstr(index), HasSubstr("weight_map")));

  // A malformed shard reports the shard's own error.
  WriteBytes(dir + "/a.safetensors", "xx");
  WriteIndex(dir, {{"x", "a.safetensors"}});
  EXPECT_THAT(Checkpoint::Open(dir).status().message(),
              AllOf(HasSubstr(dir + "/a.safetensors"), HasSubstr("2 bytes")));
}

TEST(CheckpointTest, ReadsSharedTinyModel) {
  const std::string dir = LORASERVE_SHARED_DIR "/models/aidreams-260k";
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_OK(ckpt);
  // Embeddings, final norm, and 9 tensors per layer; lm_head is tied.
  EXPECT_EQ((*ckpt)->Names().size(), 2u + 4u * 9u);
  EXPECT_EQ((*ckpt)->Find("lm_head.weight"), nullptr);
  const TensorInfo* embed = (*ckpt)->Find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, DType::kF32);
  EXPECT_THAT(embed->shape, ElementsAre(512, 64));
  EXPECT_EQ(embed->bytes, 512u * 64u * 4u);
  const TensorInfo* down = (*ckpt)->Find("model.layers.3.mlp.down_proj.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_THAT(down->shape, ElementsAre(64, 172));
  double sum_sq = 0;
  for (int64_t i = 0; i < embed->NumElements(); ++i) {
    float v;
    std::memcpy(&v, embed->data + 4 * i, 4);
    ASSERT_TRUE(std::isfinite(v));
    sum_sq += double{v} * v;
  }
  EXPECT_GT(sum_sq, 0.0);
}

}  // namespace
}  // namespace loraserve::formats
