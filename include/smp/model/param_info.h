#pragma once
/// A model parameter as the engine sees it: its original (unwrapped) name, the
/// local tensor, and how that tensor relates to the full parameter.

#include <ATen/core/Tensor.h>

#include <string>

#include "smp/core/shard_spec.h"

namespace smp {

struct ParamInfo {
  /// Name in the original, unwrapped model ("encoder.layers.0.fc1.weight").
  std::string name;
  /// The local parameter (a tensor-parallel shard when spec is split).
  at::Tensor param;
  /// Split across the tensor-parallel group, or replicated.
  ShardSpec spec;

  /// Set for an unsplit parameter of a tensor-parallel module (a bias held by
  /// tp_rank 0 only, the LayerNorms of a distributed transformer layer): like
  /// the shards, it sees the whole TP group's batch, so it is reduced as one.
  bool tp_module = false;

  /// True for tensor-parallel shards and other parameters of tensor-parallel
  /// modules (their gradients are averaged over RDP_GROUP); false for
  /// replicated parameters (over DP_GROUP).
  bool distributed() const { return tp_module || !spec.is_replicated(); }
};

}  // namespace smp
