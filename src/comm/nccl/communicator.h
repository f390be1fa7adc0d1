#pragma once
// NCCL backend (CUDA device memory, stream-ordered). Internal. Compiled only with
// SMP_USE_NCCL.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "smp/comm/communicator.h"

namespace smp::nccl {

/// Distributes the NCCL unique id: called on every member with the id bytes on
/// group rank 0 (empty elsewhere), returns rank 0's bytes on every member.
using IdExchange = std::function<std::string(const std::string&)>;

/// Collective over `members`: creates an NCCL communicator on CUDA device
/// `device`. Throws CommError with NCCL's error string on failure.
std::unique_ptr<Communicator> make_group(const std::string& name, const std::vector<int>& members,
                                         int world_rank, int device, const IdExchange& exchange);

/// NCCL version as "2.28.3".
std::string version();

}  // namespace smp::nccl
