#pragma once
/// Placement strategy: the order of the data (D), pipeline (P) and tensor (T)
/// axes in the world rank, the right-most letter varying fastest.

#include <array>
#include <string>

namespace smp {

enum class Axis { kData = 0, kPipeline = 1, kTensor = 2 };

struct Placement {
  /// order[0] varies slowest, order[2] fastest.
  std::array<Axis, 3> order{Axis::kData, Axis::kPipeline, Axis::kTensor};

  /// Accepts "cluster" (= "DPT"), "spread" (= "TPD") or any permutation of the
  /// letters D, P, T. Throws ConfigError quoting the value otherwise.
  static Placement parse(const std::string& strategy);

  /// Position (0 slowest .. 2 fastest) of `axis` in the order.
  int position(Axis axis) const;

  /// The three letters, e.g. "DPT".
  std::string letters() const;
};

}  // namespace smp
