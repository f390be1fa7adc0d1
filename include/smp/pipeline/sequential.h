#pragma once
/// smp::PipelinedSequential: pipeline parallelism for a torch::nn::Sequential
/// from C++, the C++ counterpart of smp.step for the Python engine
/// (python/smp/pipeline/engine.py).
///
/// Every rank builds the same Sequential (same layers, same initial values).
/// The layers are split into pp_size() contiguous stages; this rank runs the
/// layers of stage pp_rank() and keeps only their parameters trainable (the
/// other layers stay on the rank, with requires_grad off, unused). step() runs
/// one training step over config().microbatches microbatches following
/// pipeline::build_schedule for this stage (config().pipeline: "simple" or
/// "interleaved"). Activations and gradients travel over PP_RANK with
/// smp::send/recv: a 10-element int64 header (present, dtype, ndim, dims),
/// then the tensor.
///
/// Any pp x tp x rdp grid. With tensor_parallel_degree > 1 the layers may be
/// smp::nn tensor-parallel modules (DistributedLinear, ...; include
/// smp/nn/modules.h); plain layers are replicated over the TP group. Each
/// rank's input and target are its data-parallel share of the batch (the TP
/// group's shared batch with prescaled_batch), as for smp::DistributedModel.
/// With dp_size() > 1, step() averages the local gradients after the last
/// backward with the GradReducer smp::DistributedModel uses: replicated
/// parameters over DP_GROUP, parameters of tensor-parallel modules over
/// RDP_GROUP, so every stage equals the plain Sequential trained on the union
/// of the data-parallel batches.

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/container/sequential.h>

namespace smp {

class GradReducer;

/// Stage boundaries of `num_layers` layers over `num_stages` stages balanced by
/// parameter count: result b has num_stages + 1 entries, b[0] = 0,
/// b[num_stages] = num_layers, and stage s owns layers [b[s], b[s + 1]), at
/// least one each. Boundary s is the cut (within the range that leaves every
/// stage a layer) whose prefix parameter count is nearest to total * s /
/// num_stages, the lowest on ties. Deterministic; throws ConfigError when
/// num_layers < num_stages.
std::vector<int> balanced_stage_boundaries(const std::vector<std::int64_t>& layer_params,
                                           int num_stages);

class PipelinedSequential {
 public:
  /// loss(output microbatch, target microbatch) -> scalar, run on the last stage.
  using LossFn = std::function<at::Tensor(const at::Tensor& output, const at::Tensor& target)>;

  /// `boundaries`: empty for balanced_stage_boundaries over the layers'
  /// parameter counts, else pp_size() + 1 increasing entries from 0 to
  /// sequential->size() (every stage at least one layer). Needs smp::init();
  /// throws StateError before it, ConfigError for bad boundaries.
  explicit PipelinedSequential(torch::nn::Sequential sequential, std::vector<int> boundaries = {});
  ~PipelinedSequential();
  PipelinedSequential(PipelinedSequential&&) noexcept;
  PipelinedSequential& operator=(PipelinedSequential&&) noexcept;

  /// One training step. `input` is read on stage 0 only and `target` on the
  /// last stage only (either may be undefined elsewhere); both are split into
  /// config().microbatches equal pieces along dim 0 (the batch size must be
  /// divisible by it). The last stage back-propagates loss(mb) / microbatches
  /// for each microbatch; gradients accumulate into the local parameters'
  /// .grad (the caller zeroes them); with dp_size() > 1 they are then averaged
  /// (see the class comment). Returns the mean of this rank's microbatch
  /// losses on every stage (broadcast over PP_GROUP; not averaged over
  /// data-parallel ranks). Collective over PP_GROUP, TP_GROUP and DP_GROUP:
  /// every rank must call it.
  double step(const at::Tensor& input, const at::Tensor& target, const LossFn& loss);

  /// This rank's stage output for `input` without autograd bookkeeping for
  /// other stages: runs layers [first_layer(), end_layer()) only.
  at::Tensor forward_local(const at::Tensor& input);

  /// The parameters of this stage's layers (the ones to give an optimizer).
  std::vector<at::Tensor> local_parameters() const;
  int first_layer() const { return boundaries_[stage_]; }
  int end_layer() const { return boundaries_[stage_ + 1]; }
  const std::vector<int>& boundaries() const { return boundaries_; }
  torch::nn::Sequential& sequential() { return sequential_; }

 private:
  torch::nn::Sequential sequential_;
  std::vector<int> boundaries_;
  int stage_ = 0;
  int num_stages_ = 1;
  /// Averages the local gradients over DP_GROUP / RDP_GROUP (dp_size() > 1).
  std::unique_ptr<GradReducer> reducer_;
};

}  // namespace smp
