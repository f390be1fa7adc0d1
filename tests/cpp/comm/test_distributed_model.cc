// smp::DistributedModel and smp::DistributedOptimizer under mpirun with 1, 2,
// 4 or 8 ranks: training steps on tensor-parallel grids equal those of the
// plain model on the union of all batches (SGD, Adam, with and without sharded
// optimizer state), full and partial state dicts, and the optimizer's errors.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>

#include "smp/core/error.h"
#include "smp/model/distributed_model.h"
#include "smp/model/distributed_optimizer.h"
#include "smp/nn/modules.h"
#include "smp/runtime.h"

namespace smp {
namespace {

constexpr std::int64_t kVocab = 16, kDim = 8, kHidden = 16, kOut = 4, kBatch = 3, kSeq = 3;

int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

/// The tensor-parallel model: embedding, two DistributedLinear, a replicated head.
struct TpNetImpl : torch::nn::Module {
  TpNetImpl() {
    emb = register_module("emb", nn::DistributedEmbedding(nn::DistributedEmbeddingOptions{
                                     kVocab, kDim, std::nullopt, false, 11}));
    fc1 = register_module("fc1", nn::DistributedLinear(nn::DistributedLinearOptions{
                                     kDim, kHidden, true, 12}));
    fc2 = register_module("fc2", nn::DistributedLinear(nn::DistributedLinearOptions{
                                     kHidden, kOut, true, 13}));
    head = register_module("head", torch::nn::Linear(kOut, kOut));
  }
  at::Tensor forward(const at::Tensor& ids) {
    at::Tensor h = emb->forward(ids).mean(1);
    return head->forward(at::tanh(fc2->forward(at::relu(fc1->forward(h)))));
  }
  nn::DistributedEmbedding emb{nullptr};
  nn::DistributedLinear fc1{nullptr}, fc2{nullptr};
  torch::nn::Linear head{nullptr};
};

/// The same model from plain torch modules (same parameter names).
struct PlainNetImpl : torch::nn::Module {
  PlainNetImpl() {
    emb = register_module("emb", torch::nn::Embedding(kVocab, kDim));
    fc1 = register_module("fc1", torch::nn::Linear(kDim, kHidden));
    fc2 = register_module("fc2", torch::nn::Linear(kHidden, kOut));
    head = register_module("head", torch::nn::Linear(kOut, kOut));
  }
  at::Tensor forward(const at::Tensor& ids) {
    at::Tensor h = emb->forward(ids).mean(1);
    return head->forward(at::tanh(fc2->forward(at::relu(fc1->forward(h)))));
  }
  torch::nn::Embedding emb{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, head{nullptr};
};

/// Batch `d` of step `step` (deterministic, no RNG).
std::pair<at::Tensor, at::Tensor> batch(int step, int d) {
  const at::Tensor ids =
      (at::arange(kBatch * kSeq, at::kLong) * (7 + d) + step * 3 + d).remainder(kVocab).reshape(
          {kBatch, kSeq});
  const at::Tensor target =
      at::sin(at::arange(kBatch * kOut, at::kFloat) * 0.37 + d + step * 0.1).reshape(
          {kBatch, kOut});
  return {ids, target};
}

void load_plain(torch::nn::Module& plain, const TensorMap& full) {
  torch::NoGradGuard no_grad;
  for (auto& p : plain.named_parameters()) {
    const at::Tensor* v = full.find(p.key());
    ASSERT_NE(v, nullptr) << p.key();
    p.value().copy_(*v);
  }
}

/// Every parameter of `plain` equals the full state (atol 1e-5).
void expect_matches(torch::nn::Module& plain, const TensorMap& full) {
  const auto params = plain.named_parameters();
  ASSERT_EQ(full.size(), params.size());
  std::size_t i = 0;
  for (const auto& p : params) {
    EXPECT_EQ(full[i].key(), p.key());  // same order as the plain model
    EXPECT_TRUE(at::allclose(full[i].value(), p.value(), 0.0, 1e-5))
        << p.key() << " max diff " << (full[i].value() - p.value()).abs().max().item<double>();
    ++i;
  }
}

class DistributedModelTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (is_initialized()) shutdown();
  }
};

void init_grid(int tp, bool shard) {
  init({{"tensor_parallel_degree", std::int64_t{tp}},
        {"ddp", true},
        {"shard_optimizer_state", shard}});
}

std::shared_ptr<torch::optim::Optimizer> make_optimizer(const std::string& kind,
                                                        std::vector<at::Tensor> params) {
  if (kind == "sgd")
    return std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1).momentum(0.9));
  return std::make_shared<torch::optim::Adam>(params, torch::optim::AdamOptions(1e-3));
}

/// Three steps (one through a plain loss.backward()) on the current grid; world
/// rank 0 checks the parameters against the plain model.
void run_steps(const std::string& kind) {
  {
    torch::manual_seed(100 + rank());  // the replicated head differs until broadcast
    auto net = std::make_shared<TpNetImpl>();
    auto model = std::make_shared<DistributedModel>(net);
    DistributedOptimizer opt(make_optimizer(kind, model->local_parameters()), model);

    const bool root = rank() == 0;
    std::shared_ptr<PlainNetImpl> plain;
    std::shared_ptr<torch::optim::Optimizer> plain_opt;
    if (rdp_rank() == 0) {
      const TensorMap full = model->state_dict_full();
      if (root) {
        plain = std::make_shared<PlainNetImpl>();
        load_plain(*plain, full);
        plain_opt = make_optimizer(kind, plain->parameters());
      }
    }
    {
      // The full state was gathered right: same forward on batch 0 (every
      // rank runs the tensor-parallel forward, a TP_GROUP collective).
      const at::Tensor ids = batch(0, 0).first;
      const at::Tensor out = net->forward(ids);
      if (root) EXPECT_TRUE(at::allclose(out, plain->forward(ids), 0.0, 1e-6));
    }
    for (int step = 0; step < 3; ++step) {
      const auto [ids, target] = batch(step, dp_rank());
      opt.zero_grad();
      const at::Tensor loss = torch::nn::functional::mse_loss(net->forward(ids), target);
      if (step == 1) {
        loss.backward();  // averaging completes in step()
      } else {
        model->backward(loss);
      }
      opt.step();
      if (root) {
        std::vector<at::Tensor> all_ids, all_targets;
        for (int d = 0; d < dp_size(); ++d) {
          auto b = batch(step, d);
          all_ids.push_back(b.first);
          all_targets.push_back(b.second);
        }
        plain_opt->zero_grad();
        torch::nn::functional::mse_loss(plain->forward(at::cat(all_ids)), at::cat(all_targets))
            .backward();
        plain_opt->step();
      }
    }
    if (rdp_rank() == 0) {
      const TensorMap full = model->state_dict_full();
      if (root) {
        expect_matches(*plain, full);
      } else {
        EXPECT_EQ(full.size(), 0u);
      }
    } else {
      EXPECT_EQ(model->state_dict_full().size(), 0u);
    }
  }
}

using Case = std::tuple<std::string, bool>;
class EquivalenceTest : public DistributedModelTest, public ::testing::WithParamInterface<Case> {};

TEST_P(EquivalenceTest, StepsMatchThePlainModelOnTheUnionOfBatches) {
  const auto [kind, shard] = GetParam();
  for (int tp : {1, 2, 4}) {
    if (world_size() % tp != 0) continue;
    SCOPED_TRACE("tp " + std::to_string(tp));
    init_grid(tp, shard);
    run_steps(kind);
    shutdown();
  }
}

INSTANTIATE_TEST_SUITE_P(Optimizers, EquivalenceTest,
                         ::testing::Combine(::testing::Values("sgd", "adam"),
                                            ::testing::Bool()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::get<0>(info.param) +
                                  (std::get<1>(info.param) ? "_sharded" : "_plain");
                         });

TEST_F(DistributedModelTest, ParamInfosCarryShardSpecs) {
  const int tp = world_size() % 2 == 0 ? 2 : 1;
  init_grid(tp, false);
  auto model = std::make_shared<DistributedModel>(std::make_shared<TpNetImpl>());
  const ParamInfo& w = model->param_info("fc1.weight");
  EXPECT_EQ(w.spec.global_shape, (std::vector<std::int64_t>{kHidden, kDim}));
  if (tp > 1) {
    EXPECT_EQ(w.spec.split_dim, 1);
    EXPECT_EQ(w.spec.num_shards, tp);
    EXPECT_EQ(w.spec.shard_index, tp_rank());
  }
  EXPECT_TRUE(w.distributed());
  EXPECT_FALSE(model->param_info("head.weight").distributed());
  // The row-parallel bias lives on tp rank 0 only and counts as distributed.
  bool has_bias = false;
  for (const ParamInfo& info : model->param_infos()) has_bias = has_bias || info.name == "fc1.bias";
  EXPECT_EQ(has_bias, tp_rank() == 0);
  if (has_bias) EXPECT_TRUE(model->param_info("fc1.bias").distributed());
}

TEST_F(DistributedModelTest, LoadsFullAndPartialStateDicts) {
  const int tp = world_size() % 2 == 0 ? 2 : 1;
  init_grid(tp, false);
  auto net = std::make_shared<TpNetImpl>();
  auto model = std::make_shared<DistributedModel>(net);

  // Full: a plain model's parameters (same values on every rank).
  torch::manual_seed(7);
  PlainNetImpl plain;
  TensorMap full;
  for (const auto& p : plain.named_parameters()) full.insert(p.key(), p.value().detach());
  const LoadResult r = model->load_state_dict(full);
  EXPECT_TRUE(r.missing.empty());
  EXPECT_TRUE(r.unexpected.empty());
  if (rdp_rank() == 0) {
    const TensorMap back = model->state_dict_full();
    if (rank() == 0) expect_matches(plain, back);
  }
  const auto [ids, target] = batch(0, dp_rank());
  EXPECT_TRUE(at::allclose(net->forward(ids), plain.forward(ids), 0.0, 1e-6));

  // Partial: this rank's shards, changed, into the same layout.
  TensorMap local = model->local_state_dict();
  ASSERT_TRUE(local.contains(kPartialStateKey));
  TensorMap changed;
  for (const auto& e : local)
    changed.insert(e.key(), e.key() == kPartialStateKey ? e.value() : e.value() * 0 + 0.5);
  model->load_state_dict(changed, true, /*same_partition_load=*/true);
  for (const ParamInfo& info : model->param_infos())
    EXPECT_TRUE(at::all(info.param == 0.5).item<bool>()) << info.name;

  // strict: missing and unexpected keys are named.
  TensorMap incomplete;
  for (const auto& e : full)
    if (e.key() != "head.bias") incomplete.insert(e.key(), e.value());
  incomplete.insert("extra", at::zeros({1}));
  try {
    model->load_state_dict(incomplete);
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("missing keys ['head.bias'], unexpected keys ['extra']"),
              std::string::npos)
        << e.what();
  }
  const LoadResult lax = model->load_state_dict(incomplete, /*strict=*/false);
  EXPECT_EQ(lax.missing, std::vector<std::string>{"head.bias"});
  EXPECT_EQ(lax.unexpected, std::vector<std::string>{"extra"});

  // A partial entry of another layout is refused.
  if (tp > 1) {
    TensorMap wrong;
    wrong.insert(kPartialStateKey, at::ones({}, at::kBool));
    wrong.insert("fc1.weight", at::zeros({kHidden, kDim}));
    try {
      model->load_state_dict(wrong, /*strict=*/false);
      ADD_FAILURE() << "no ConfigError";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("another tensor-parallel layout"), std::string::npos)
          << e.what();
    }
  }
}

TEST_F(DistributedModelTest, DuplicateOptimizerParameterIsAConfigError) {
  init_grid(1, false);
  auto model = std::make_shared<DistributedModel>(std::make_shared<TpNetImpl>());
  const at::Tensor w = model->param_info("emb.weight").param;
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w, w},
                                                 torch::optim::SGDOptions(0.1));
  try {
    DistributedOptimizer opt(sgd, model);
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("parameter 'emb.weight' appears more than once in the optimizer's "
                        "parameters (param_groups[0]['params'][0] and "
                        "param_groups[0]['params'][1])"),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("    unique_params_set = set()\n"), std::string::npos) << what;
  }
  auto foreign = std::make_shared<torch::optim::SGD>(
      std::vector<at::Tensor>{at::zeros({2}, at::TensorOptions().requires_grad(true))},
      torch::optim::SGDOptions(0.1));
  EXPECT_THROW(DistributedOptimizer(foreign, model), ConfigError);
}

}  // namespace
}  // namespace smp
