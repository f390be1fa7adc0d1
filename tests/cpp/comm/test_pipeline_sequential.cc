// smp::PipelinedSequential under mpirun: with pipeline_parallel_degree = world
// size (2 or 4), three SGD steps over microbatches 1, 2 and 4 with both
// schedules leave every stage's parameters, and the step losses, equal to a
// plain single-process Sequential trained on the full batch; the same with
// replicated data parallelism (pp 2 x rdp) and with tensor-parallel layers
// (pp 2 x tp 2, x rdp 2 at 8 ranks).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include "smp/core/error.h"
#include "smp/nn/modules.h"
#include "smp/pipeline/sequential.h"
#include "smp/runtime.h"

namespace smp {
namespace {

constexpr std::int64_t kIn = 6, kOut = 3, kBatch = 8;

int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

torch::nn::Sequential make_net() {
  torch::manual_seed(1234);
  return torch::nn::Sequential(torch::nn::Linear(kIn, 16), torch::nn::Tanh(),
                               torch::nn::Linear(16, 16), torch::nn::ReLU(),
                               torch::nn::Linear(16, 8), torch::nn::Tanh(),
                               torch::nn::Linear(8, kOut));
}

at::Tensor input_of(int step) {
  return at::sin(at::arange(kBatch * kIn, at::kFloat) * 0.31 + step).reshape({kBatch, kIn});
}
at::Tensor target_of(int step) {
  return at::cos(at::arange(kBatch * kOut, at::kFloat) * 0.17 - step).reshape({kBatch, kOut});
}

at::Tensor mse(const at::Tensor& out, const at::Tensor& target) {
  return torch::nn::functional::mse_loss(out, target);
}

class PipelineSequentialTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (is_initialized()) shutdown();
  }
};

TEST(BalancedStageBoundaries, SplitsByParameterCount) {
  EXPECT_EQ(balanced_stage_boundaries({10, 0, 10, 0}, 2), (std::vector<int>{0, 1, 4}));
  EXPECT_EQ(balanced_stage_boundaries({1, 1, 1, 100}, 2), (std::vector<int>{0, 3, 4}));
  EXPECT_EQ(balanced_stage_boundaries({5, 5, 5, 5}, 4), (std::vector<int>{0, 1, 2, 3, 4}));
  EXPECT_EQ(balanced_stage_boundaries({0, 0, 0}, 1), (std::vector<int>{0, 3}));
  EXPECT_THROW(balanced_stage_boundaries({1, 1}, 3), ConfigError);
}

TEST_F(PipelineSequentialTest, StepsMatchThePlainSequential) {
  const int w = world_size();
  if (w != 2 && w != 4) GTEST_SKIP() << "needs 2 or 4 ranks, runs with " << w;
  for (const std::string schedule : {"simple", "interleaved"}) {
    for (std::int64_t mbs : {1, 2, 4}) {
      SCOPED_TRACE(schedule + " microbatches " + std::to_string(mbs));
      init({{"pipeline_parallel_degree", std::int64_t{w}},
            {"microbatches", mbs},
            {"pipeline", schedule}});
      PipelinedSequential pipe(make_net());
      ASSERT_EQ(pipe.boundaries().size(), static_cast<std::size_t>(w + 1));
      torch::optim::SGD opt(pipe.local_parameters(), torch::optim::SGDOptions(0.1));

      torch::nn::Sequential plain = make_net();
      torch::optim::SGD plain_opt(plain->parameters(), torch::optim::SGDOptions(0.1));

      for (int step = 0; step < 3; ++step) {
        opt.zero_grad();
        const bool first = pp_rank() == 0, last = pp_rank() == pp_size() - 1;
        const double loss = pipe.step(first ? input_of(step) : at::Tensor(),
                                      last ? target_of(step) : at::Tensor(), mse);
        opt.step();

        plain_opt.zero_grad();
        const at::Tensor plain_loss = mse(plain->forward(input_of(step)), target_of(step));
        plain_loss.backward();
        plain_opt.step();
        EXPECT_NEAR(loss, plain_loss.item<double>(), 1e-5) << "step " << step;
      }
      for (int i = pipe.first_layer(); i < pipe.end_layer(); ++i) {
        const auto mine = pipe.sequential()->ptr(i)->named_parameters();
        const auto ref = plain->ptr(i)->named_parameters();
        ASSERT_EQ(mine.size(), ref.size());
        for (std::size_t k = 0; k < mine.size(); ++k) {
          EXPECT_TRUE(at::allclose(mine[k].value(), ref[k].value(), 0.0, 1e-5))
              << "layer " << i << " " << mine[k].key() << " on stage " << pp_rank() << " max diff "
              << (mine[k].value() - ref[k].value()).abs().max().item<double>();
        }
      }
      shutdown();
    }
  }
}

// pp 2 with replicated data parallelism: each replica trains on its own batch;
// step() averages the local gradients over RDP_GROUP, so every stage equals the
// plain Sequential trained on the union of the replicas' batches.
TEST_F(PipelineSequentialTest, DataParallelReplicasMatchThePlainSequentialOnTheUnion) {
  const int w = world_size();
  if (w < 4 || w % 2 != 0) GTEST_SKIP() << "needs an even world of 4 or more, runs with " << w;
  init({{"pipeline_parallel_degree", std::int64_t{2}},
        {"ddp", true},
        {"microbatches", std::int64_t{2}},
        {"pipeline", std::string("interleaved")}});
  ASSERT_EQ(rdp_size(), w / 2);
  PipelinedSequential pipe(make_net());
  torch::optim::SGD opt(pipe.local_parameters(), torch::optim::SGDOptions(0.1));
  torch::nn::Sequential plain = make_net();
  torch::optim::SGD plain_opt(plain->parameters(), torch::optim::SGDOptions(0.1));
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    const int r = rdp_rank();
    const double loss = pipe.step(input_of(step + 10 * r), target_of(step + 10 * r), mse);
    opt.step();
    std::vector<at::Tensor> ins, tgts;
    for (int d = 0; d < rdp_size(); ++d) {
      ins.push_back(input_of(step + 10 * d));
      tgts.push_back(target_of(step + 10 * d));
    }
    {
      torch::NoGradGuard no_grad;
      EXPECT_NEAR(loss, mse(plain->forward(ins[r]), tgts[r]).item<double>(), 1e-5);
    }
    plain_opt.zero_grad();
    mse(plain->forward(at::cat(ins)), at::cat(tgts)).backward();
    plain_opt.step();
  }
  for (int i = pipe.first_layer(); i < pipe.end_layer(); ++i) {
    const auto mine = pipe.sequential()->ptr(i)->parameters();
    const auto ref = plain->ptr(i)->parameters();
    for (std::size_t k = 0; k < mine.size(); ++k)
      EXPECT_TRUE(at::allclose(mine[k], ref[k], 0.0, 1e-5)) << "layer " << i;
  }
}

/// Tensor-parallel layers (and one replicated Linear) in a Sequential.
torch::nn::Sequential make_tp_net() {
  torch::manual_seed(4321);
  return torch::nn::Sequential(
      nn::DistributedLinear(nn::DistributedLinearOptions{kIn, 16, true, 21}), torch::nn::Tanh(),
      nn::DistributedLinear(nn::DistributedLinearOptions{16, 16, true, 22}), torch::nn::ReLU(),
      torch::nn::Linear(16, 8), torch::nn::Tanh(),
      nn::DistributedLinear(nn::DistributedLinearOptions{8, kOut, true, 23}));
}

/// The full value of layer i's parameter `name` (collective over TP_GROUP for
/// tensor-parallel layers, which every rank holds whatever its stage).
at::Tensor full_param(torch::nn::Sequential& net, int i, const std::string& name) {
  auto* sharded = dynamic_cast<nn::ShardedModule*>(net->ptr(i).get());
  if (sharded != nullptr) return sharded->gather_full(name);
  return net->ptr(i)->named_parameters()[name].detach().clone();
}

// pp 2 x tp 2 (x rdp 2 at 8 ranks): DistributedLinear layers split over the TP
// group, a replicated Linear between them; every rank trains on its dp_rank's
// batch. After three interleaved steps the full parameters of every stage
// equal the plain Sequential trained on the union of the batches.
TEST_F(PipelineSequentialTest, TensorParallelLayersMatchThePlainSequentialOnTheUnion) {
  const int w = world_size();
  if (w != 4 && w != 8) GTEST_SKIP() << "needs 4 or 8 ranks, runs with " << w;
  for (const std::string schedule : {"simple", "interleaved"}) {
    SCOPED_TRACE(schedule);
    init({{"pipeline_parallel_degree", std::int64_t{2}},
          {"tensor_parallel_degree", std::int64_t{2}},
          {"ddp", true},
          {"microbatches", std::int64_t{2}},
          {"pipeline", schedule}});
    ASSERT_EQ(dp_size(), w / 2);
    PipelinedSequential pipe(make_tp_net());
    torch::optim::SGD opt(pipe.local_parameters(), torch::optim::SGDOptions(0.1));

    // The plain Sequential with the same full weights.
    torch::nn::Sequential plain(torch::nn::Linear(kIn, 16), torch::nn::Tanh(),
                                torch::nn::Linear(16, 16), torch::nn::ReLU(),
                                torch::nn::Linear(16, 8), torch::nn::Tanh(),
                                torch::nn::Linear(8, kOut));
    {
      torch::NoGradGuard no_grad;
      for (int i = 0; i < static_cast<int>(plain->size()); ++i)
        for (auto& p : plain->ptr(i)->named_parameters())
          p.value().copy_(full_param(pipe.sequential(), i, p.key()));
    }
    torch::optim::SGD plain_opt(plain->parameters(), torch::optim::SGDOptions(0.1));

    for (int step = 0; step < 3; ++step) {
      opt.zero_grad();
      const int d = dp_rank();
      const double loss = pipe.step(input_of(step + 10 * d), target_of(step + 10 * d), mse);
      opt.step();
      std::vector<at::Tensor> ins, tgts;
      for (int k = 0; k < dp_size(); ++k) {
        ins.push_back(input_of(step + 10 * k));
        tgts.push_back(target_of(step + 10 * k));
      }
      {
        torch::NoGradGuard no_grad;
        EXPECT_NEAR(loss, mse(plain->forward(ins[d]), tgts[d]).item<double>(), 1e-5)
            << "step " << step;
      }
      plain_opt.zero_grad();
      mse(plain->forward(at::cat(ins)), at::cat(tgts)).backward();
      plain_opt.step();
    }
    for (int i = pipe.first_layer(); i < pipe.end_layer(); ++i) {
      for (const auto& p : plain->ptr(i)->named_parameters()) {
        const at::Tensor mine = full_param(pipe.sequential(), i, p.key());
        EXPECT_TRUE(at::allclose(mine, p.value(), 0.0, 1e-5))
            << "layer " << i << " " << p.key() << " on stage " << pp_rank() << " max diff "
            << (mine - p.value()).abs().max().item<double>();
      }
    }
    shutdown();
  }
}

TEST_F(PipelineSequentialTest, ErrorsNameTheFix) {
  const int w = world_size();
  if (w != 2 && w != 4) GTEST_SKIP() << "needs 2 or 4 ranks, runs with " << w;
  init({{"pipeline_parallel_degree", std::int64_t{w}}, {"microbatches", std::int64_t{3}}});
  try {
    PipelinedSequential bad(make_net(), {0, 7});
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("pp_size() + 1 increasing values"), std::string::npos)
        << e.what();
  }
  // A batch of 8 does not split into 3 microbatches: every stage that reads a
  // batch throws before any communication.
  PipelinedSequential pipe(make_net());
  if (pp_rank() == 0) {
    try {
      pipe.step(input_of(0), at::Tensor(), mse);
      FAIL() << "expected ConfigError";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("divisible by microbatches"), std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace smp
