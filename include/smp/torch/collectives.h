#pragma once
/// Collectives on torch tensors over smp's groups. CPU tensors travel through
/// the host communicator (MPI under mpirun, gloo under torchrun); CUDA tensors
/// through NCCL on the current CUDA stream (stream-ordered, as
/// torch.distributed). Tensors must be contiguous; results are written in place
/// or into the given output tensor.

#include <ATen/core/Tensor.h>

#include "smp/comm/types.h"
#include "smp/core/topology.h"

namespace smp {

/// Maps a torch dtype to the engine's; throws NotSupportedError for others.
DataType to_data_type(c10::ScalarType type);

/// In place over the group (kAvg divides by the group size).
void allreduce(at::Tensor& tensor, CommGroup group, ReduceOp op = ReduceOp::kSum,
               const CommOptions& options = {});
/// Returns a tensor of shape [group size, *input.shape], member i's input at [i].
at::Tensor allgather(const at::Tensor& input, CommGroup group, const CommOptions& options = {});
/// input: [group size * n, ...] along dim 0; returns this rank's reduced block
/// (input.size(0) / group size rows).
at::Tensor reduce_scatter(const at::Tensor& input, CommGroup group, ReduceOp op = ReduceOp::kSum,
                          const CommOptions& options = {});
/// In place; `root` is a rank within the group.
void broadcast(at::Tensor& tensor, int root, CommGroup group, const CommOptions& options = {});
/// Point to point with the member of this process's `type` group whose rank of
/// that type is `peer` (peer 1 of PP_RANK: the next pipeline stage).
void send(const at::Tensor& tensor, int peer, RankType type, const CommOptions& options = {});
void recv(at::Tensor& tensor, int peer, RankType type, const CommOptions& options = {});
void barrier(CommGroup group, const CommOptions& options = {});

}  // namespace smp
