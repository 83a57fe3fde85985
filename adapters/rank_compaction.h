// Rank compaction: an adapter stored at a higher rank than its update needs
// is refactored, module by module, to the smallest rank that keeps a chosen
// share of the update's energy.
//
// For a module, ΔW = s·B·A (out × in, rank ≤ r). Its SVD comes from two thin
// QRs and one r×r SVD (B = Q_B·R_B, Aᵀ = Q_A·R_A, s·R_B·R_Aᵀ = U·Σ·Vᵀ), so it
// costs O((in + out)·r²), never an out × in matrix. The energy of singular
// value i is σᵢ² / Σσ²; the kept rank k is the smallest whose first k values
// hold `min_energy`, which is the same as a relative Frobenius error
// ‖ΔW − ΔW_k‖ / ‖ΔW‖ ≤ √(1 − min_energy) (Eckart–Young: ΔW_k is the best rank-k
// approximation). The module is then stored as B' = Q_B·U_k·√Σ_k,
// A' = √Σ_k·V_kᵀ·Q_Aᵀ with scale 1 (s folded in); a module whose k is its rank
// keeps its weights bit for bit. DoRA magnitudes and saved modules are left as
// they are (DoRA's norm is taken later, at device upload, of what is stored).
//
// Example:
//   ASSIGN_OR_RETURN(CompactionTarget target, CompactionTargetFrom(0.99, std::nullopt));
//   ASSIGN_OR_RETURN(CompactionReport report, CompactRanks(target, &adapter));
#ifndef LORASERVE_ADAPTERS_RANK_COMPACTION_H_
#define LORASERVE_ADAPTERS_RANK_COMPACTION_H_

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/lora_adapter.h"

namespace loraserve::adapters {

struct CompactionTarget {
  double min_energy = 1;  // in (0, 1]
};

// The target of an energy share in (0, 1] or a relative Frobenius error in
// [0, 1): exactly one of them; InvalidArgument naming the field otherwise.
absl::StatusOr<CompactionTarget> CompactionTargetFrom(std::optional<double> min_energy,
                                                      std::optional<double> max_relative_error);

// One adapted module's spectrum and what was kept of it.
struct ModuleSpectrum {
  std::string module;  // "layers.3.q_proj", "embed_tokens", "lm_head"
  int rank_before = 0;
  int rank = 0;                // kept
  double kept_energy = 1;      // of the first `rank` singular values
  std::vector<double> energy;  // σᵢ² / Σσ², descending; all 0 for a zero update
};

struct CompactionReport {
  double min_energy = 1;
  std::vector<int> ranks_before;        // LoraAdapter::ranks() before
  size_t bytes_before = 0;              // LoraAdapter::bytes() before
  std::vector<ModuleSpectrum> modules;  // decoder layers in order, then the heads
};

// Compacts every adapted module of `adapter` (read with its weights) to
// `target`, and derives its content hash from the old one and the target
// (a compacted copy is another adapter to every cache keyed by hash).
// FailedPrecondition when the weights were not read (AdapterRead::kMetadata).
absl::StatusOr<CompactionReport> CompactRanks(const CompactionTarget& target, LoraAdapter* adapter);

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_RANK_COMPACTION_H_
