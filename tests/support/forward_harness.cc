#include "tests/support/forward_harness.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "adapters/lora_adapter.h"
#include "base/status_macros.h"
#include "tests/support/golden_cases.h"

namespace loraserve::test_support {

PagedTestCache::PagedTestCache(kernels::Backend* backend, const model::KvShape& shape,
                               int32_t num_seqs, int32_t max_tokens)
    : blocks_per_seq_((max_tokens + kTestBlockSize - 1) / kTestBlockSize) {
  const int32_t num_blocks = num_seqs * blocks_per_seq_;
  view_.layout = {num_blocks, kTestBlockSize, static_cast<int32_t>(shape.num_kv_heads),
                  static_cast<int32_t>(shape.head_dim), backend->KvCacheDType()};
  const auto bytes = static_cast<size_t>(kernels::KvPoolBytes(view_.layout));
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    buffers_.push_back(*backend->Allocate(bytes));
    view_.k.push_back(buffers_.back().data());
    buffers_.push_back(*backend->Allocate(bytes));
    view_.v.push_back(buffers_.back().data());
  }
}

model::ForwardInput PrefillAll(const std::vector<std::vector<int32_t>>& seqs,
                               const PagedTestCache& cache) {
  model::ForwardInput in;
  in.max_blocks_per_seq = cache.blocks_per_seq();
  in.query_start.push_back(0);
  for (int32_t s = 0; s < static_cast<int32_t>(seqs.size()); ++s) {
    for (int32_t pos = 0; pos < static_cast<int32_t>(seqs[s].size()); ++pos) {
      in.logit_rows.push_back(static_cast<int32_t>(in.tokens.size()));
      in.tokens.push_back(seqs[s][pos]);
      in.positions.push_back(pos);
      in.slot_mapping.push_back(cache.Block(s, pos / kTestBlockSize) * kTestBlockSize +
                                pos % kTestBlockSize);
    }
    in.query_start.push_back(static_cast<int32_t>(in.tokens.size()));
    in.context_lens.push_back(static_cast<int32_t>(seqs[s].size()));
    for (int32_t b = 0; b < cache.blocks_per_seq(); ++b) {
      in.block_tables.push_back(cache.Block(s, b));
    }
  }
  return in;
}

model::ForwardInput DecodeOne(const std::vector<int32_t>& next_tokens,
                              const std::vector<int32_t>& positions, const PagedTestCache& cache) {
  model::ForwardInput in;
  in.max_blocks_per_seq = cache.blocks_per_seq();
  in.query_start.push_back(0);
  for (int32_t s = 0; s < static_cast<int32_t>(next_tokens.size()); ++s) {
    const int32_t pos = positions[s];
    in.logit_rows.push_back(s);
    in.tokens.push_back(next_tokens[s]);
    in.positions.push_back(pos);
    in.slot_mapping.push_back(cache.Block(s, pos / kTestBlockSize) * kTestBlockSize +
                              pos % kTestBlockSize);
    in.query_start.push_back(s + 1);
    in.context_lens.push_back(pos + 1);
    for (int32_t b = 0; b < cache.blocks_per_seq(); ++b) {
      in.block_tables.push_back(cache.Block(s, b));
    }
  }
  return in;
}

namespace {
constexpr const char* kSharedModelCase = "aidreams-260k";
}  // namespace

absl::StatusOr<std::vector<std::string>> SharedAdapterNames() {
  ASSIGN_OR_RETURN(std::vector<GoldenCase> cases, LoadAdapterCases());
  std::vector<std::string> names;
  for (const GoldenCase& c : cases) {
    if (c.base == kSharedModelCase) names.push_back(c.name);
  }
  return names;
}

absl::StatusOr<SharedModel> LoadSharedModel(kernels::Backend* backend,
                                            const std::vector<std::string>& adapter_names) {
  ASSIGN_OR_RETURN(std::vector<GoldenCase> models, LoadModelCases());
  ASSIGN_OR_RETURN(std::vector<GoldenCase> cases, LoadAdapterCases());
  SharedModel out;
  for (const GoldenCase& c : models) {
    if (c.name == kSharedModelCase) {
      ASSIGN_OR_RETURN(out.model, model::LlamaModel::Load(backend, c.model_dir, {}));
    }
  }
  if (out.model == nullptr) {
    return absl::NotFoundError(absl::StrCat("no model case ", kSharedModelCase));
  }
  for (const std::string& name : adapter_names) {
    const GoldenCase* found = nullptr;
    for (const GoldenCase& c : cases) {
      if (c.name == name && c.base == kSharedModelCase) found = &c;
    }
    if (found == nullptr) return absl::NotFoundError(absl::StrCat("no adapter case ", name));
    ASSIGN_OR_RETURN(adapters::LoraAdapter host,
                     adapters::LoadLoraAdapter(found->adapter_dir, out.model->adapter_shape(),
                                               {.max_rank = 64}));
    ASSIGN_OR_RETURN(std::unique_ptr<adapters::DeviceAdapter> device,
                     adapters::DeviceAdapter::Upload(backend, host));
    out.adapters.push_back(std::move(device));
  }
  return out;
}

float MaxAbsDiff(const float* a, const float* b, size_t n) {
  float worst = 0.0f;
  for (size_t i = 0; i < n; ++i) {
    const float d = std::fabs(a[i] - b[i]);
    if (std::isnan(d)) return std::numeric_limits<float>::quiet_NaN();
    worst = std::max(worst, d);
  }
  return worst;
}

}  // namespace loraserve::test_support
