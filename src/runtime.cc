#include "smp/runtime.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "comm/bootstrap.h"
#include "smp/checkpoint/save.h"
#include "runtime_store.h"
#include "comm/gloo/communicator.h"
#include "comm/local/communicator.h"
#include "smp/config.h"
#include "smp/core/error.h"
#include "smp/core/logging.h"

#if SMP_USE_MPI
#include "comm/mpi/communicator.h"
#endif
#if SMP_USE_NCCL
#include "comm/nccl/communicator.h"
#endif

namespace smp {
namespace {

constexpr std::array<CommGroup, kNumCommGroups> kGroups = {
    CommGroup::kWorld,   CommGroup::kPpGroup, CommGroup::kTpGroup,
    CommGroup::kRdpGroup, CommGroup::kDpGroup, CommGroup::kMpGroup};

struct State {
  Config config;
  bootstrap::LaunchInfo launch;
  std::optional<Topology> topology;
  int rank = 0;
  int size = 1;
  int local_rank = 0;
  int local_size = 1;
  bool owns_mpi = false;  ///< init() initialized the MPI layer, shutdown() finalizes it
  std::array<int, kNumCommGroups> ranks{};  ///< this process's rank of each RankType
  std::array<std::vector<int>, kNumCommGroups> members;
  std::string store_host;
  int store_port = 0;
  std::string key_prefix;  ///< keys of this init in the store
  // Declared before the communicators, so destroyed after them: gloo groups
  // hold references to the store.
  c10::intrusive_ptr<c10d::Store> store;
  std::array<std::unique_ptr<Communicator>, kNumCommGroups> comms;
  std::map<std::pair<int, int>, std::unique_ptr<Communicator>> device_comms;  ///< (group, device)
  std::map<std::pair<int, int>, std::unique_ptr<Communicator>> p2p_comms;     ///< (peer, device)

  ~State() {
    p2p_comms.clear();
    device_comms.clear();
    for (int i = kNumCommGroups - 1; i >= 0; --i) comms[i].reset();
  }
};

/// A torchrun store listens on the fixed MASTER_PORT; peers of a previous
/// init may still be connected to it when a new init starts, so it is kept
/// for the life of the process and reused, with fresh key prefixes.
struct KeptStore {
  std::string host;
  int port = 0;
  int rank = 0;
  int world_size = 0;
  c10::intrusive_ptr<c10d::Store> store;
};

std::mutex g_mutex;
std::unique_ptr<State> g_state;
KeptStore g_torchrun_store;
int g_generation = 0;  ///< counts init() calls: keeps store keys of each init apart

State& state() {
  SMP_CHECK(g_state != nullptr, StateError, "smp is not initialized: call smp.init() first");
  return *g_state;
}

std::string host_name() {
  char buf[HOST_NAME_MAX + 1] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "localhost";
  return buf;
}

/// Local rank and size from the hostnames of all ranks (world communicator).
std::pair<int, int> local_from_hostnames(Communicator& world) {
  auto names = world.allgather_bytes(host_name());
  int local_rank = 0;
  int local_size = 0;
  for (int r = 0; r < world.size(); ++r) {
    if (names[r] != names[world.rank()]) continue;
    if (r < world.rank()) ++local_rank;
    ++local_size;
  }
  return {local_rank, local_size};
}

/// Store at a host/port chosen by rank 0 and told to the others over `world`.
void open_store_over(Communicator& world, State& s) {
  const auto timeout = default_comm_timeout();
  auto names = world.allgather_bytes(host_name());
  std::string address;
  if (world.rank() == 0) {
    s.store = bootstrap::make_store("127.0.0.1", 0, 0, world.size(), timeout);
    std::string host;
    if (const char* addr = std::getenv("MASTER_ADDR"); addr != nullptr && *addr) {
      host = addr;
    } else if (std::all_of(names.begin(), names.end(),
                           [&](const std::string& n) { return n == names[0]; })) {
      host = "127.0.0.1";
    } else {
      host = names[0];
    }
    auto* tcp = dynamic_cast<c10d::TCPStore*>(s.store.get());
    SMP_CHECK(tcp != nullptr, CommError, "smp store: rank 0's store is not a TCPStore");
    address = host + "\n" + std::to_string(tcp->getPort());
  }
  address = world.broadcast_bytes(address, 0);
  const auto nl = address.find('\n');
  s.store_host = address.substr(0, nl);
  s.store_port = std::stoi(address.substr(nl + 1));
  if (world.rank() != 0) {
    s.store = bootstrap::make_store(s.store_host, s.store_port, world.rank(), world.size(),
                                    timeout);
  }
}

std::string key_prefix(int generation) {
  const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
  return detail::str("smp/r", restart != nullptr && *restart ? restart : "0", "/g", generation,
                     "/");
}

void init_torchrun(State& s, int generation) {
  const auto& l = s.launch;
  s.rank = l.rank;
  s.size = l.world_size;
  auto& kept = g_torchrun_store;
  if (l.master_port == 0) {
    // WORLD_SIZE=1 without MASTER_ADDR/MASTER_PORT: a private store.
    s.store = bootstrap::make_store("127.0.0.1", 0, 0, 1, default_comm_timeout());
    s.store_host = "127.0.0.1";
    s.store_port = static_cast<c10d::TCPStore*>(s.store.get())->getPort();
  } else {
    if (!kept.store || kept.host != l.master_addr || kept.port != l.master_port ||
        kept.rank != l.rank || kept.world_size != l.world_size) {
      kept = KeptStore{};
      kept.store = bootstrap::make_store(l.master_addr, l.master_port, l.rank, l.world_size,
                                         default_comm_timeout());
      kept.host = l.master_addr;
      kept.port = l.master_port;
      kept.rank = l.rank;
      kept.world_size = l.world_size;
    }
    s.store = kept.store;
    s.store_host = l.master_addr;
    s.store_port = l.master_port;
  }
  const std::string prefix = key_prefix(generation);
  for (CommGroup g : kGroups) {
    const int i = static_cast<int>(g);
    s.comms[i] = gloo::make_group(
        s.store, detail::str(prefix, to_string(g), "/", s.topology->group_index(g, s.rank), "/"),
        to_string(g), s.members[i], s.rank);
  }
  if (l.local_rank >= 0 && l.local_size > 0) {
    s.local_rank = l.local_rank;
    s.local_size = l.local_size;
  } else {
    std::tie(s.local_rank, s.local_size) = local_from_hostnames(*s.comms[0]);
    if (l.local_rank >= 0) s.local_rank = l.local_rank;
  }
}

void init_single(State& s) {
  s.store = bootstrap::make_store("127.0.0.1", 0, 0, 1, default_comm_timeout());
  s.store_host = "127.0.0.1";
  s.store_port = static_cast<c10d::TCPStore*>(s.store.get())->getPort();
  for (CommGroup g : kGroups) s.comms[static_cast<int>(g)] = local::make_group(to_string(g));
}

#if SMP_USE_MPI
void init_mpi(State& s) {
  s.comms[0] = mpi::make_world();
  for (CommGroup g : kGroups) {
    if (g == CommGroup::kWorld) continue;
    s.comms[static_cast<int>(g)] = mpi::make_group(to_string(g), s.topology->all_groups(g));
  }
  open_store_over(*s.comms[0], s);
}
#endif

/// World size as the launcher tells it; under MPI this initializes MPI.
void read_world(State& s) {
  switch (s.launch.kind) {
    case LaunchKind::kMpi: {
#if SMP_USE_MPI
      // A caller that set up the MPI layer itself (a test main, an embedding
      // program) keeps it after shutdown(); only what init() set up is released.
      try {
        mpi::world_rank();
      } catch (const StateError&) {
        s.owns_mpi = true;
      }
      mpi::initialize();
      s.rank = mpi::world_rank();
      s.size = mpi::world_size();
      std::tie(s.local_rank, s.local_size) = mpi::local_rank_and_size();
#endif
      break;
    }
    case LaunchKind::kTorchrun:
      s.rank = s.launch.rank;
      s.size = s.launch.world_size;
      break;
    case LaunchKind::kSingle:
      break;
  }
}

}  // namespace

const char* to_string(LaunchKind kind) {
  switch (kind) {
    case LaunchKind::kSingle: return "single";
    case LaunchKind::kMpi: return "mpi";
    case LaunchKind::kTorchrun: return "torchrun";
  }
  return "?";
}

namespace {

// Keys of smp v1 that change nothing here: one warning per key and process, on
// world rank 0 only (every rank has the same config).
void log_no_effect_keys(const Config& config, int rank) {
  static std::set<std::string> logged;
  if (rank != 0) return;
  for (const auto& key : config.no_effect_keys) {
    if (!logged.insert(key).second) continue;
    SMP_LOG(kWarning, "smp config key '", key, "' is accepted for smp v1 compatibility and has no "
            "effect: ", Config::no_effect_reason(key));
  }
}

void build(State& s, const ConfigMap& user) {
  s.config = Config::from_map(user);
  s.launch = bootstrap::detect();
  read_world(s);
  s.config.validate_world(s.size);
  s.topology.emplace(s.size, s.config.pipeline_parallel_degree, s.config.tensor_parallel_degree,
                     s.config.placement_strategy);
  for (CommGroup g : kGroups) {
    s.members[static_cast<int>(g)] = s.topology->group_members(g, s.rank);
  }
  for (int t = 0; t < kNumCommGroups; ++t) {
    s.ranks[t] = s.topology->rank_of_type(s.rank, static_cast<RankType>(t));
  }
  const int generation = g_generation++;
  s.key_prefix = key_prefix(generation);
  switch (s.launch.kind) {
    case LaunchKind::kMpi:
#if SMP_USE_MPI
      init_mpi(s);
#endif
      break;
    case LaunchKind::kTorchrun: init_torchrun(s, generation); break;
    case LaunchKind::kSingle: init_single(s); break;
  }
}

}  // namespace

void init(const ConfigMap& user) {
  std::lock_guard<std::mutex> lock(g_mutex);
  SMP_CHECK(g_state == nullptr, StateError,
            "smp.init() was already called; call it once per process, or smp.shutdown() first");
  auto s = std::make_unique<State>();
  try {
    build(*s, user);
  } catch (...) {
    const bool owns_mpi = s->owns_mpi;
    s.reset();
#if SMP_USE_MPI
    if (owns_mpi) mpi::finalize();
#else
    (void)owns_mpi;
#endif
    throw;
  }
  set_log_rank(s->rank);
  SMP_LOG(kInfo, "smp initialized (", to_string(s->launch.kind), " launch, ",
          s->topology->describe(s->rank), ", world ", s->size, ", pp ", s->topology->pp_size(),
          ", tp ", s->topology->tp_size(), ", rdp ", s->topology->rdp_size(), ")");
  log_no_effect_keys(s->config, s->rank);
  g_state = std::move(s);
}

namespace {

/// Set when a communication error reached the caller (python/src/errors.cc
/// translates it): the groups may be unusable, so shutdown must not wait on them.
std::atomic<bool> g_comm_failed{false};

/// shutdown's final barrier, through the store rather than a group: every
/// member counts itself in and waits for all, unless one of them reports a
/// failed collective (then nobody waits: its groups may never complete a
/// barrier again, which cost a second full SMP_COMM_TIMEOUT).
void shutdown_rendezvous(State& s) {
  if (s.size <= 1 || !s.store) return;
  c10d::Store& store = *s.store;
  const std::string count_key = s.key_prefix + "shutdown/count";
  const std::string failed_key = s.key_prefix + "shutdown/failed";
  if (g_comm_failed.exchange(false)) {
    const std::string who = std::to_string(s.rank);
    store.set(failed_key, std::vector<std::uint8_t>(who.begin(), who.end()));
  }
  store.add(count_key, 1);
  const auto timeout = default_comm_timeout();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto sleep = std::chrono::milliseconds(1);
  while (true) {
    std::int64_t arrived = 0;
    try {
      arrived = store.add(count_key, 0);
    } catch (const std::exception&) {
      // Rank 0 serves the store and closes it only after every rank arrived
      // (or one reported a failure): the others have left.
      return;
    }
    if (arrived >= s.size) return;
    if (store.check({failed_key})) {
      SMP_LOG(kInfo, "smp.shutdown(): a rank reported a failed collective; not waiting for the ",
              s.size - arrived, " rank(s) that have not reached shutdown");
      return;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      SMP_THROW(TimeoutError, "smp.shutdown(): ", s.size - arrived, " of ", s.size,
                " ranks did not reach shutdown within ", timeout.count() / 1000.0,
                " s (SMP_COMM_TIMEOUT)");
    }
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::milliseconds(20));
  }
}

}  // namespace

namespace detail {
void note_comm_failure() { g_comm_failed = true; }
}  // namespace detail

void shutdown() {
  // An asynchronous checkpoint save in flight still needs the store.
  try {
    ckpt::wait_for_pending_saves();
  } catch (const std::exception& e) {
    SMP_LOG(kError, "smp.shutdown(): ", e.what());
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_state == nullptr) return;
  std::unique_ptr<State> s = std::move(g_state);
  // Collective: no member tears down (and rank 0 closes the store) while
  // another still uses the groups.
  try {
    shutdown_rendezvous(*s);
  } catch (const std::exception& e) {
    SMP_LOG(kWarning, "smp.shutdown(): the final barrier failed, tearing down anyway: ",
            e.what());
  }
  const bool owns_mpi = s->owns_mpi;
  s.reset();  // device communicators, groups, then the store
  set_log_rank(-1);
#if SMP_USE_MPI
  if (owns_mpi) mpi::finalize();
#else
  (void)owns_mpi;
#endif
}

bool is_initialized() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_state != nullptr;
}

const Config& config() { return state().config; }
const Topology& topology() { return *state().topology; }
LaunchKind launch_kind() { return state().launch.kind; }

int rank() { return state().rank; }
int size() { return state().size; }
int local_rank() { return state().local_rank; }
int local_size() { return state().local_size; }
int pp_rank() { return rank_of_type(RankType::kPpRank); }
int pp_size() { return topology().pp_size(); }
int tp_rank() { return rank_of_type(RankType::kTpRank); }
int tp_size() { return topology().tp_size(); }
int rdp_rank() { return rank_of_type(RankType::kRdpRank); }
int rdp_size() { return topology().rdp_size(); }
int dp_rank() { return rank_of_type(RankType::kDpRank); }
int dp_size() { return topology().dp_size(); }
int mp_rank() { return rank_of_type(RankType::kMpRank); }
int mp_size() { return topology().mp_size(); }

int rank_of_type(RankType type) {
  const int t = static_cast<int>(type);
  SMP_CHECK(t >= 0 && t < kNumCommGroups, ConfigError, "unknown rank type ", t);
  return state().ranks[t];
}

const std::vector<int>& group_members(CommGroup group) {
  const int g = static_cast<int>(group);
  SMP_CHECK(g >= 0 && g < kNumCommGroups, ConfigError, "unknown group ", g);
  return state().members[g];
}

Communicator& communicator(CommGroup group) {
  const int g = static_cast<int>(group);
  SMP_CHECK(g >= 0 && g < kNumCommGroups, ConfigError, "unknown group ", g);
  return *state().comms[g];
}

Communicator& device_communicator(CommGroup group, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  State& s = state();
  const int g = static_cast<int>(group);
  SMP_CHECK(g >= 0 && g < kNumCommGroups, ConfigError, "unknown group ", g);
#if SMP_USE_NCCL
  auto& slot = s.device_comms[{g, device}];
  if (!slot) {
    Communicator& host = *s.comms[g];
    slot = nccl::make_group(to_string(group), s.members[g], s.rank, device,
                            [&host](const std::string& id) { return host.broadcast_bytes(id, 0); });
  }
  return *slot;
#else
  (void)s;
  SMP_THROW(NotSupportedError, "smp was built without NCCL; CUDA tensors need a build with "
            "SMP_USE_NCCL=ON (", to_string(group), ", device ", device, ")");
#endif
}

Communicator& device_p2p_communicator(int peer_world_rank, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  State& s = state();
  SMP_CHECK(peer_world_rank >= 0 && peer_world_rank < s.size && peer_world_rank != s.rank,
            ConfigError, "device_p2p_communicator: peer world rank ", peer_world_rank,
            " must be another rank in 0..", s.size - 1, " (this is rank ", s.rank, ")");
#if SMP_USE_NCCL
  auto& slot = s.p2p_comms[{peer_world_rank, device}];
  if (!slot) {
    const int lo = std::min(s.rank, peer_world_rank);
    const int hi = std::max(s.rank, peer_world_rank);
    Communicator& world = *s.comms[0];
    const int me = s.rank;
    slot = nccl::make_group(
        detail::str("P2P(", lo, ",", hi, ")"), {lo, hi}, s.rank, device,
        [&world, me, lo, hi](const std::string& id) {
          if (me == lo) {
            world.send_bytes(id, hi);
            return id;
          }
          return world.recv_bytes(lo);
        });
  }
  return *slot;
#else
  (void)s;
  SMP_THROW(NotSupportedError, "smp was built without NCCL; CUDA tensors need a build with "
            "SMP_USE_NCCL=ON (send/recv with world rank ", peer_world_rank, ", device ", device,
            ")");
#endif
}

std::string store_host() { return state().store_host; }

namespace detail {
c10::intrusive_ptr<c10d::Store> store() { return state().store; }
std::string store_key_prefix() { return state().key_prefix; }
}  // namespace detail

int store_port() { return state().store_port; }

const char* version() { return SMP_VERSION; }
bool built_with_nccl() { return SMP_USE_NCCL != 0; }
bool built_with_mpi() { return SMP_USE_MPI != 0; }

}  // namespace smp
