#include "smp/model/optimizer_shard.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "smp/core/error.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace smp {

std::vector<int> partition_params(const std::vector<std::int64_t>& numels, int num_ranks) {
  SMP_CHECK(num_ranks >= 1, ConfigError, "partition_params: num_ranks must be at least 1, got ",
            num_ranks);
  std::vector<std::size_t> order(numels.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  for (std::size_t i = 0; i < numels.size(); ++i)
    SMP_CHECK(numels[i] >= 0, ConfigError, "partition_params: parameter ", i,
              " has a negative number of elements (", numels[i], ")");
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return numels[a] > numels[b]; });
  std::vector<std::int64_t> load(static_cast<std::size_t>(num_ranks), 0);
  std::vector<int> owner(numels.size(), 0);
  for (std::size_t i : order) {
    // min_element returns the first minimum: ties go to the lowest rank.
    const auto least = std::min_element(load.begin(), load.end());
    owner[i] = static_cast<int>(least - load.begin());
    *least += numels[i];
  }
  return owner;
}

void broadcast_from_owners(const std::vector<at::Tensor>& params, const std::vector<int>& owner,
                           CommGroup group) {
  SMP_CHECK(params.size() == owner.size(), ConfigError, "broadcast_from_owners: ", params.size(),
            " parameters but ", owner.size(), " owners; pass one owner per parameter");
  const Communicator& comm = communicator(group);
  const int n = comm.size();
  for (std::size_t i = 0; i < owner.size(); ++i) {
    SMP_CHECK(owner[i] >= 0 && owner[i] < n, ConfigError, "broadcast_from_owners: owner ",
              owner[i], " of parameter ", i, " is not a rank of ", to_string(group), " (size ", n,
              ", world rank ", rank(), ")");
    SMP_CHECK(params[i].defined(), ConfigError, "broadcast_from_owners: parameter ", i,
              " is an undefined tensor (rank ", rank(), ")");
  }
  if (n == 1) return;
  at::NoGradGuard no_grad;
  // One broadcast per (owner, dtype, device), in owner order and then in the
  // order of first appearance, which every member computes alike.
  for (int root = 0; root < n; ++root) {
    std::vector<std::pair<std::string, std::vector<std::size_t>>> buckets;
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (owner[i] != root) continue;
      const std::string key =
          detail::str(params[i].scalar_type(), "/", params[i].device().str());
      auto it = std::find_if(buckets.begin(), buckets.end(),
                             [&](const auto& b) { return b.first == key; });
      if (it == buckets.end()) {
        buckets.emplace_back(key, std::vector<std::size_t>{});
        it = buckets.end() - 1;
      }
      it->second.push_back(i);
    }
    for (const auto& [key, members] : buckets) {
      std::vector<at::Tensor> pieces;
      pieces.reserve(members.size());
      for (std::size_t i : members) pieces.push_back(params[i].detach().reshape({-1}));
      at::Tensor flat = at::cat(pieces);
      broadcast(flat, root, group);
      if (comm.rank() == root) continue;
      std::int64_t offset = 0;
      for (std::size_t i : members) {
        at::Tensor p = params[i].detach();
        p.copy_(flat.narrow(0, offset, p.numel()).view(p.sizes()));
        offset += p.numel();
      }
    }
  }
}

}  // namespace smp
