#pragma once
/// smp::DistributedModel: the C++ counterpart of smp.DistributedModel (see
/// python/smp/model.py) for tensor and data parallelism.
///
/// C++ has no module replacement: build the model with the tensor-parallel
/// modules of smp/nn/modules.h (DistributedLinear, DistributedEmbedding,
/// DistributedTransformerLayer) where it should be split, and plain torch
/// modules elsewhere; parameter names are those of the module tree, which
/// equal the names of the same model built with plain torch modules.
///
///   smp::init({{"tensor_parallel_degree", std::int64_t{2}}, {"ddp", true}});
///   auto net = std::make_shared<MyNet>();       // uses smp::nn::DistributedLinear
///   auto model = std::make_shared<smp::DistributedModel>(net);
///   smp::DistributedOptimizer opt(
///       std::make_shared<torch::optim::SGD>(model->local_parameters(),
///                                           torch::optim::SGDOptions(0.1)),
///       model);
///   at::Tensor loss = loss_fn(net->forward(x), y);   // forward is the user's
///   model->backward(loss);                           // backward + averaging
///   opt.step();
///
/// Construction (collective over the world):
/// 1. every replicated parameter and buffer is broadcast over DP_GROUP from dp
///    rank 0 and every distributed parameter (ParamInfo::distributed(): shards
///    and single-holder parameters of tensor-parallel modules) over RDP_GROUP
///    from rdp rank 0, so that every rank holds its part of world rank 0's full
///    model, as after the Python wrapper's broadcast from world rank 0;
/// 2. a ParamInfo per parameter (original name, shard spec from the modules'
///    layouts) and a GradReducer over them;
/// 3. a post-accumulate-grad hook on every parameter that requires grad
///    (torch::autograd::impl::set_post_acc_grad_hooks: it runs after the
///    gradient was accumulated into .grad) hands the finished gradient to the
///    reducer, which averages it while backward runs. The hook slot holds one
///    hook per tensor: do not wrap the same parameters twice at once.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "smp/model/param_info.h"
#include "smp/model/state_dict.h"

namespace smp {

class GradReducer;
namespace detail {
struct ModelHookState;
}

struct DistributedModelOptions {
  /// Gradients accumulate locally over this many backward() calls and are
  /// averaged on the last one.
  int backward_passes_per_step = 1;
  /// Bucket size of the gradient reducer.
  double bucket_cap_mb = 25.0;
};

class DistributedModel {
 public:
  /// Needs smp::init() (StateError otherwise); collective over the world.
  /// Throws NotSupportedError with pipeline_parallel_degree > 1.
  explicit DistributedModel(std::shared_ptr<torch::nn::Module> module,
                            DistributedModelOptions options = {});
  ~DistributedModel();
  DistributedModel(const DistributedModel&) = delete;
  DistributedModel& operator=(const DistributedModel&) = delete;

  /// The wrapped module; call its forward.
  const std::shared_ptr<torch::nn::Module>& module() const { return module_; }

  /// loss.backward(), then gradient averaging over the data-parallel ranks:
  /// .grad holds the averages on return. With backward_passes_per_step = N,
  /// gradients accumulate locally over N calls and are averaged on the N-th.
  void backward(const at::Tensor& loss);
  /// Completes averaging when a plain loss.backward() left it pending (the
  /// optimizer's step() calls it). Throws CommError/TimeoutError.
  void finish_grads();

  /// This rank's parameters (shards for tensor-parallel ones), in
  /// param_infos() order: build the optimizer over these.
  std::vector<at::Tensor> local_parameters() const;
  /// One entry per local parameter, in module order.
  const std::vector<ParamInfo>& param_infos() const { return infos_; }
  /// The ParamInfo of local parameter `name`; ConfigError when unknown.
  const ParamInfo& param_info(const std::string& name) const;

  /// This rank's parameters and buffers under their original names (shards
  /// for tensor-parallel ones), plus kPartialStateKey -> true.
  TensorMap local_state_dict() const;
  /// gather_to_rank0: the full model (full tensors, original names, state
  /// order of the same model built from plain torch modules) on world rank 0,
  /// an empty map on other ranks. Collective over TP_GROUP: every rank with
  /// rdp_rank() == 0 must call it; ranks with rdp_rank() > 0 return {} at
  /// once. gather_to_rank0 = false gives local_state_dict().
  TensorMap state_dict_full(bool gather_to_rank0 = true);
  /// Loads a full state dict (state_dict_full(), or a plain model's
  /// parameters and buffers): every rank copies its slice, no communication.
  /// Or a partial one (local_state_dict(), marked by kPartialStateKey), copied
  /// as is; it must come from the same tensor-parallel layout
  /// (same_partition_load states that; shapes are checked either way).
  /// strict: ConfigError listing missing and unexpected keys. A shape that
  /// does not fit raises ConfigError naming the entry.
  LoadResult load_state_dict(const TensorMap& state, bool strict = true,
                             bool same_partition_load = false);

 private:
  void build_reducer();

  std::shared_ptr<torch::nn::Module> module_;
  DistributedModelOptions options_;
  std::vector<ParamInfo> infos_;
  std::unique_ptr<GradReducer> reducer_;
  std::shared_ptr<detail::ModelHookState> hooks_;
  std::int64_t backward_calls_ = 0;
};

}  // namespace smp
