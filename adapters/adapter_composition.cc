#include "adapters/adapter_composition.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"

namespace loraserve::adapters {
namespace {

// One module of the composition: the cat form of the components' terms.
// `where` names the module in errors.
absl::Status ComposeModule(const std::vector<CompositionPart>& parts,
                           const std::vector<const LoraWeights*>& terms, const std::string& where,
                           const AdapterLimits& limits, LoraWeights* out) {
  int rank = 0;
  for (const LoraWeights* w : terms) rank += w->empty() ? 0 : w->rank;
  if (rank == 0) return absl::OkStatus();
  if (rank > limits.max_rank) {
    return absl::InvalidArgumentError(absl::StrCat("the composed adapter's ", where, " has rank ",
                                                   rank,
                                                   " (the sum of its components' "
                                                   "ranks), above the limit of ",
                                                   limits.max_rank, " (--max-lora-rank)"));
  }
  out->rank = rank;
  out->scale = 1.0f;  // each term's weight × scale is folded into its rows of A
  for (size_t i = 0; i < terms.size(); ++i) {
    const LoraWeights& w = *terms[i];
    if (w.empty()) continue;
    out->in_features = w.in_features;
    out->out_features = w.out_features;
    const float factor = parts[i].weight * w.scale;
    for (float v : w.a) out->a.push_back(factor * v);
  }
  // B: [out, rank], each row the components' rows side by side.
  out->b.reserve(static_cast<size_t>(out->out_features) * rank);
  for (int64_t row = 0; row < out->out_features; ++row) {
    for (const LoraWeights* w : terms) {
      if (w->empty()) continue;
      const auto begin = w->b.begin() + row * w->rank;
      out->b.insert(out->b.end(), begin, begin + w->rank);
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckCompositionWeight(const std::string& id, float weight) {
  if (!std::isfinite(weight) || std::abs(weight) > kMaxCompositionWeight) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter \"", id, "\": weight ", weight, " must be a finite number in [-",
                     kMaxCompositionWeight, ", ", kMaxCompositionWeight, "]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<LoraAdapter> ComposeLoraAdapters(const std::vector<CompositionPart>& parts,
                                                const AdapterLimits& limits,
                                                std::string content_hash) {
  if (parts.empty() || parts.size() > static_cast<size_t>(kMaxComposedAdapters)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a composition takes 1 to ", kMaxComposedAdapters, " adapters, got ", parts.size()));
  }
  const LoraAdapter& first = *parts.front().adapter;
  for (const CompositionPart& part : parts) {
    RETURN_IF_ERROR(CheckCompositionWeight(part.id, part.weight));
    const LoraAdapter& adapter = *part.adapter;
    if (adapter.config().use_dora()) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter \"", part.id,
                       "\" is a DoRA adapter (use_dora): its magnitudes normalise its "
                       "own weights, so it cannot be part of a composition"));
    }
    if (!adapter.saved().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter \"", part.id,
          "\" saves whole modules (modules_to_save: ", absl::StrJoin(adapter.saved().paths, ", "),
          "), which would replace the base's for the whole composition; it cannot be part of one"));
    }
    if (adapter.num_layers() != first.num_layers() ||
        adapter.hidden_size() != first.hidden_size()) {
      return absl::InvalidArgumentError(absl::StrCat("adapter \"", part.id,
                                                     "\" is for a different base model than \"",
                                                     parts.front().id, "\""));
    }
  }

  std::set<std::string> targets;
  for (const CompositionPart& part : parts) {
    for (const std::string& name : part.adapter->target_modules()) targets.insert(name);
  }
  const std::string config_text =
      absl::StrCat(R"({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [")",
                   absl::StrJoin(targets, "\", \""), "\"]}");
  ASSIGN_OR_RETURN(formats::PeftLoraConfig config,
                   formats::PeftLoraConfig::Parse(config_text, "composition"));
  LoraAdapter out(std::move(config));
  out.layers_.resize(first.num_layers());
  out.hidden_size_ = first.hidden_size();
  std::vector<const LoraWeights*> terms(parts.size());
  for (int64_t layer = 0; layer < first.num_layers(); ++layer) {
    for (LoraModule module : kAllLoraModules) {
      for (size_t i = 0; i < parts.size(); ++i)
        terms[i] = &parts[i].adapter->weights(layer, module);
      RETURN_IF_ERROR(ComposeModule(parts, terms, LoraModulePath(layer, module), limits,
                                    &out.layers_[layer][static_cast<int>(module)]));
    }
  }
  for (HeadModule module : kAllHeadModules) {
    for (size_t i = 0; i < parts.size(); ++i) terms[i] = &parts[i].adapter->head_weights(module);
    RETURN_IF_ERROR(ComposeModule(parts, terms, HeadModulePath(module), limits,
                                  &out.heads_[static_cast<int>(module)]));
  }
  for (const auto& layer : out.layers_) {
    for (const LoraWeights& w : layer) out.bytes_ += (w.a.size() + w.b.size()) * sizeof(float);
  }
  for (const LoraWeights& w : out.heads_) out.bytes_ += (w.a.size() + w.b.size()) * sizeof(float);
  out.content_hash_ = std::move(content_hash);
  return out;
}

}  // namespace loraserve::adapters
