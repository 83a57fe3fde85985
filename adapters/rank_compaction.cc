#include "adapters/rank_compaction.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/sha256.h"

namespace loraserve::adapters {
namespace {

using RowMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using FloatRows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Q (rows × min(rows, cols)) and R (min(rows, cols) × cols) of m = Q·R.
struct ThinQr {
  Eigen::MatrixXd q;
  Eigen::MatrixXd r;
};

ThinQr Factor(const Eigen::MatrixXd& m) {
  const Eigen::Index k = std::min(m.rows(), m.cols());
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(m);
  ThinQr out;
  out.q = qr.householderQ() * Eigen::MatrixXd::Identity(m.rows(), k);
  out.r = qr.matrixQR().topRows(k).triangularView<Eigen::Upper>();
  return out;
}

// The smallest k >= 1 whose first k energies sum to `min_energy` (a hair of
// slack so that 1 is reached despite rounding), and that sum.
std::pair<int, double> KeptRank(const std::vector<double>& energy, double min_energy) {
  double kept = 0;
  for (size_t i = 0; i < energy.size(); ++i) {
    kept += energy[i];
    if (kept >= min_energy - 1e-12) return {static_cast<int>(i) + 1, std::min(kept, 1.0)};
  }
  return {std::max<int>(1, static_cast<int>(energy.size())), energy.empty() ? 1.0 : kept};
}

// Compacts one module in place; returns its spectrum.
ModuleSpectrum CompactModule(std::string name, double min_energy, LoraWeights* w) {
  const Eigen::Index r = w->rank;
  const Eigen::Index in = w->in_features;
  const Eigen::Index out = w->out_features;
  const RowMajor a = Eigen::Map<const FloatRows>(w->a.data(), r, in).cast<double>();
  const RowMajor b = Eigen::Map<const FloatRows>(w->b.data(), out, r).cast<double>();
  const ThinQr qb = Factor(b);
  const ThinQr qa = Factor(a.transpose());
  const Eigen::MatrixXd core = static_cast<double>(w->scale) * qb.r * qa.r.transpose();
  const Eigen::JacobiSVD<Eigen::MatrixXd> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd sigma = svd.singularValues();

  ModuleSpectrum spectrum;
  spectrum.module = std::move(name);
  spectrum.rank_before = w->rank;
  const double total = sigma.squaredNorm();
  for (Eigen::Index i = 0; i < sigma.size(); ++i) {
    spectrum.energy.push_back(total > 0 ? sigma[i] * sigma[i] / total : 0.0);
  }
  const auto [k, kept] = KeptRank(spectrum.energy, total > 0 ? min_energy : 0);
  spectrum.rank = std::min<int>(k, w->rank);
  spectrum.kept_energy = total > 0 ? kept : 1;
  if (spectrum.rank == w->rank) return spectrum;

  const Eigen::VectorXd root = sigma.head(spectrum.rank).cwiseSqrt();
  const Eigen::MatrixXd new_b = qb.q * svd.matrixU().leftCols(spectrum.rank) * root.asDiagonal();
  const Eigen::MatrixXd new_a =
      root.asDiagonal() * svd.matrixV().leftCols(spectrum.rank).transpose() * qa.q.transpose();
  w->rank = spectrum.rank;
  w->scale = 1;
  w->b.resize(static_cast<size_t>(out * spectrum.rank));
  w->a.resize(static_cast<size_t>(spectrum.rank * in));
  Eigen::Map<FloatRows>(w->b.data(), out, spectrum.rank) = new_b.cast<float>();
  Eigen::Map<FloatRows>(w->a.data(), spectrum.rank, in) = new_a.cast<float>();
  return spectrum;
}

}  // namespace

absl::StatusOr<CompactionTarget> CompactionTargetFrom(std::optional<double> min_energy,
                                                      std::optional<double> max_relative_error) {
  if (min_energy.has_value() == max_relative_error.has_value()) {
    return absl::InvalidArgumentError(
        "rank compaction takes exactly one of min_energy (in (0, 1]) and max_relative_error "
        "(in [0, 1))");
  }
  if (min_energy) {
    if (!(*min_energy > 0 && *min_energy <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("rank compaction: min_energy is ", *min_energy,
                       ", expected a share of the update's energy in (0, 1] (1: keep every rank)"));
    }
    return CompactionTarget{*min_energy};
  }
  if (!(*max_relative_error >= 0 && *max_relative_error < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank compaction: max_relative_error is ", *max_relative_error,
                     ", expected a relative Frobenius error in [0, 1) (0: keep every rank)"));
  }
  return CompactionTarget{1 - *max_relative_error * *max_relative_error};
}

absl::StatusOr<CompactionReport> CompactRanks(const CompactionTarget& target,
                                              LoraAdapter* adapter) {
  if (adapter->content_hash_.empty()) {
    return absl::FailedPreconditionError(
        "rank compaction needs the adapter's weights (it was read as metadata only)");
  }
  CompactionReport report;
  report.min_energy = target.min_energy;
  report.ranks_before = adapter->ranks();
  report.bytes_before = adapter->bytes_;
  const auto compact = [&](std::string name, LoraWeights* w) {
    if (w->empty()) return;
    const int before = w->rank;
    report.modules.push_back(CompactModule(std::move(name), target.min_energy, w));
    adapter->bytes_ -= static_cast<size_t>(before - w->rank) *
                       static_cast<size_t>(w->in_features + w->out_features) * sizeof(float);
  };
  for (size_t layer = 0; layer < adapter->layers_.size(); ++layer) {
    for (LoraModule module : kAllLoraModules) {
      compact(absl::StrCat("layers.", layer, ".", LoraModuleName(module)),
              &adapter->layers_[layer][static_cast<int>(module)]);
    }
  }
  for (HeadModule module : kAllHeadModules) {
    compact(HeadModuleName(module), &adapter->heads_[static_cast<int>(module)]);
  }
  adapter->content_hash_ =
      Sha256Hex(absl::StrCat(adapter->content_hash_, " compacted to min_energy ",
                             absl::StrFormat("%.17g", target.min_energy)));
  return report;
}

}  // namespace loraserve::adapters
