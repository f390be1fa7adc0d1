// The model engine under mpirun with 1, 2, 4 or 8 ranks: gradient averaging
// (GradReducer) over DP_GROUP and RDP_GROUP on several grids, bucketing,
// unused parameters, and sharded optimizer state helpers.
#include <gtest/gtest.h>

#include "test_util.h"
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "smp/core/error.h"
#include "smp/model/grad_reducer.h"
#include "smp/model/optimizer_shard.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace smp {
namespace {

int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

ConfigMap grid(int pp, int tp, bool prescaled = false) {
  return {{"pipeline_parallel_degree", std::int64_t{pp}},
          {"tensor_parallel_degree", std::int64_t{tp}},
          {"prescaled_batch", prescaled},
          {"ddp", true}};
}

/// Every (pp, tp) that divides the world.
std::vector<std::pair<int, int>> grids() {
  std::vector<std::pair<int, int>> out;
  const int n = world_size();
  for (int pp : {1, 2})
    for (int tp : {1, 2, 4})
      if (n % (pp * tp) == 0) out.emplace_back(pp, tp);
  return out;
}

using test::error_of;

class ModelEngineTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (is_initialized()) shutdown();
  }
};

/// What rank `r` puts into the gradient of parameter `k` (small integers and
/// halves: every sum below is exact).
at::Tensor grad_of(int r, int k, at::IntArrayRef shape, at::ScalarType dtype) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return (at::arange(n, at::TensorOptions().dtype(at::kDouble)) * 0.5 + (r + 1) * (k + 1))
      .reshape(shape)
      .to(dtype);
}

struct TestParam {
  std::string name;
  std::vector<std::int64_t> global_shape;
  int split_dim;  // -1: replicated
  bool tp_module;
  at::ScalarType dtype;
};

/// Replicated and distributed parameters of two dtypes; a split one, a
/// tp-module one that is not split, and one without requires_grad.
const std::vector<TestParam>& test_params() {
  static const std::vector<TestParam> p = {
      {"embed.weight", {6, 4}, -1, false, at::kFloat},
      {"fc1.weight", {8, 4}, 0, false, at::kFloat},
      {"fc1.bias", {8}, -1, true, at::kFloat},
      {"fc2.weight", {3, 8}, 1, false, at::kDouble},
      {"norm.weight", {3}, -1, false, at::kDouble},
      {"head.weight", {2, 3}, -1, false, at::kFloat},
  };
  return p;
}

std::vector<ParamInfo> make_params(bool with_grads) {
  std::vector<ParamInfo> out;
  int k = 0;
  for (const auto& t : test_params()) {
    ParamInfo info;
    info.name = t.name;
    info.spec = t.split_dim < 0
                    ? ShardSpec::replicated(t.global_shape)
                    : ShardSpec::split(t.global_shape, t.split_dim, tp_size(), tp_rank());
    info.tp_module = t.tp_module;
    info.param = at::zeros(info.spec.local_shape(), at::TensorOptions().dtype(t.dtype));
    info.param.set_requires_grad(true);
    if (with_grads) info.param.mutable_grad() = grad_of(rank(), k, info.param.sizes(), t.dtype);
    out.push_back(std::move(info));
    ++k;
  }
  return out;
}

/// The gradient parameter k must hold after finish() when `used[r]` says
/// whether world rank r had a gradient for it.
at::Tensor expected_grad(const ParamInfo& info, int k, bool prescaled,
                         const std::vector<char>& used) {
  const CommGroup g = info.distributed() ? CommGroup::kRdpGroup : CommGroup::kDpGroup;
  at::Tensor sum = at::zeros(info.param.sizes(), at::TensorOptions().dtype(at::kDouble));
  for (int r : group_members(g))
    if (used[r]) sum += grad_of(r, k, info.param.sizes(), at::kDouble);
  const double divisor = info.distributed() && prescaled ? rdp_size() : dp_size();
  return (sum / divisor).to(info.param.scalar_type());
}

TEST_F(ModelEngineTest, AveragesBothKindsOnEveryGrid) {
  for (const auto& [pp, tp] : grids()) {
    init(grid(pp, tp));
    for (bool prescaled : {false, true}) {
      for (std::size_t bucket_bytes : {std::size_t{1}, std::size_t{64}, std::size_t{25} << 20}) {
        SCOPED_TRACE(testing::Message() << "pp " << pp << " tp " << tp << " prescaled "
                                        << prescaled << " bucket_bytes " << bucket_bytes);
        auto params = make_params(/*with_grads=*/true);
        GradReducer reducer(params, {bucket_bytes, prescaled});
        if (bucket_bytes == 1) EXPECT_EQ(reducer.num_buckets(), params.size());
        // (replicated, distributed) x (float, double); with tp 1 only fc1.bias
        // (a tp-module parameter) is distributed.
        if (bucket_bytes == (std::size_t{25} << 20))
          EXPECT_EQ(reducer.num_buckets(), tp > 1 ? 4u : 3u);
        // Ranks mark in different orders: launches must still line up.
        std::vector<std::size_t> order(params.size());
        for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
        if (rank() % 2 == 1) std::reverse(order.begin(), order.end());
        for (std::size_t i : order) reducer.mark_ready(i);
        reducer.finish();
        const std::vector<char> used(static_cast<std::size_t>(size()), 1);
        for (std::size_t k = 0; k < params.size(); ++k) {
          const at::Tensor want = expected_grad(params[k], static_cast<int>(k), prescaled, used);
          EXPECT_TRUE(at::equal(params[k].param.grad(), want))
              << params[k].name << " rank " << rank() << "\n got " << params[k].param.grad()
              << "\n want " << want;
        }
        // A second pass with the same reducer.
        for (std::size_t k = 0; k < params.size(); ++k)
          params[k].param.mutable_grad() =
              grad_of(rank(), static_cast<int>(k), params[k].param.sizes(),
                      params[k].param.scalar_type());
        for (std::size_t i = 0; i < params.size(); ++i) reducer.mark_ready(i);
        reducer.finish();
        for (std::size_t k = 0; k < params.size(); ++k)
          EXPECT_TRUE(at::equal(params[k].param.grad(),
                                expected_grad(params[k], static_cast<int>(k), prescaled, used)))
              << "second pass " << params[k].name;
      }
    }
    shutdown();
  }
}

TEST_F(ModelEngineTest, UnusedParametersCountAsZeros) {
  const int n = world_size();
  init(grid(1, n % 2 == 0 ? 2 : 1));
  auto params = make_params(/*with_grads=*/true);
  // Parameter 0 is used by rank 0 only; parameter 5 by nobody. Ranks that did
  // not use a parameter have no gradient and never mark it.
  std::vector<char> used0(static_cast<std::size_t>(n), 0), none(static_cast<std::size_t>(n), 0),
      all(static_cast<std::size_t>(n), 1);
  used0[0] = 1;
  if (rank() != 0) params[0].param.mutable_grad() = at::Tensor();
  params[5].param.mutable_grad() = at::Tensor();
  GradReducer reducer(params, {64, false});
  for (std::size_t i = 1; i < 5; ++i) reducer.mark_ready(i);
  if (rank() == 0) reducer.mark_ready(0);
  reducer.finish();
  EXPECT_TRUE(at::equal(params[0].param.grad(), expected_grad(params[0], 0, false, used0)));
  EXPECT_TRUE(at::equal(params[5].param.grad(), at::zeros({2, 3})));
  for (std::size_t k = 1; k < 5; ++k)
    EXPECT_TRUE(at::equal(params[k].param.grad(),
                          expected_grad(params[k], static_cast<int>(k), false, all)))
        << params[k].name;
}

TEST_F(ModelEngineTest, SkipsFrozenParametersAndReportsMisuse) {
  init(grid(1, 1));
  auto params = make_params(/*with_grads=*/true);
  params[2].param.set_requires_grad(false);
  const at::Tensor frozen_grad = params[2].param.grad().clone();
  GradReducer reducer(params, {std::size_t{25} << 20, false});
  reducer.mark_ready(2);  // no-op
  reducer.mark_ready(0);
  std::string msg = error_of<StateError>([&] { reducer.mark_ready(0); });
  EXPECT_NE(msg.find("the gradient of parameter 'embed.weight' was produced twice in one pass"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("DistributedModel.backward(loss) or DistributedOptimizer.step()"),
            std::string::npos)
      << msg;
  msg = error_of<ConfigError>([&] { reducer.mark_ready(17); });
  EXPECT_NE(msg.find("GradReducer.mark_ready: index 17 is out of range; the reducer has 6 "
                     "parameters"),
            std::string::npos)
      << msg;
  reducer.finish();
  EXPECT_TRUE(at::equal(params[2].param.grad(), frozen_grad));
  auto more = make_params(false);
  shutdown();
  msg = error_of<StateError>([&] { GradReducer r(more, {}); });
  EXPECT_NE(msg.find("GradReducer needs the smp runtime: call smp.init()"), std::string::npos)
      << msg;
}

TEST_F(ModelEngineTest, PartitionIsDeterministicAndBalanced) {
  EXPECT_EQ(partition_params({10, 10, 5, 5, 1}, 2), (std::vector<int>{0, 1, 0, 1, 0}));
  EXPECT_EQ(partition_params({1, 2, 3}, 1), (std::vector<int>{0, 0, 0}));
  EXPECT_EQ(partition_params({}, 4), std::vector<int>{});
  EXPECT_EQ(partition_params({7, 7, 7}, 4), (std::vector<int>{0, 1, 2}));
  std::vector<std::int64_t> numels;
  for (int i = 0; i < 40; ++i) numels.push_back((i * 37) % 101 + 1);
  for (int ranks : {2, 3, 4, 8}) {
    const auto owner = partition_params(numels, ranks);
    std::vector<std::int64_t> load(static_cast<std::size_t>(ranks), 0);
    for (std::size_t i = 0; i < numels.size(); ++i) load[owner[i]] += numels[i];
    const auto [lo, hi] = std::minmax_element(load.begin(), load.end());
    EXPECT_LE(*hi - *lo, *std::max_element(numels.begin(), numels.end())) << ranks;
  }
  const std::string msg = error_of<ConfigError>([] { partition_params({1}, 0); });
  EXPECT_NE(msg.find("partition_params: num_ranks must be at least 1, got 0"), std::string::npos)
      << msg;

  // Every rank computes the same assignment.
  init(grid(1, 1));
  const auto owner = partition_params(numels, 3);
  at::Tensor mine = at::tensor(std::vector<std::int64_t>(owner.begin(), owner.end()));
  const at::Tensor all = allgather(mine, CommGroup::kWorld);
  for (int r = 0; r < size(); ++r) EXPECT_TRUE(at::equal(all[r], mine)) << r;
}

TEST_F(ModelEngineTest, BroadcastFromOwners) {
  for (const auto& [pp, tp] : grids()) {
    SCOPED_TRACE(testing::Message() << "pp " << pp << " tp " << tp);
    init(grid(pp, tp));
    const std::vector<int>& members = group_members(CommGroup::kRdpGroup);
    std::vector<at::Tensor> params;
    std::vector<std::int64_t> numels;
    for (int k = 0; k < 7; ++k) {
      const auto dtype = k % 3 == 0 ? at::kDouble : at::kFloat;
      params.push_back(grad_of(rank(), k, {k + 1, 2}, dtype));
      numels.push_back(params.back().numel());
    }
    const auto owner = partition_params(numels, rdp_size());
    broadcast_from_owners(params, owner, CommGroup::kRdpGroup);
    for (int k = 0; k < 7; ++k) {
      const at::Tensor want =
          grad_of(members[owner[k]], k, {k + 1, 2}, params[k].scalar_type());
      EXPECT_TRUE(at::equal(params[k], want)) << "param " << k << " owner " << owner[k];
    }
    const std::string msg = error_of<ConfigError>(
        [&] { broadcast_from_owners(params, std::vector<int>(7, rdp_size()), CommGroup::kRdpGroup); });
    EXPECT_NE(msg.find("broadcast_from_owners: owner " + std::to_string(rdp_size()) +
                       " of parameter 0 is not a rank of RDP_GROUP"),
              std::string::npos)
        << msg;
    shutdown();
  }
}

}  // namespace
}  // namespace smp
