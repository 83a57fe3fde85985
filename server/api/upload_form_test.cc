#include "server/api/upload_form.h"

#include <string>

#include "formats/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::api {
namespace {

using ::testing::HasSubstr;

const Principal kAcme = {"acme", Role::kTenant};

// Two F32 tensors of 2×3 and 4 elements.
std::string Tensors() {
  return formats::SerializeSafetensors(
      {{"a", "F32", {2, 3}, std::string(24, '\0')}, {"b", "BF16", {4}, std::string(8, '\0')}});
}

TEST(ParseUploadFormTest, ReadsTheFields) {
  const std::string tensors = Tensors();
  absl::StatusOr<UploadForm> form = ParseUploadForm(kAcme, {{"name", "x"},
                                                            {"adapter_config.json", "{}"},
                                                            {"adapter_model.safetensors", tensors},
                                                            {"replace", "true"}});
  ASSERT_OK(form);
  EXPECT_EQ(form->id, "acme/x");
  EXPECT_EQ(form->adapter_config_json, "{}");
  EXPECT_EQ(form->adapter_model_safetensors, tensors);
  EXPECT_TRUE(form->replace);
  EXPECT_EQ(form->float32_bytes, (6 + 4) * 4);

  form = ParseUploadForm(kAcme, {{"name", "x"},
                                 {"adapter_config.json", "{}"},
                                 {"adapter_model.safetensors", tensors},
                                 {"replace", "yes"}});
  ASSERT_OK(form);
  EXPECT_FALSE(form->replace);
  EXPECT_FALSE(form->compact_min_energy.has_value());
  EXPECT_FALSE(form->compact_max_relative_error.has_value());

  form = ParseUploadForm(kAcme, {{"name", "x"},
                                 {"adapter_config.json", "{}"},
                                 {"adapter_model.safetensors", tensors},
                                 {"compact_max_relative_error", "0.05"}});
  ASSERT_OK(form);
  EXPECT_EQ(form->compact_max_relative_error, 0.05);
  EXPECT_FALSE(form->compact_min_energy.has_value());
}

TEST(ParseUploadFormTest, CompactionFieldsAreOneNumber) {
  const std::string tensors = Tensors();
  const absl::Status word = ParseUploadForm(kAcme, {{"name", "x"},
                                                    {"adapter_config.json", "{}"},
                                                    {"adapter_model.safetensors", tensors},
                                                    {"compact_min_energy", "most"}})
                                .status();
  EXPECT_TRUE(absl::IsInvalidArgument(word)) << word;
  EXPECT_THAT(word.message(), HasSubstr("\"compact_min_energy\" is \"most\", expected a number"));
  const absl::Status both = ParseUploadForm(kAcme, {{"name", "x"},
                                                    {"adapter_config.json", "{}"},
                                                    {"adapter_model.safetensors", tensors},
                                                    {"compact_min_energy", "0.9"},
                                                    {"compact_max_relative_error", "0.1"}})
                                .status();
  EXPECT_THAT(both.message(), HasSubstr("not both"));
}

TEST(ParseUploadFormTest, NamesWhatIsWrong) {
  const std::string tensors = Tensors();
  absl::Status missing =
      ParseUploadForm(kAcme, {{"name", "x"}, {"adapter_model.safetensors", tensors}}).status();
  EXPECT_THAT(missing.message(), HasSubstr("missing field \"adapter_config.json\""));
  absl::Status other_tenant = ParseUploadForm(kAcme, {{"name", "globex/x"},
                                                      {"adapter_config.json", "{}"},
                                                      {"adapter_model.safetensors", tensors}})
                                  .status();
  EXPECT_TRUE(absl::IsPermissionDenied(other_tenant)) << other_tenant;
  absl::Status truncated =
      ParseUploadForm(kAcme, {{"name", "x"},
                              {"adapter_config.json", "{}"},
                              {"adapter_model.safetensors", tensors.substr(0, 20)}})
          .status();
  EXPECT_TRUE(absl::IsInvalidArgument(truncated)) << truncated;
  EXPECT_THAT(truncated.message(), HasSubstr("adapter_model.safetensors"));
}

}  // namespace
}  // namespace loraserve::api
