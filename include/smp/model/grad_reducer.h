#pragma once
/// Data-parallel gradient averaging, bucketed and overlapped with backward.
///
/// Replicated parameters see a different batch on every rank of DP_GROUP, so
/// their gradients are averaged over DP_GROUP. Tensor-parallel shards already
/// hold the contributions of their whole TP group's batches (the layers merge
/// them), so their gradients are summed over RDP_GROUP and divided by the
/// number of batches that contributed: dp_size, or rdp_size when the TP group
/// shares one batch (prescaled_batch). The result equals the gradient of the
/// mean loss over the union of all batches.
///
/// Parameters are packed into buckets (per group kind, dtype and device, in
/// reverse registration order, which is roughly the order backward produces
/// gradients). A bucket is reduced as soon as all its gradients are marked
/// ready and all earlier buckets have been launched, so every member of a group
/// runs the same collectives in the same order. Host buckets are reduced on a
/// background thread; CUDA buckets on a side stream.

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "smp/model/param_info.h"

namespace smp {

class GradReducer {
 public:
  struct Options {
    std::size_t bucket_bytes = 25u << 20;
    /// Config key prescaled_batch: the TP group shares one batch.
    bool prescaled_batch = false;
  };

  /// Needs smp::init(). Parameters without requires_grad are skipped.
  GradReducer(std::vector<ParamInfo> params, Options options);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  /// Parameter `index`'s gradient is final for this backward pass (called
  /// from a post-accumulate-grad hook). Thread-safe.
  void mark_ready(std::size_t index);

  /// Completes the pass: parameters never marked ready are taken as their .grad
  /// is now (zeros where it is undefined: unused parameters), every bucket is
  /// reduced, averaged gradients are written back into each parameter's .grad.
  /// Blocks until done. Throws CommError/TimeoutError.
  void finish();

  /// Number of buckets (for tests and logs).
  std::size_t num_buckets() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace smp
