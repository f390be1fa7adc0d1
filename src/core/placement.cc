#include "smp/core/placement.h"

#include "smp/core/error.h"

namespace smp {

Placement Placement::parse(const std::string& strategy) {
  std::string letters = strategy;
  if (strategy == "cluster") letters = "DPT";
  if (strategy == "spread") letters = "TPD";
  Placement p;
  bool seen[3] = {false, false, false};
  bool ok = letters.size() == 3;
  for (std::size_t i = 0; ok && i < 3; ++i) {
    Axis a;
    switch (letters[i]) {
      case 'D': a = Axis::kData; break;
      case 'P': a = Axis::kPipeline; break;
      case 'T': a = Axis::kTensor; break;
      default: ok = false; continue;
    }
    if (seen[static_cast<int>(a)]) ok = false;
    seen[static_cast<int>(a)] = true;
    p.order[i] = a;
  }
  SMP_CHECK(ok, ConfigError, "smp config key 'placement_strategy' is '", strategy,
            "'; use 'cluster' (= DPT), 'spread' (= TPD) or a permutation of the letters D, P, T "
            "such as 'PDT'");
  return p;
}

int Placement::position(Axis axis) const {
  for (int i = 0; i < 3; ++i) {
    if (order[i] == axis) return i;
  }
  return -1;
}

std::string Placement::letters() const {
  std::string s;
  for (Axis a : order) s += a == Axis::kData ? 'D' : a == Axis::kPipeline ? 'P' : 'T';
  return s;
}

}  // namespace smp
