#pragma once
/// The communicating autograd functions of tensor parallelism, written once
/// here and used by the Python modules (through smp._C) and the C++ modules.
/// Every function is differentiable: its backward is the adjoint collective.
/// `group` is normally CommGroup::kTpGroup.
///
/// Two batch conventions (config key prescaled_batch):
///  - off (default): each tensor-parallel rank brings its own batch. A layer
///    merges them with gather_batch at entry and hands each rank back its own
///    rows with reduce_scatter_batch at exit.
///  - on: the group shares one batch. A layer enters with copy_to_group and
///    leaves with reduce_from_group.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "smp/core/topology.h"

namespace smp::nn {

/// Forward: concatenates every member's x along dim 0 in group-rank order
/// (batch sizes may differ). Backward: each member gets the sum over members
/// of the gradient rows of its own batch.
at::Tensor gather_batch(const at::Tensor& x, CommGroup group);

/// Forward: x holds the rows of every member's batch, concatenated in group
/// order, `local_batch` of them this rank's; returns the sum over members of
/// this rank's rows. Backward: gathers the gradients of all rows.
at::Tensor reduce_scatter_batch(const at::Tensor& x, std::int64_t local_batch, CommGroup group);

/// Forward: sum over the group (allreduce). Backward: identity.
at::Tensor reduce_from_group(const at::Tensor& x, CommGroup group);

/// Forward: identity. Backward: sum of the gradients over the group.
at::Tensor copy_to_group(const at::Tensor& x, CommGroup group);

/// Forward: this rank's piece of x along `dim` (uneven splits give the
/// remainder to the lowest ranks). Backward: gathers the pieces' gradients.
at::Tensor scatter_to_group(const at::Tensor& x, std::int64_t dim, CommGroup group);

/// Forward: concatenates every member's x along `dim` (sizes may differ).
/// Backward: this rank's piece of the gradient.
at::Tensor gather_from_group(const at::Tensor& x, std::int64_t dim, CommGroup group);

/// Not differentiable: concatenation along `dim` of every member's x, whose
/// sizes along dim may differ (padding internally). Used by the functions
/// above and by state-dict gathering.
at::Tensor allgather_along(const at::Tensor& x, std::int64_t dim, CommGroup group);

}  // namespace smp::nn
