#pragma once
/// Sharded optimizer state (ZeRO stage 1, config key shard_optimizer_state):
/// each parameter is owned by one rank of RDP_GROUP, which alone keeps its
/// optimizer state and applies its update; owners then broadcast the updated
/// parameters to the other members.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "smp/core/topology.h"

namespace smp {

/// Owner (0..num_ranks-1) of each parameter, balancing the number of elements:
/// parameters in decreasing size, each to the least loaded rank (ties: lowest
/// rank; equal sizes keep their order). Deterministic: every rank computes the
/// same assignment.
std::vector<int> partition_params(const std::vector<std::int64_t>& numels, int num_ranks);

/// After each owner has updated its parameters: every member of `group` gets
/// every parameter's value from its owner (owner[i] is a rank within group).
void broadcast_from_owners(const std::vector<at::Tensor>& params, const std::vector<int>& owner,
                           CommGroup group);

}  // namespace smp
