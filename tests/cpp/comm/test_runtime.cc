// The runtime (smp::init and friends) and the torch tensor collectives under
// mpirun with 1, 2, 4 or 8 ranks.
#include "smp/runtime.h"

#include <gtest/gtest.h>

#include "test_util.h"
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "smp/config.h"
#include "smp/core/error.h"
#include "smp/torch/collectives.h"

namespace smp {
namespace {

int mpi_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int mpi_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

ConfigMap grid(int pp, int tp, const std::string& placement = "cluster", bool ddp = true) {
  return {{"pipeline_parallel_degree", std::int64_t{pp}},
          {"tensor_parallel_degree", std::int64_t{tp}},
          {"placement_strategy", placement},
          {"ddp", ddp}};
}

/// The largest pp2 x tp2 grid the world allows (as the rank_grid example).
ConfigMap default_grid() {
  const int world = mpi_size();
  const int tp = world % 2 == 0 ? 2 : 1;
  const int pp = world % (2 * tp) == 0 ? 2 : 1;
  return grid(pp, tp);
}

constexpr CommGroup kAllGroups[] = {CommGroup::kWorld,    CommGroup::kPpGroup,
                                    CommGroup::kTpGroup,  CommGroup::kRdpGroup,
                                    CommGroup::kDpGroup,  CommGroup::kMpGroup};

constexpr RankType kAllRankTypes[] = {RankType::kWorldRank, RankType::kPpRank,
                                      RankType::kTpRank,    RankType::kRdpRank,
                                      RankType::kDpRank,    RankType::kMpRank};

class RuntimeTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (is_initialized()) shutdown();
  }
};

using test::error_of;

TEST_F(RuntimeTest, EveryGridAgreesWithTopology) {
  const int world = mpi_size();
  std::vector<std::tuple<int, int, std::string>> grids;
  for (int pp : {1, 2, 4}) {
    for (int tp : {1, 2, 4}) {
      if (world % (pp * tp) == 0) grids.emplace_back(pp, tp, "cluster");
    }
  }
  if (world % 4 == 0) {
    grids.emplace_back(2, 2, "spread");
    grids.emplace_back(2, 2, "PDT");
  }
  for (const auto& [pp, tp, placement] : grids) {
    SCOPED_TRACE(::testing::Message() << "pp " << pp << " tp " << tp << " " << placement);
    init(grid(pp, tp, placement));
    ASSERT_TRUE(is_initialized());
    const Topology& topo = topology();
    EXPECT_EQ(launch_kind(), LaunchKind::kMpi);
    EXPECT_EQ(rank(), mpi_rank());
    EXPECT_EQ(size(), world);
    EXPECT_EQ(topo.world_size(), world);
    EXPECT_EQ(topo.pp_size(), pp);
    EXPECT_EQ(topo.tp_size(), tp);
    EXPECT_EQ(config().pipeline_parallel_degree, pp);
    // mpirun on one host: the local ranks are the world ranks.
    EXPECT_EQ(local_rank(), rank());
    EXPECT_EQ(local_size(), world);
    EXPECT_EQ(pp_rank(), topo.pp_rank(rank()));
    EXPECT_EQ(tp_rank(), topo.tp_rank(rank()));
    EXPECT_EQ(rdp_rank(), topo.rdp_rank(rank()));
    EXPECT_EQ(dp_rank(), topo.dp_rank(rank()));
    EXPECT_EQ(mp_rank(), topo.mp_rank(rank()));
    EXPECT_EQ(pp_size(), pp);
    EXPECT_EQ(tp_size(), tp);
    EXPECT_EQ(rdp_size(), world / (pp * tp));
    EXPECT_EQ(dp_size(), world / pp);
    EXPECT_EQ(mp_size(), pp * tp);
    for (RankType t : kAllRankTypes) {
      EXPECT_EQ(rank_of_type(t), topo.rank_of_type(rank(), t)) << to_string(t);
    }
    for (CommGroup g : kAllGroups) {
      SCOPED_TRACE(to_string(g));
      const std::vector<int> expected = topo.group_members(g, rank());
      EXPECT_EQ(group_members(g), expected);
      Communicator& comm = communicator(g);
      EXPECT_STREQ(comm.backend(), "mpi");
      EXPECT_EQ(comm.name(), to_string(g));
      EXPECT_EQ(comm.size(), topo.group_size(g));
      EXPECT_EQ(comm.members(), expected);
      EXPECT_EQ(comm.world_rank(), rank());
      // Group rank = this process's rank of the type of the same name.
      EXPECT_EQ(comm.rank(), rank_of_type(static_cast<RankType>(g)));
      std::int64_t value = rank();
      comm.allreduce(&value, 1, DataType::kInt64, ReduceOp::kSum);
      EXPECT_EQ(value, std::accumulate(expected.begin(), expected.end(), std::int64_t{0}));
    }
    EXPECT_FALSE(store_host().empty());
    EXPECT_GT(store_port(), 0);
    shutdown();
    EXPECT_FALSE(is_initialized());
  }
}

TEST_F(RuntimeTest, StoreIsSharedByAllRanks) {
  init(default_grid());
  const std::string address = store_host() + ":" + std::to_string(store_port());
  auto all = communicator(CommGroup::kWorld).allgather_bytes(address);
  for (const auto& a : all) EXPECT_EQ(a, address);
}

TEST_F(RuntimeTest, TorchAllreduce) {
  init(default_grid());
  for (CommGroup g : kAllGroups) {
    SCOPED_TRACE(to_string(g));
    const auto& members = group_members(g);
    const double n = static_cast<double>(members.size());
    const double sum = std::accumulate(members.begin(), members.end(), 0.0);
    const double max = *std::max_element(members.begin(), members.end());

    at::Tensor t = at::full({2, 3}, static_cast<double>(rank()), at::kFloat);
    allreduce(t, g, ReduceOp::kSum);
    EXPECT_TRUE(at::all(t == sum).item<bool>()) << t;

    t = at::full({5}, static_cast<double>(rank()), at::kDouble);
    allreduce(t, g, ReduceOp::kAvg);
    EXPECT_TRUE(at::allclose(t, at::full({5}, sum / n, at::kDouble))) << t;

    at::Tensor i = at::full({3}, rank(), at::kLong);
    allreduce(i, g, ReduceOp::kMax);
    EXPECT_TRUE(at::all(i == static_cast<std::int64_t>(max)).item<bool>()) << i;
  }
}

TEST_F(RuntimeTest, TorchAllgatherAndReduceScatter) {
  init(default_grid());
  for (CommGroup g : kAllGroups) {
    SCOPED_TRACE(to_string(g));
    const auto& members = group_members(g);
    const int n = static_cast<int>(members.size());
    at::Tensor in = at::arange(6, at::kFloat).reshape({2, 3}) + 100 * rank();
    at::Tensor out = allgather(in, g);
    ASSERT_EQ(out.sizes(), (std::vector<std::int64_t>{n, 2, 3}));
    for (int i = 0; i < n; ++i) {
      EXPECT_TRUE(at::equal(out[i], at::arange(6, at::kFloat).reshape({2, 3}) + 100 * members[i]))
          << "block " << i;
    }

    // Row r of every input holds r + rank; block k of the result sums rows of block k.
    at::Tensor rows = at::arange(2 * n, at::kDouble).unsqueeze(1).repeat({1, 4}) + rank();
    at::Tensor mine = reduce_scatter(rows, g, ReduceOp::kSum);
    ASSERT_EQ(mine.sizes(), (std::vector<std::int64_t>{2, 4}));
    const double member_sum = std::accumulate(members.begin(), members.end(), 0.0);
    const int k = rank_of_type(static_cast<RankType>(g));
    for (int r = 0; r < 2; ++r) {
      const double expected = n * (2.0 * k + r) + member_sum;
      EXPECT_TRUE(at::all(mine[r] == expected).item<bool>()) << mine;
    }
    if (n > 1) {
      at::Tensor odd = at::zeros({2 * n + 1, 2}, at::kFloat);
      const std::string msg = error_of<ConfigError>([&] { reduce_scatter(odd, g); });
      EXPECT_NE(msg.find("reduce_scatter"), std::string::npos) << msg;
      EXPECT_NE(msg.find("multiple of the group size " + std::to_string(n)), std::string::npos)
          << msg;
    }
  }
}

TEST_F(RuntimeTest, TorchBroadcastFromEveryRoot) {
  init(default_grid());
  for (CommGroup g : kAllGroups) {
    const auto& members = group_members(g);
    for (int root = 0; root < static_cast<int>(members.size()); ++root) {
      at::Tensor t = at::full({4}, rank(), at::kInt);
      broadcast(t, root, g);
      EXPECT_TRUE(at::all(t == members[root]).item<bool>()) << to_string(g) << " root " << root;
    }
  }
}

TEST_F(RuntimeTest, TorchSendRecvRing) {
  init(default_grid());
  for (RankType type : {RankType::kPpRank, RankType::kTpRank, RankType::kWorldRank}) {
    SCOPED_TRACE(to_string(type));
    const auto& members = group_members(group_of(type));
    const int n = static_cast<int>(members.size());
    if (n == 1) continue;
    const int me = rank_of_type(type);
    const int next = (me + 1) % n;
    const int prev = (me + n - 1) % n;
    at::Tensor out = at::full({3, 2}, static_cast<double>(rank()), at::kFloat);
    at::Tensor in = at::empty({3, 2}, at::kFloat);
    // Even ranks send first: blocking point-to-point needs an order.
    if (me % 2 == 0) {
      send(out, next, type);
      recv(in, prev, type);
    } else {
      recv(in, prev, type);
      send(out, next, type);
    }
    EXPECT_TRUE(at::all(in == static_cast<double>(members[prev])).item<bool>()) << in;
  }
  barrier(CommGroup::kWorld);
  barrier(CommGroup::kTpGroup);
}

TEST_F(RuntimeTest, TensorErrorsNameOpAndFix) {
  init(default_grid());
  at::Tensor t = at::zeros({3, 4}, at::kFloat).t();
  std::string msg = error_of<ConfigError>([&] { allreduce(t, CommGroup::kWorld); });
  EXPECT_NE(msg.find("allreduce"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not contiguous"), std::string::npos) << msg;
  EXPECT_NE(msg.find("call .contiguous() first"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[4, 3]"), std::string::npos) << msg;

  at::Tensor c = at::zeros({2}, at::kComplexFloat);
  msg = error_of<NotSupportedError>([&] { allreduce(c, CommGroup::kWorld); });
  EXPECT_NE(msg.find("dtype"), std::string::npos) << msg;

  if (!built_with_nccl()) {
    msg = error_of<NotSupportedError>([] { device_communicator(CommGroup::kWorld, 0); });
    EXPECT_NE(msg.find("smp was built without NCCL"), std::string::npos) << msg;
    EXPECT_NE(msg.find("SMP_USE_NCCL=ON"), std::string::npos) << msg;
  }
}

TEST_F(RuntimeTest, InitTwiceAndUseAfterShutdownAreStateErrors) {
  init(default_grid());
  std::string msg = error_of<StateError>([] { init(default_grid()); });
  EXPECT_NE(msg.find("smp.init() was already called; call it once per process, or "
                     "smp.shutdown() first"),
            std::string::npos)
      << msg;
  EXPECT_TRUE(is_initialized());
  shutdown();
  EXPECT_FALSE(is_initialized());
  for (auto* fn : {&rank, &size, &pp_rank, &tp_size, &rdp_rank, &dp_size, &mp_rank}) {
    msg = error_of<StateError>([&] { fn(); });
    EXPECT_NE(msg.find("smp is not initialized: call smp.init() first"), std::string::npos)
        << msg;
  }
  msg = error_of<StateError>([] { communicator(CommGroup::kTpGroup); });
  EXPECT_NE(msg.find("smp is not initialized"), std::string::npos) << msg;
  shutdown();  // a no-op when not initialized
}

TEST_F(RuntimeTest, ConfigThatDoesNotFitThenGoodInit) {
  const int world = mpi_size();
  std::string msg = error_of<ConfigError>([&] { init(grid(1, world + 1)); });
  EXPECT_FALSE(msg.empty());
  EXPECT_NE(msg.find(std::to_string(world + 1)), std::string::npos) << msg;
  EXPECT_FALSE(is_initialized());
  if (world > 1) {
    msg = error_of<ConfigError>([] { init(grid(1, 1, "cluster", /*ddp=*/false)); });
    EXPECT_NE(msg.find("ddp"), std::string::npos) << msg;
    EXPECT_FALSE(is_initialized());
  }
  msg = error_of<ConfigError>([] { init({{"no_such_key", true}}); });
  EXPECT_NE(msg.find("no_such_key"), std::string::npos) << msg;
  EXPECT_FALSE(is_initialized());

  init(default_grid());
  at::Tensor t = at::ones({2}, at::kFloat);
  allreduce(t, CommGroup::kWorld);
  EXPECT_TRUE(at::all(t == static_cast<float>(world)).item<bool>()) << t;
}

TEST_F(RuntimeTest, VersionAndBuildFlags) {
  EXPECT_STREQ(version(), SMP_VERSION);
  EXPECT_TRUE(built_with_mpi());
  EXPECT_STREQ(to_string(LaunchKind::kMpi), "mpi");
  EXPECT_STREQ(to_string(LaunchKind::kTorchrun), "torchrun");
  EXPECT_STREQ(to_string(LaunchKind::kSingle), "single");
}

}  // namespace
}  // namespace smp
