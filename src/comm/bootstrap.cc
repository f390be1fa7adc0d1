#include "comm/bootstrap.h"

#include <cerrno>
#include <cstdlib>
#include <optional>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "smp/config.h"
#include "smp/core/error.h"

#if SMP_USE_MPI
#include "comm/mpi/communicator.h"
#endif

namespace smp::bootstrap {
namespace {

constexpr const char* kTorchrunHint =
    "a torchrun-style launch sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR "
    "and MASTER_PORT; launch with torchrun (python -m torch.distributed.run), set them all, "
    "or unset RANK and WORLD_SIZE to run as a single process";

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

/// The integer value of environment variable `name` within [lo, hi], or
/// nullopt when unset. Throws ConfigError quoting a malformed value.
std::optional<int> env_int(const char* name, long lo, long hi) {
  auto v = env(name);
  if (!v) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  long x = std::strtol(v->c_str(), &end, 10);
  if (errno != 0 || end == v->c_str() || *end != '\0' || x < lo || x > hi) {
    SMP_THROW(ConfigError, "environment variable ", name, "='", *v,
              "' is not an integer in [", lo, ", ", hi, "]; ", kTorchrunHint);
  }
  return static_cast<int>(x);
}

#if !SMP_USE_MPI
/// Variables some MPI launcher sets in every process it starts.
bool mpi_env_present() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK",
                           "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE"}) {
    if (env(name)) return true;
  }
  return false;
}
#endif

std::string store_error(const std::exception& e) {
  if (auto* c10e = dynamic_cast<const c10::Error*>(&e)) return c10e->what_without_backtrace();
  return e.what();
}

}  // namespace

LaunchInfo detect() {
  LaunchInfo info;
#if SMP_USE_MPI
  if (smp::mpi::launched_by_mpi()) {
    // Ranks and sizes come from MPI itself once it is initialized.
    info.kind = LaunchKind::kMpi;
    return info;
  }
#else
  if (mpi_env_present()) {
    SMP_THROW(ConfigError,
              "this process was started by an MPI launcher (mpirun/mpiexec variables are set) "
              "but smp was built without MPI; rebuild with -DSMP_USE_MPI=ON, or launch with "
              "torchrun or as a single process");
  }
#endif
  const bool has_rank = env("RANK").has_value();
  const bool has_world = env("WORLD_SIZE").has_value();
  if (!has_rank && !has_world) return info;  // single process
  if (!has_rank || !has_world) {
    SMP_THROW(ConfigError, "environment variable ", has_rank ? "WORLD_SIZE" : "RANK",
              " is not set but ", has_rank ? "RANK" : "WORLD_SIZE", " is; ", kTorchrunHint);
  }
  info.kind = LaunchKind::kTorchrun;
  info.world_size = *env_int("WORLD_SIZE", 1, 1 << 24);
  info.rank = *env_int("RANK", 0, info.world_size - 1);
  // -1: not given; the runtime then derives them from the hostnames of all ranks.
  info.local_size = env_int("LOCAL_WORLD_SIZE", 1, info.world_size).value_or(-1);
  info.local_rank = env_int("LOCAL_RANK", 0, info.world_size - 1).value_or(-1);
  if (info.local_size > 0 && info.local_rank >= info.local_size) {
    SMP_THROW(ConfigError, "environment variable LOCAL_RANK=", info.local_rank,
              " is not below LOCAL_WORLD_SIZE=", info.local_size, "; ", kTorchrunHint);
  }
  auto addr = env("MASTER_ADDR");
  auto port = env_int("MASTER_PORT", 1, 65535);
  if (info.world_size > 1 || addr || port) {
    if (!addr) {
      SMP_THROW(ConfigError,
                "environment variable MASTER_ADDR is not set (RANK=", info.rank,
                ", WORLD_SIZE=", info.world_size,
                "); set it to the address of rank 0's host, e.g. MASTER_ADDR=127.0.0.1 on one "
                "machine; ", kTorchrunHint);
    }
    if (!port) {
      SMP_THROW(ConfigError,
                "environment variable MASTER_PORT is not set (RANK=", info.rank,
                ", WORLD_SIZE=", info.world_size,
                "); set it to a free TCP port on rank 0's host, e.g. MASTER_PORT=29500; ",
                kTorchrunHint);
    }
    info.master_addr = *addr;
    info.master_port = *port;
  }
  return info;
}

c10::intrusive_ptr<c10d::Store> make_store(const std::string& host, int port, int rank,
                                           int world_size, std::chrono::milliseconds timeout) {
  SMP_CHECK(port >= 0 && port <= 65535, ConfigError, "store port ", port,
            " is not a TCP port (0..65535)");
  SMP_CHECK(port != 0 || rank == 0, CommError,
            "store: only rank 0 may open the store on a free port (rank ", rank, ")");
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  // Under torchrun the elastic agent already serves a store at MASTER_ADDR:MASTER_PORT
  // and every worker is a client of it.
  const bool agent_store = port != 0 && env("TORCHELASTIC_USE_AGENT_STORE") == "True";
  opts.isServer = rank == 0 && !agent_store;
  opts.numWorkers = static_cast<std::size_t>(world_size);
  // Rank 0 must not block in the constructor: under mpirun the other ranks
  // learn the port only after it returns. The first collective synchronizes.
  opts.waitWorkers = false;
  opts.timeout = timeout;
  opts.multiTenant = opts.isServer;
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, opts);
  } catch (const std::exception& e) {
    if (opts.isServer) {
      SMP_THROW(CommError, "rank 0 could not open the smp store (torch TCPStore) on port ", port,
                ": ", store_error(e),
                port != 0 ? "; the port may be in use: choose another MASTER_PORT" : "");
    }
    SMP_THROW(CommError, "rank ", rank, " of ", world_size,
              " could not connect to the smp store (torch TCPStore) at ", host, ":", port,
              " within ", timeout.count(), " ms: ", store_error(e),
              "; check that rank 0 is running and that MASTER_ADDR/MASTER_PORT are reachable "
              "from this host");
  }
}

}  // namespace smp::bootstrap
