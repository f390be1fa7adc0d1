// train_tp: a small C++ training loop with tensor parallelism 2 (and
// reduced data parallelism world/2) through smp::DistributedModel and
// smp::DistributedOptimizer. It checks itself: world rank 0 also trains the
// same model built from plain torch modules, single-process, on the union of
// every rank's batches, and compares all parameters after the last step.
//
//   mpirun -np 4 train_tp [--shard] [--sgd]
//
// --shard turns on shard_optimizer_state (ZeRO-1 over RDP_GROUP), --sgd uses
// SGD with momentum instead of Adam. Prints the loss on rank 0 and, when the
// parameters match (atol 1e-5), "train_tp: OK"; exits non-zero otherwise.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "smp/core/error.h"
#include "smp/model/distributed_model.h"
#include "smp/model/distributed_optimizer.h"
#include "smp/nn/modules.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace {

constexpr std::int64_t kVocab = 32, kDim = 16, kHidden = 32, kOut = 4, kBatch = 4, kSeq = 5;
constexpr int kSteps = 5;

/// Embedding -> mean over the sequence -> Linear -> ReLU -> Linear -> ReLU ->
/// Linear, the first four tensor-parallel. Tensor parallelism is chosen by
/// building with smp::nn modules; the last layer stays replicated.
struct TpNetImpl : torch::nn::Module {
  TpNetImpl() {
    emb = register_module("emb", smp::nn::DistributedEmbedding(smp::nn::DistributedEmbeddingOptions{
                                     kVocab, kDim, std::nullopt, false, /*seed=*/1}));
    fc1 = register_module("fc1", smp::nn::DistributedLinear(smp::nn::DistributedLinearOptions{
                                     kDim, kHidden, true, /*seed=*/2}));
    fc2 = register_module("fc2", smp::nn::DistributedLinear(smp::nn::DistributedLinearOptions{
                                     kHidden, kHidden, true, /*seed=*/3}));
    head = register_module("head", torch::nn::Linear(kHidden, kOut));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    torch::Tensor h = emb->forward(ids).mean(1);
    h = torch::relu(fc1->forward(h));
    h = torch::relu(fc2->forward(h));
    return head->forward(h);
  }
  smp::nn::DistributedEmbedding emb{nullptr};
  smp::nn::DistributedLinear fc1{nullptr}, fc2{nullptr};
  torch::nn::Linear head{nullptr};
};

/// The same network from plain torch modules: same parameter names.
struct PlainNetImpl : torch::nn::Module {
  PlainNetImpl() {
    emb = register_module("emb", torch::nn::Embedding(kVocab, kDim));
    fc1 = register_module("fc1", torch::nn::Linear(kDim, kHidden));
    fc2 = register_module("fc2", torch::nn::Linear(kHidden, kHidden));
    head = register_module("head", torch::nn::Linear(kHidden, kOut));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    torch::Tensor h = emb->forward(ids).mean(1);
    h = torch::relu(fc1->forward(h));
    h = torch::relu(fc2->forward(h));
    return head->forward(h);
  }
  torch::nn::Embedding emb{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, head{nullptr};
};

/// Synthetic data: global batch `shard` of step `step` (the data set is
/// sharded by dp_rank / dp_size: every rank draws its own batch).
std::pair<torch::Tensor, torch::Tensor> batch(int step, int shard) {
  at::Generator gen = at::detail::createCPUGenerator(1000 * step + shard);
  torch::Tensor ids = at::randint(kVocab, {kBatch, kSeq}, gen, at::kLong);
  torch::Tensor target = at::randn({kBatch, kOut}, gen, at::kFloat);
  return {ids, target};
}

std::shared_ptr<torch::optim::Optimizer> make_optimizer(bool sgd, std::vector<torch::Tensor> p) {
  if (sgd) return std::make_shared<torch::optim::SGD>(p, torch::optim::SGDOptions(0.05).momentum(0.9));
  return std::make_shared<torch::optim::Adam>(p, torch::optim::AdamOptions(1e-3));
}

int run(bool shard, bool sgd) {
  smp::init({{"tensor_parallel_degree", std::int64_t{2}},
             {"ddp", true},
             {"shard_optimizer_state", shard}});
  const bool root = smp::rank() == 0;
  if (root)
    std::cout << "train_tp: world " << smp::size() << ", tp " << smp::tp_size() << ", rdp "
              << smp::rdp_size() << ", optimizer " << (sgd ? "SGD" : "Adam")
              << (shard ? ", sharded optimizer state" : "") << std::endl;

  torch::manual_seed(42 + smp::rank());  // replicated parameters differ until the broadcast
  auto net = std::make_shared<TpNetImpl>();
  auto model = std::make_shared<smp::DistributedModel>(net);
  smp::DistributedOptimizer optimizer(make_optimizer(sgd, model->local_parameters()), model);

  // The reference: rank 0's plain model starts from the gathered full weights.
  std::shared_ptr<PlainNetImpl> plain;
  std::shared_ptr<torch::optim::Optimizer> plain_opt;
  if (smp::rdp_rank() == 0) {
    const smp::TensorMap full = model->state_dict_full();
    if (root) {
      plain = std::make_shared<PlainNetImpl>();
      torch::NoGradGuard no_grad;
      for (auto& p : plain->named_parameters()) p.value().copy_(full[p.key()]);
      plain_opt = make_optimizer(sgd, plain->parameters());
    }
  }

  for (int step = 0; step < kSteps; ++step) {
    const auto [ids, target] = batch(step, smp::dp_rank());
    optimizer.zero_grad();
    torch::Tensor loss = torch::mse_loss(net->forward(ids), target);
    model->backward(loss);
    optimizer.step();

    // The mean loss over all batches, for the log.
    torch::Tensor mean = loss.detach().clone();
    smp::allreduce(mean, smp::CommGroup::kDpGroup, smp::ReduceOp::kAvg);
    if (root) {
      std::vector<torch::Tensor> all_ids, all_targets;
      for (int d = 0; d < smp::dp_size(); ++d) {
        auto b = batch(step, d);
        all_ids.push_back(b.first);
        all_targets.push_back(b.second);
      }
      plain_opt->zero_grad();
      torch::Tensor ref = torch::mse_loss(plain->forward(torch::cat(all_ids)), torch::cat(all_targets));
      ref.backward();
      plain_opt->step();
      std::cout << "step " << step << " loss " << mean.item<double>() << " (reference "
                << ref.item<double>() << ")" << std::endl;
    }
  }

  int bad = 0;
  if (smp::rdp_rank() == 0) {
    const smp::TensorMap full = model->state_dict_full();
    if (root) {
      for (const auto& p : plain->named_parameters()) {
        const torch::Tensor* mine = full.find(p.key());
        if (mine == nullptr || !torch::allclose(*mine, p.value(), 0.0, 1e-5)) {
          std::cerr << "train_tp: parameter " << p.key() << " differs from the reference"
                    << (mine ? " by " + std::to_string((*mine - p.value()).abs().max().item<double>())
                             : std::string(" (missing)"))
                    << std::endl;
          ++bad;
        }
      }
    }
  }
  torch::Tensor flag = torch::full({1}, bad, torch::kInt32);
  smp::broadcast(flag, 0, smp::CommGroup::kWorld);
  const bool ok = flag.item<int>() == 0;
  if (root) std::cout << (ok ? "train_tp: OK" : "train_tp: FAILED") << std::endl;
  optimizer.zero_grad();
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  bool shard = false, sgd = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--shard") == 0) {
      shard = true;
    } else if (std::strcmp(argv[i], "--sgd") == 0) {
      sgd = true;
    } else {
      std::cerr << "usage: train_tp [--shard] [--sgd]" << std::endl;
      return 2;
    }
  }
  int rc = 1;
  try {
    rc = run(shard, sgd);
  } catch (const std::exception& e) {
    std::cerr << "train_tp on rank " << (smp::is_initialized() ? smp::rank() : -1) << ": "
              << e.what() << std::endl;
    return 1;
  }
  smp::shutdown();
  return rc;
}
