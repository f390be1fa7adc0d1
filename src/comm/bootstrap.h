#pragma once
// Launch detection and the job's key-value store. Internal to the runtime.

#include <memory>
#include <string>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "smp/runtime.h"

namespace smp::bootstrap {

/// What the environment says about this process.
struct LaunchInfo {
  LaunchKind kind = LaunchKind::kSingle;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_size = 1;
  std::string master_addr;  ///< torchrun: MASTER_ADDR
  int master_port = 0;      ///< torchrun: MASTER_PORT
};

/// Reads the environment: MPI launcher variables, else RANK/WORLD_SIZE/
/// LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT, else a single process.
/// Throws ConfigError naming the variable when one is missing or malformed.
LaunchInfo detect();

/// Creates the TCPStore: rank 0 serves it, everyone connects. `host`/`port` are
/// where rank 0 listens (port 0: any free port, only valid for rank 0, which
/// then reports the port it got through the returned store's getPort()).
c10::intrusive_ptr<c10d::Store> make_store(const std::string& host, int port, int rank,
                                           int world_size, std::chrono::milliseconds timeout);

}  // namespace smp::bootstrap
