// rank_grid: prints where every rank sits on the smp rank grid and checks
// allreduces of a torch tensor over TP_GROUP, DP_GROUP and WORLD.
//
//   mpirun -np 8 rank_grid [pp] [tp] [placement]
//   torchrun --nproc_per_node 2 --no-python rank_grid
//
// Without arguments it uses pp 2, tp 2 (with ddp) when the world size allows,
// else the largest of pp, tp in {2, 1} that fits.
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "smp/core/error.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace {

int world_size_from_env() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE"}) {
    if (const char* v = std::getenv(name); v != nullptr && *v) return std::atoi(v);
  }
  return 1;
}

std::string join(const std::vector<int>& v) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  os << "]";
  return os.str();
}

/// Allreduces (rank + 1) over `group` and compares with the sum over its members.
bool check_sum(smp::CommGroup group) {
  at::Tensor t = at::full({4}, static_cast<double>(smp::rank() + 1), at::kDouble);
  smp::allreduce(t, group, smp::ReduceOp::kSum);
  double expected = 0;
  for (int m : smp::group_members(group)) expected += m + 1;
  bool ok = at::all(t == expected).item<bool>();
  if (!ok) {
    std::cerr << "rank_grid: rank " << smp::rank() << ": allreduce over "
              << smp::to_string(group) << " gave " << t[0].item<double>() << ", expected "
              << expected << "\n";
  }
  return ok;
}

int run(int argc, char** argv) {
  const int world = world_size_from_env();
  int tp = world % 2 == 0 ? 2 : 1;
  int pp = world % (2 * tp) == 0 ? 2 : 1;
  std::string placement = "cluster";
  if (argc > 1) pp = std::atoi(argv[1]);
  if (argc > 2) tp = std::atoi(argv[2]);
  if (argc > 3) placement = argv[3];

  smp::init({{"pipeline_parallel_degree", std::int64_t{pp}},
             {"tensor_parallel_degree", std::int64_t{tp}},
             {"placement_strategy", placement},
             {"ddp", true}});

  std::ostringstream line;
  line << "rank " << smp::rank() << ": rdp " << smp::rdp_rank() << " pp " << smp::pp_rank()
       << " tp " << smp::tp_rank() << " dp " << smp::dp_rank() << " mp " << smp::mp_rank()
       << " local " << smp::local_rank() << "/" << smp::local_size()
       << " | TP_GROUP " << join(smp::group_members(smp::CommGroup::kTpGroup))
       << " PP_GROUP " << join(smp::group_members(smp::CommGroup::kPpGroup))
       << " RDP_GROUP " << join(smp::group_members(smp::CommGroup::kRdpGroup))
       << " DP_GROUP " << join(smp::group_members(smp::CommGroup::kDpGroup))
       << " MP_GROUP " << join(smp::group_members(smp::CommGroup::kMpGroup));
  smp::Communicator& world_comm = smp::communicator(smp::CommGroup::kWorld);
  std::vector<std::string> lines = world_comm.allgather_bytes(line.str());
  if (smp::rank() == 0) {
    std::cout << "rank_grid: " << smp::size() << " ranks, pp " << smp::pp_size() << ", tp "
              << smp::tp_size() << ", rdp " << smp::rdp_size() << ", placement " << placement
              << ", " << smp::to_string(smp::launch_kind()) << " launch, backend "
              << world_comm.backend() << "\n";
    for (const auto& l : lines) std::cout << l << "\n";
    std::cout.flush();
  }

  bool ok = true;
  for (auto group : {smp::CommGroup::kTpGroup, smp::CommGroup::kDpGroup, smp::CommGroup::kWorld}) {
    ok = check_sum(group) && ok;
  }
  // Every rank learns whether any rank failed.
  at::Tensor failed = at::full({1}, ok ? 0 : 1, at::kInt);
  smp::allreduce(failed, smp::CommGroup::kWorld, smp::ReduceOp::kMax);
  const bool all_ok = failed.item<int>() == 0;
  if (smp::rank() == 0) std::cout << (all_ok ? "rank_grid: OK" : "rank_grid: FAILED") << "\n";
  smp::shutdown();
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const smp::Error& e) {
    std::cerr << "rank_grid: " << e.what() << "\n";
    return 1;
  }
}
