#pragma once
// Gloo backend (host memory) over libtorch's c10d ProcessGroupGloo, used when the
// job was started torchrun-style (no MPI). Internal.

#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "smp/comm/communicator.h"

namespace smp::gloo {

/// Collective over `members`: each opens a gloo context through `store` under a
/// key prefix unique to this group (`prefix`).
std::unique_ptr<Communicator> make_group(const c10::intrusive_ptr<c10d::Store>& store,
                                         const std::string& prefix, const std::string& name,
                                         const std::vector<int>& members, int world_rank);

}  // namespace smp::gloo
