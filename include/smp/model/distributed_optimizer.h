#pragma once
/// smp::DistributedOptimizer: the C++ counterpart of smp.DistributedOptimizer
/// (python/smp/optimizer.py). Wraps a torch::optim::Optimizer built over the
/// parameters of a DistributedModel (its local_parameters()).
///
/// step() first completes gradient averaging when a plain loss.backward() left
/// it pending, then steps. With the config key shard_optimizer_state, every
/// parameter is owned by one rank of RDP_GROUP (partition_params over the
/// model's parameter order): each rank steps only its own parameters (the
/// others' .grad are undefined during the inner step, which torch optimizers
/// skip, so they keep state for owned parameters only) and then every owner
/// broadcasts its updated parameters over RDP_GROUP (broadcast_from_owners).

#include <torch/optim/optimizer.h>

#include <memory>
#include <string>
#include <vector>

#include "smp/model/distributed_model.h"

namespace smp {

class DistributedOptimizer {
 public:
  /// Throws ConfigError when a parameter of the optimizer is not one of the
  /// model's, or appears more than once (naming it, with the dedup recipe).
  DistributedOptimizer(std::shared_ptr<torch::optim::Optimizer> optimizer,
                       std::shared_ptr<DistributedModel> model);

  /// Completes pending gradient averaging, then steps (with sharding: the
  /// owned parameters, then broadcasts them from their owners over RDP_GROUP).
  void step();
  void zero_grad(bool set_to_none = true);

  torch::optim::Optimizer& optimizer() { return *optimizer_; }
  const std::shared_ptr<DistributedModel>& model() const { return model_; }
  /// The model's name of each optimizer parameter, in param group order.
  const std::vector<std::string>& param_names() const { return names_; }
  /// shard_optimizer_state is on.
  bool sharded() const { return sharded_; }
  /// Whether this rank steps the optimizer parameter of that position.
  const std::vector<bool>& owned() const { return owned_; }

 private:
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  std::shared_ptr<DistributedModel> model_;
  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<bool> owned_;
  bool sharded_ = false;
  /// The optimizer's parameters in the model's order, and their owners.
  std::vector<at::Tensor> canonical_;
  std::vector<int> canonical_owner_;
};

}  // namespace smp
