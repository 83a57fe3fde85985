// Composition of LoRA adapters: one adapter whose every module adds the
// weighted sum of its components' low-rank terms,
//   Δy = Σᵢ wᵢ · sᵢ · (x · Aᵢᵀ) · Bᵢᵀ,
// each component at its own rank. It is built in PEFT's "cat" form
// (add_weighted_adapter(..., combination_type="cat")): per module the
// components' A matrices are stacked, each scaled by wᵢ · sᵢ, and their B
// matrices concatenated, at rank Σᵢ rᵢ and scale 1. A module adapted by only
// some components takes only theirs. The result is an ordinary LoraAdapter,
// so the unmerged batched path, device upload and merged sets can serve it as
// they serve a loaded one.
//
// PEFT's cat keeps the first adapter's use_rslora for the new adapter (whose
// alpha and r both become Σ rᵢ), so its scale is 1 only when that first
// adapter is not rsLoRA; the sum here is the one above whatever the order.
//
// Refused (InvalidArgument, naming the component): no components or more
// than kMaxComposedAdapters, a non-finite weight or one outside
// [-kMaxCompositionWeight, kMaxCompositionWeight], components of different
// base models, a DoRA component (its magnitudes normalise its own W + s·B·A,
// which no sum of terms keeps), a component with saved modules (whose copy
// would replace the base's for the whole mix), and a composed module rank
// above limits.max_rank (--max-lora-rank).
//
// Pure function; any thread. The components must hold their weights (not
// read as AdapterRead::kMetadata).
//
// Example:
//   ASSIGN_OR_RETURN(LoraAdapter mix,
//                    ComposeLoraAdapters({{"ocean", &ocean, 0.7f}, {"robot", &robot, 0.3f}},
//                                        {.max_rank = 64}, content_hash));
#ifndef LORASERVE_ADAPTERS_ADAPTER_COMPOSITION_H_
#define LORASERVE_ADAPTERS_ADAPTER_COMPOSITION_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/lora_adapter.h"

namespace loraserve::adapters {

// Components one composition may have.
inline constexpr int kMaxComposedAdapters = 8;
// The largest |weight| of a component.
inline constexpr float kMaxCompositionWeight = 100.0f;

struct CompositionPart {
  std::string id;                        // names the component in errors
  const LoraAdapter* adapter = nullptr;  // borrowed for the call
  float weight = 1.0f;
};

// Checks one component's weight (finite, within the bounds above); `id`
// names the component in the error.
absl::Status CheckCompositionWeight(const std::string& id, float weight);

// The composed adapter of `parts`, terms in the order given (the order only
// changes where each term's rows sit). `content_hash` becomes its
// content_hash(): the caller derives it from the components'.
absl::StatusOr<LoraAdapter> ComposeLoraAdapters(const std::vector<CompositionPart>& parts,
                                                const AdapterLimits& limits,
                                                std::string content_hash);

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_ADAPTER_COMPOSITION_H_
