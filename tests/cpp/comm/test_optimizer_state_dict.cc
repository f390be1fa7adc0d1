// smp::DistributedOptimizer state dicts under mpirun with 1, 2, 4 or 8 ranks:
// every supported libtorch optimizer resumes exactly from its local and its
// full state dict (tp 1, 2, 4; with and without sharded optimizer state), the
// structure is Python's (keys, "step" as a float32 tensor, param group keys),
// and the errors. The files themselves are compared with Python's by
// tests/python/test_cpp_checkpoint_interop.py.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim.h>

#include "smp/core/error.h"
#include "smp/model/distributed_model.h"
#include "smp/model/distributed_optimizer.h"
#include "smp/model/state_value.h"
#include "smp/nn/modules.h"
#include "smp/runtime.h"
#include "test_util.h"

namespace smp {
namespace {

using ckpt::Value;
constexpr std::int64_t kVocab = 16, kDim = 8, kHidden = 12, kOut = 4, kBatch = 3, kSeq = 3;

int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

struct NetImpl : torch::nn::Module {
  NetImpl() {
    emb = register_module("emb", nn::DistributedEmbedding(nn::DistributedEmbeddingOptions{
                                     kVocab, kDim, std::nullopt, false, 21}));
    fc1 = register_module("fc1", nn::DistributedLinear(nn::DistributedLinearOptions{
                                     kDim, kHidden, true, 22}));
    head = register_module("head", torch::nn::Linear(kHidden, kOut));
  }
  at::Tensor forward(const at::Tensor& ids) {
    return head->forward(at::relu(fc1->forward(emb->forward(ids).mean(1))));
  }
  nn::DistributedEmbedding emb{nullptr};
  nn::DistributedLinear fc1{nullptr};
  torch::nn::Linear head{nullptr};
};

std::shared_ptr<torch::optim::Optimizer> make(const std::string& kind,
                                              const std::vector<at::Tensor>& p, double lr) {
  namespace o = torch::optim;
  if (kind == "Adam") return std::make_shared<o::Adam>(p, o::AdamOptions(lr).amsgrad(true));
  if (kind == "AdamW") return std::make_shared<o::AdamW>(p, o::AdamWOptions(lr));
  if (kind == "SGD") return std::make_shared<o::SGD>(p, o::SGDOptions(lr).momentum(0.9));
  if (kind == "Adagrad") return std::make_shared<o::Adagrad>(p, o::AdagradOptions(lr));
  return std::make_shared<o::RMSprop>(p, o::RMSpropOptions(lr).momentum(0.5).centered(true));
}

struct Trainer {
  std::shared_ptr<NetImpl> net;
  std::shared_ptr<DistributedModel> model;
  std::unique_ptr<DistributedOptimizer> opt;

  Trainer(const std::string& kind, double lr) {
    torch::manual_seed(7 + rank());
    net = std::make_shared<NetImpl>();
    model = std::make_shared<DistributedModel>(net);
    opt = std::make_unique<DistributedOptimizer>(make(kind, model->local_parameters(), lr), model);
  }
  void step(int s) {
    const at::Tensor ids =
        (at::arange(kBatch * kSeq, at::kLong) * 5 + s * 3 + dp_rank()).remainder(kVocab)
            .reshape({kBatch, kSeq});
    const at::Tensor y =
        at::sin(at::arange(kBatch * kOut, at::kFloat) * 0.3 + dp_rank() + s).reshape({kBatch, kOut});
    opt->zero_grad();
    model->backward(torch::nn::functional::mse_loss(net->forward(ids), y));
    opt->step();
  }
};

void expect_same_params(const Trainer& a, const Trainer& b, const std::string& what) {
  const TensorMap pa = a.model->local_state_dict(), pb = b.model->local_state_dict();
  ASSERT_EQ(pa.size(), pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i)
    EXPECT_TRUE(at::equal(pa[i].value(), pb[i].value()))
        << what << ": " << pa[i].key() << " on rank " << rank();
}

class OptimizerStateDictTest : public ::testing::TestWithParam<std::tuple<std::string, bool>> {
 protected:
  void TearDown() override {
    if (is_initialized()) shutdown();
  }
};

TEST_P(OptimizerStateDictTest, ResumesExactlyFromLocalAndFullState) {
  const auto [kind, shard] = GetParam();
  for (int tp : {1, 2, 4}) {
    if (world_size() % tp != 0) continue;
    SCOPED_TRACE("tp " + std::to_string(tp));
    init({{"tensor_parallel_degree", std::int64_t{tp}}, {"ddp", true},
          {"shard_optimizer_state", shard}});
    {
      Trainer a(kind, 0.05);
      a.step(0);
      a.step(1);
      const TensorMap model_state = a.model->local_state_dict();
      const Value local = a.opt->local_state_dict();
      const Value full = a.opt->state_dict();
      EXPECT_TRUE(full.at("_smp_is_partial").as_bool() == (!shard && tp == 1));
      // Fresh optimizers with another learning rate: the saved groups restore it.
      Trainer b(kind, 0.5), c(kind, 0.5);
      b.model->load_state_dict(model_state);
      c.model->load_state_dict(model_state);
      b.opt->load_state_dict(local);
      c.opt->load_state_dict(full);
      for (int s = 2; s < 4; ++s) {
        a.step(s);
        b.step(s);
        c.step(s);
      }
      expect_same_params(a, b, kind + " from local_state_dict()");
      expect_same_params(a, c, kind + " from state_dict()");
    }
    shutdown();
  }
}

INSTANTIATE_TEST_SUITE_P(Optimizers, OptimizerStateDictTest,
                         ::testing::Combine(::testing::Values("Adam", "AdamW", "SGD", "Adagrad",
                                                              "RMSprop"),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::get<0>(info.param) +
                                  (std::get<1>(info.param) ? "_sharded" : "_plain");
                         });

class OptimizerStateDict : public ::testing::Test {
 protected:
  void TearDown() override {
    if (is_initialized()) shutdown();
  }
};

std::vector<std::string> keys(const Value& d) {
  std::vector<std::string> out;
  for (const auto& [k, v] : d.pairs()) out.push_back(k.is_string() ? k.as_string() : k.repr());
  return out;
}

TEST_F(OptimizerStateDict, HasThePythonStructure) {
  init({{"ddp", true}});
  {
    Trainer a("Adam", 0.01);
    a.step(0);
    const Value sd = a.opt->local_state_dict();
    EXPECT_EQ(keys(sd), (std::vector<std::string>{"state", "param_groups", "_smp_param_names",
                                                  "_smp_shard_specs", "_smp_is_partial"}));
    const Value& group = sd.at("param_groups").items()[0];
    EXPECT_EQ(keys(group),
              (std::vector<std::string>{"lr", "betas", "eps", "weight_decay", "amsgrad",
                                        "maximize", "foreach", "capturable", "differentiable",
                                        "fused", "decoupled_weight_decay", "params"}));
    EXPECT_TRUE(group.at("betas").is_tuple());
    const Value& names = sd.at("_smp_param_names").items()[0];
    ASSERT_EQ(names.size(), 5u);
    EXPECT_EQ(names.items()[0].as_string(), "emb.weight");
    const Value& s0 = sd.at("state").pairs()[0].second;
    EXPECT_EQ(keys(s0), (std::vector<std::string>{"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}));
    EXPECT_EQ(s0.at("step").tensor().scalar_type(), at::kFloat);
    EXPECT_EQ(s0.at("step").tensor().dim(), 0);
    EXPECT_EQ(s0.at("step").tensor().item<double>(), 1.0);
    const Value& spec = sd.at("_smp_shard_specs").at("head.weight");
    EXPECT_TRUE(spec.at("split_dim").is_none());
    EXPECT_TRUE(spec.at("global_shape").is_tuple());
    EXPECT_FALSE(spec.at("distributed").as_bool());
    // The model side: "_smp_is_partial" as a Python bool, and back.
    const Value mv = state_value(a.model->local_state_dict());
    EXPECT_TRUE(mv.ordered());
    EXPECT_TRUE(mv.at(kPartialStateKey).as_bool());
    const TensorMap back = tensor_map(mv);
    EXPECT_TRUE(back[kPartialStateKey].item<bool>());
  }
}

TEST_F(OptimizerStateDict, Errors) {
  init({{"ddp", true}});
  {
    Trainer a("Adam", 0.01);
    a.step(0);
    Value sd = a.opt->local_state_dict();

    // Saved by Python's AdamW: another optimizer class.
    Value adamw = sd;
    adamw.find("param_groups")->items()[0].set("decoupled_weight_decay", true);
    EXPECT_NE(test::error_of<ConfigError>([&] { a.opt->load_state_dict(adamw); })
                  .find("saved with decoupled_weight_decay=True (torch.optim.AdamW) but this "
                        "optimizer is torch::optim::Adam"),
              std::string::npos);

    Value maximize = sd;
    maximize.find("param_groups")->items()[0].set("maximize", true);
    EXPECT_NE(test::error_of<NotSupportedError>([&] { a.opt->load_state_dict(maximize); })
                  .find("maximize=True"),
              std::string::npos);

    // SGD state into Adam.
    Trainer s("SGD", 0.01);
    s.step(0);
    EXPECT_NE(test::error_of<ConfigError>([&] { a.opt->load_state_dict(s.opt->local_state_dict()); })
                  .find("the state of parameter 'emb.weight' has no 'step'"),
              std::string::npos);
    a.step(1);  // the failed load left the optimizer as it was

    // A state tensor of another shape in a partial state dict.
    Value wrong = sd;
    for (auto& [k, v] : wrong.find("state")->pairs())
      if (k.as_int() == 0) v.set("exp_avg", at::zeros({3, 3}));
    EXPECT_NE(test::error_of<ConfigError>([&] { a.opt->load_state_dict(wrong); })
                  .find("state 'exp_avg' of parameter 'emb.weight' has shape [3, 3] but the "
                        "parameter on this rank"),
              std::string::npos);

    EXPECT_NE(test::error_of<ConfigError>([&] { a.opt->load_state_dict(Value::list()); })
                  .find("expects a dict"),
              std::string::npos);
    EXPECT_NE(test::error_of<ConfigError>([&] { tensor_map(sd); }).find("entry 'state' is a dict"),
              std::string::npos);

    // An optimizer libtorch has but Python's state layout does not map.
    auto lbfgs = std::make_shared<torch::optim::LBFGS>(a.model->local_parameters());
    DistributedOptimizer other(lbfgs, a.model);
    EXPECT_NE(test::error_of<NotSupportedError>([&] { other.local_state_dict(); })
                  .find("support torch::optim::Adam, AdamW, SGD, Adagrad and RMSprop"),
              std::string::npos);
  }
}

}  // namespace
}  // namespace smp
