#include "smp/model/distributed_model.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/variable.h>

#include <atomic>
#include <utility>

#include "smp/core/error.h"
#include "smp/model/grad_reducer.h"
#include "smp/nn/modules.h"
#include "smp/runtime.h"
#include "smp/torch/collectives.h"

namespace smp {
namespace detail {

/// Shared by the model and its gradient hooks (which may outlive it inside
/// autograd until they are removed).
struct ModelHookState {
  std::atomic<GradReducer*> reducer{nullptr};
  /// False during the non-final passes of backward_passes_per_step.
  std::atomic<bool> armed{true};
  /// No gradients are pending averaging.
  std::atomic<bool> finished{true};
};

}  // namespace detail

namespace {

/// Runs after autograd accumulated parameter `index`'s gradient into .grad.
class ReadyHook : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(std::shared_ptr<detail::ModelHookState> state, std::size_t index)
      : state_(std::move(state)), index_(index) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override {
    GradReducer* reducer = state_->reducer.load();
    if (reducer == nullptr || !state_->armed.load()) return;
    state_->finished.store(false);
    reducer->mark_ready(index_);
  }
  const detail::ModelHookState* state() const { return state_.get(); }

 private:
  std::shared_ptr<detail::ModelHookState> state_;
  std::size_t index_;
};

/// The full state dict's entries in torch's state_dict order (per module:
/// parameters, buffers, children), tensor-parallel modules listing every full
/// parameter in layout order, reached through gather_full / load_full.
void full_entries(torch::nn::Module& m, const std::string& prefix,
                  std::vector<state_dict::FullEntry>& out) {
  if (auto* sharded = dynamic_cast<nn::ShardedModule*>(&m)) {
    for (const nn::ParamLayout& l : sharded->layouts()) {
      state_dict::FullEntry e;
      e.name = prefix + l.name;
      const std::string local = l.name;
      e.gather = [sharded, local] { return sharded->gather_full(local); };
      e.load = [sharded, local](const at::Tensor& full) { sharded->load_full(local, full); };
      out.push_back(std::move(e));
    }
    for (const auto& b : sharded->named_buffers(/*recurse=*/true))
      if (b.value().defined()) out.push_back({prefix + b.key(), b.value(), {}, {}, true});
    return;
  }
  for (const auto& p : m.named_parameters(/*recurse=*/false))
    if (p.value().defined()) out.push_back({prefix + p.key(), p.value(), {}, {}, true});
  for (const auto& b : m.named_buffers(/*recurse=*/false))
    if (b.value().defined()) out.push_back({prefix + b.key(), b.value(), {}, {}, true});
  for (const auto& c : m.named_children()) full_entries(*c.value(), prefix + c.key() + ".", out);
}

/// This rank's local tensors in torch's state_dict order.
void local_entries(torch::nn::Module& m, const std::string& prefix, TensorMap& out) {
  for (const auto& p : m.named_parameters(/*recurse=*/false))
    if (p.value().defined()) out.insert(prefix + p.key(), p.value());
  for (const auto& b : m.named_buffers(/*recurse=*/false))
    if (b.value().defined()) out.insert(prefix + b.key(), b.value());
  for (const auto& c : m.named_children()) local_entries(*c.value(), prefix + c.key() + ".", out);
}

const state_dict::Api kApi{"smp::DistributedModel::load_state_dict", "strict=false",
                           "state_dict_full()"};

void broadcast_in_place(const at::Tensor& t, CommGroup group) {
  torch::NoGradGuard no_grad;
  if (t.is_contiguous()) {
    at::Tensor view = t.detach();
    broadcast(view, 0, group);
  } else {
    at::Tensor tmp = t.detach().contiguous();
    broadcast(tmp, 0, group);
    t.detach().copy_(tmp);
  }
}

}  // namespace

DistributedModel::DistributedModel(std::shared_ptr<torch::nn::Module> module,
                                   DistributedModelOptions options)
    : module_(std::move(module)), options_(options) {
  SMP_CHECK(is_initialized(), StateError, "smp::DistributedModel needs smp::init() first");
  SMP_CHECK(module_ != nullptr, ConfigError,
            "smp::DistributedModel expects a torch::nn::Module, got a null pointer on rank ",
            rank());
  SMP_CHECK(options_.backward_passes_per_step >= 1, ConfigError,
            "smp::DistributedModel: backward_passes_per_step must be >= 1, got ",
            options_.backward_passes_per_step);
  SMP_CHECK(options_.bucket_cap_mb > 0, ConfigError,
            "smp::DistributedModel: bucket_cap_mb must be positive, got ", options_.bucket_cap_mb);
  if (pp_size() > 1)
    SMP_THROW(NotSupportedError, "smp::DistributedModel: pipeline parallelism "
              "(pipeline_parallel_degree=", pp_size(), ") is not implemented yet; use "
              "pipeline_parallel_degree 1, or smp::PipelinedSequential "
              "(smp/pipeline/sequential.h) for a torch::nn::Sequential");

  infos_ = nn::param_infos(*module_, "smp::DistributedModel");

  // Every rank ends with its part of dp rank 0's model (world rank 0's with
  // pp_size 1): replicas over DP_GROUP, parameters of tensor-parallel modules
  // within each tp rank's RDP_GROUP.
  for (const ParamInfo& info : infos_)
    broadcast_in_place(info.param,
                       info.distributed() ? CommGroup::kRdpGroup : CommGroup::kDpGroup);
  for (const auto& b : module_->named_buffers(/*recurse=*/true))
    if (b.value().defined()) broadcast_in_place(b.value(), CommGroup::kDpGroup);

  build_reducer();
}

void DistributedModel::build_reducer() {
  GradReducer::Options o;
  o.bucket_bytes = static_cast<std::size_t>(options_.bucket_cap_mb * (1 << 20));
  o.prescaled_batch = config().prescaled_batch;
  reducer_ = std::make_unique<GradReducer>(infos_, o);
  hooks_ = std::make_shared<detail::ModelHookState>();
  hooks_->reducer.store(reducer_.get());
  for (std::size_t i = 0; i < infos_.size(); ++i) {
    if (!infos_[i].param.requires_grad()) continue;
    torch::autograd::impl::set_post_acc_grad_hooks(infos_[i].param,
                                                   std::make_unique<ReadyHook>(hooks_, i));
  }
}

DistributedModel::~DistributedModel() {
  if (hooks_) hooks_->reducer.store(nullptr);
  for (const ParamInfo& info : infos_) {
    if (!info.param.requires_grad()) continue;
    auto& slot = torch::autograd::impl::post_acc_grad_hooks(info.param);
    const auto* hook = dynamic_cast<const ReadyHook*>(slot.get());
    if (hook != nullptr && hook->state() == hooks_.get())
      torch::autograd::impl::set_post_acc_grad_hooks(info.param, nullptr);
  }
}

void DistributedModel::backward(const at::Tensor& loss) {
  ++backward_calls_;
  const bool final = backward_calls_ % options_.backward_passes_per_step == 0;
  hooks_->armed.store(final);
  try {
    loss.backward();
  } catch (...) {
    hooks_->armed.store(true);
    throw;
  }
  hooks_->armed.store(true);
  if (final) {
    hooks_->finished.store(false);
    finish_grads();
  }
}

void DistributedModel::finish_grads() {
  SMP_CHECK(reducer_ != nullptr, StateError, "smp::DistributedModel on rank ", rank(),
            ": no gradient reducer; construct the model after smp::init()");
  if (!hooks_->finished.load()) {
    reducer_->finish();
    hooks_->finished.store(true);
  }
}

std::vector<at::Tensor> DistributedModel::local_parameters() const {
  std::vector<at::Tensor> out;
  out.reserve(infos_.size());
  for (const ParamInfo& info : infos_) out.push_back(info.param);
  return out;
}

const ParamInfo& DistributedModel::param_info(const std::string& name) const {
  for (const ParamInfo& info : infos_)
    if (info.name == name) return info;
  SMP_THROW(ConfigError, "smp::DistributedModel: no local parameter '", name, "' on rank ",
            rank(), " (tp_rank ", tp_rank(), "); see param_infos() for the names this rank holds");
}

TensorMap DistributedModel::local_state_dict() const {
  TensorMap out;
  local_entries(*module_, "", out);
  return state_dict::partial(std::move(out));
}

TensorMap DistributedModel::state_dict_full(bool gather_to_rank0) {
  if (!gather_to_rank0) return local_state_dict();
  if (rdp_rank() != 0) return TensorMap();
  std::vector<state_dict::FullEntry> entries;
  full_entries(*module_, "", entries);
  return state_dict::gather_full(entries, /*keep=*/rank() == 0);
}

LoadResult DistributedModel::load_state_dict(const TensorMap& state, bool strict,
                                             bool same_partition_load) {
  (void)same_partition_load;  // shapes are checked either way, as on the Python side
  if (state_dict::is_partial(state)) {
    TensorMap local;
    local_entries(*module_, "", local);
    return state_dict::load_partial(local, state, strict, kApi);
  }
  std::vector<state_dict::FullEntry> entries;
  full_entries(*module_, "", entries);
  return state_dict::load_full(entries, state, strict, kApi);
}

}  // namespace smp
