#include "smp/model/distributed_optimizer.h"

#include <map>
#include <utility>

#include "smp/core/error.h"
#include "smp/model/optimizer_shard.h"
#include "smp/runtime.h"

namespace smp {
namespace {

// Same text as the Python side's (python/smp/optimizer.py).
constexpr const char* kDedupRecipe =
    "    unique_params = []\n"
    "    unique_params_set = set()\n"
    "    for p in model.parameters():\n"
    "        if p not in unique_params_set:\n"
    "            unique_params.append(p)\n"
    "            unique_params_set.add(p)\n"
    "    optimizer = torch.optim.Adam(unique_params, ...)";

}  // namespace

DistributedOptimizer::DistributedOptimizer(std::shared_ptr<torch::optim::Optimizer> optimizer,
                                           std::shared_ptr<DistributedModel> model)
    : optimizer_(std::move(optimizer)), model_(std::move(model)) {
  SMP_CHECK(optimizer_ != nullptr, ConfigError,
            "smp::DistributedOptimizer expects a torch::optim::Optimizer, got a null pointer");
  SMP_CHECK(model_ != nullptr, StateError,
            "smp::DistributedOptimizer needs the model: create smp::DistributedModel first and "
            "build the optimizer over its local_parameters()");
  std::map<const c10::TensorImpl*, std::string> name_of;
  for (const ParamInfo& info : model_->param_infos())
    name_of.emplace(info.param.unsafeGetTensorImpl(), info.name);
  std::map<const c10::TensorImpl*, std::pair<std::size_t, std::size_t>> seen;
  const auto& groups = optimizer_->param_groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& params = groups[gi].params();
    for (std::size_t pi = 0; pi < params.size(); ++pi) {
      const at::Tensor& p = params[pi];
      const auto found = name_of.find(p.unsafeGetTensorImpl());
      SMP_CHECK(found != name_of.end(), ConfigError, "smp::DistributedOptimizer: param_groups[",
                gi, "]['params'][", pi, "] (shape ", p.sizes(), ") is not a parameter of the "
                "DistributedModel on rank ", rank(), "; build the optimizer from "
                "model->local_parameters()");
      const auto dup = seen.find(p.unsafeGetTensorImpl());
      if (dup != seen.end())
        SMP_THROW(ConfigError, "smp.DistributedOptimizer: parameter '", found->second,
                  "' appears more than once in the optimizer's parameters (param_groups[",
                  dup->second.first, "]['params'][", dup->second.second, "] and param_groups[",
                  gi, "]['params'][", pi, "]); optimizer state of duplicated parameters cannot "
                  "be saved and loaded. Pass each parameter once:\n", kDedupRecipe);
      seen.emplace(p.unsafeGetTensorImpl(), std::make_pair(gi, pi));
      params_.push_back(p);
      names_.push_back(found->second);
    }
  }
  sharded_ = config().shard_optimizer_state;
  // Ownership follows the model's parameter order, not the optimizer's.
  std::vector<std::int64_t> numels;
  for (const ParamInfo& info : model_->param_infos()) {
    if (seen.count(info.param.unsafeGetTensorImpl()) == 0) continue;
    canonical_.push_back(info.param);
    numels.push_back(info.param.numel());
  }
  std::map<const c10::TensorImpl*, int> owner_of;
  if (sharded_) {
    canonical_owner_ = partition_params(numels, rdp_size());
    for (std::size_t i = 0; i < canonical_.size(); ++i)
      owner_of[canonical_[i].unsafeGetTensorImpl()] = canonical_owner_[i];
  }
  for (const at::Tensor& p : params_)
    owned_.push_back(!sharded_ || owner_of.at(p.unsafeGetTensorImpl()) == rdp_rank());
}

void DistributedOptimizer::step() {
  model_->finish_grads();
  if (!sharded_) {
    optimizer_->step();
    return;
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> hidden;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (owned_[i] || !params_[i].grad().defined()) continue;
    hidden.emplace_back(params_[i], params_[i].grad());
    params_[i].mutable_grad() = at::Tensor();
  }
  try {
    optimizer_->step();
  } catch (...) {
    for (auto& h : hidden) h.first.mutable_grad() = h.second;
    throw;
  }
  for (auto& h : hidden) h.first.mutable_grad() = h.second;
  broadcast_from_owners(canonical_, canonical_owner_, CommGroup::kRdpGroup);
}

void DistributedOptimizer::zero_grad(bool set_to_none) { optimizer_->zero_grad(set_to_none); }

}  // namespace smp
