"""Tensor collectives over smp's groups.

CPU tensors travel through the host communicator (MPI under mpirun, gloo under
torchrun), CUDA tensors through NCCL on the current stream. Tensors must be
contiguous. Every call takes ``timeout`` in seconds (None: SMP_COMM_TIMEOUT,
else 600) and raises smp.CommTimeoutError when it expires.

    t = torch.full((4,), float(smp.tp_rank()))
    smp.comm.allreduce(t, smp.TP_GROUP)               # in place, returns t
    rows = smp.comm.allgather(t, smp.TP_GROUP)         # [tp_size, 4]
"""

from smp import _C
from smp._C import CommGroup, RankType, ReduceOp


def allreduce(tensor, group=CommGroup.WORLD, op=ReduceOp.SUM, timeout=None):
    """Reduces ``tensor`` in place over this process's ``group`` and returns it."""
    return _C.allreduce(tensor, CommGroup(group), ReduceOp(op), timeout)


def allgather(tensor, group=CommGroup.WORLD, timeout=None):
    """Returns a new tensor [group size, *tensor.shape], member i's tensor at [i]."""
    return _C.allgather(tensor, CommGroup(group), timeout)


def reduce_scatter(tensor, group=CommGroup.WORLD, op=ReduceOp.SUM, timeout=None):
    """Reduces ``tensor`` ([group size * n, ...]) over the group and returns this
    rank's block of n rows (block i goes to group rank i)."""
    return _C.reduce_scatter(tensor, CommGroup(group), ReduceOp(op), timeout)


def broadcast(tensor, root, group=CommGroup.WORLD, timeout=None):
    """Copies group rank ``root``'s ``tensor`` into ``tensor`` on every member and
    returns it."""
    return _C.broadcast(tensor, int(root), CommGroup(group), timeout)


def send(tensor, peer, rank_type=RankType.WORLD_RANK, timeout=None):
    """Sends ``tensor`` to the member of this process's ``rank_type`` group whose
    rank of that type is ``peer``; it calls recv with a tensor of the same shape
    and dtype."""
    _C.send(tensor, int(peer), RankType(rank_type), timeout)


def recv(tensor, peer, rank_type=RankType.WORLD_RANK, timeout=None):
    """Receives into ``tensor`` from ``peer`` (a rank of ``rank_type``) and returns it."""
    return _C.recv(tensor, int(peer), RankType(rank_type), timeout)


def barrier(group=CommGroup.WORLD, timeout=None):
    """Blocks until every member of ``group`` has called it."""
    _C.barrier(CommGroup(group), timeout)
