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
///
/// State dicts are smp::ckpt::Value trees with the structure of the Python
/// smp.DistributedOptimizer's (python/smp/optimizer.py), so that a checkpoint
/// written by either language loads in the other:
///   "state":            {index: {"step": tensor(float32), "exp_avg": ..., ...}}
///                       (Python torch.optim's per-parameter state of the same
///                       optimizer class: Adam, AdamW, SGD, Adagrad or RMSprop)
///   "param_groups":     [{Python's hyperparameter keys..., "params": [index]}]
///   "_smp_param_names": [[model parameter name per position, per param group]]
///   "_smp_shard_specs": {name: {"split_dim": int or None, "global_shape": tuple,
///                               "distributed": bool}}
///   "_smp_is_partial":  True for local_state_dict(), False for state_dict()
///   "_smp_owned":       [names] (local_state_dict() with sharding only)
///
///   smp::ckpt::Value sd = Value::dict();
///   sd.set("model_state_dict", smp::state_value(model->local_state_dict()));
///   sd.set("optimizer_state_dict", optimizer.local_state_dict());
///   if (smp::rdp_rank() == 0 || optimizer.sharded())
///     smp::ckpt::save(sd, "/ckpt/checkpoint.pt", {/*partial=*/true, optimizer.sharded()});

#include <torch/optim/optimizer.h>

#include <memory>
#include <string>
#include <vector>

#include "smp/checkpoint/value.h"
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

  /// This rank's optimizer state (with sharding: of the parameters it owns),
  /// in the structure above, with "_smp_is_partial" True. The state tensors
  /// are the optimizer's own (not copies). Local: no communication.
  ckpt::Value local_state_dict() const;
  /// The full optimizer state: with sharding, every owner's state gathered
  /// over RDP_GROUP; with tp_size() > 1, gathered over TP_GROUP, the state
  /// tensors of split parameters concatenated into full tensors. Every caller
  /// gets the result ("_smp_is_partial" False). Collective over RDP_GROUP
  /// (with sharding) and TP_GROUP (tp_size() > 1): call it on every rank.
  /// Gathered state tensors are CPU tensors. With tp_size() == 1 and no
  /// sharding the local state is the full state: it returns
  /// local_state_dict(), as the Python side does.
  ckpt::Value state_dict();
  /// Loads either form (or a plain torch optimizer state dict with this
  /// optimizer's parameter order), matching parameters by name; with
  /// sharding, each rank keeps the state of the parameters it owns. Full
  /// state of split parameters is sliced to this rank's part; a partial one
  /// must come from the same tensor-parallel layout (ConfigError naming the
  /// parameter otherwise). Hyperparameters are taken from the saved param
  /// groups, as torch.optim does. Local: no communication.
  void load_state_dict(const ckpt::Value& state_dict);

 private:
  /// The part of saved per-parameter `state` that belongs to this rank's
  /// `param`: as is when the shapes agree, sliced from a full tensor of a
  /// split parameter when `partial` is false, ConfigError otherwise.
  ckpt::Value fit(const std::string& name, const ckpt::Value& state, const at::Tensor& param,
                  bool partial) const;

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
