"""Communication of picklable Python objects with smp v1 semantics.

    if smp.rank() == 0:
        smp.broadcast(obj, smp.WORLD)
    else:
        obj = smp.recv_from(0, smp.RankType.WORLD_RANK)

Objects travel pickled (highest protocol). CUDA tensors inside them are moved to
the CPU for the trip and back to the receiver's current CUDA device on arrival
(they stay on the CPU where CUDA is not available).
"""

import io
import pickle

import torch

from smp import _C
from smp._C import CommGroup, RankType


def _to_current_device(tensor):
    if torch.cuda.is_available():
        return tensor.to(torch.cuda.current_device())
    return tensor


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type == "cuda":
            return _to_current_device, (obj.detach().cpu(),)
        return NotImplemented


def _dumps(obj):
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _loads(data):
    return pickle.loads(data)


def _group(group):
    return CommGroup(group)


def _peer_world_rank(peer, rank_type):
    rank_type = RankType(rank_type)
    return _C.topology().peer_world_rank(_C.rank(), rank_type, int(peer))


def broadcast(obj, group, timeout=None):
    """Sends ``obj`` to every other member of this process's ``group``; each of
    them receives it with ``smp.recv_from(src, rank_type)`` where ``src`` is this
    process's rank of the group's rank type. Returns ``obj``.

        if smp.pp_rank() == 0:
            smp.broadcast(cfg, smp.PP_GROUP)
        else:
            cfg = smp.recv_from(0, smp.RankType.PP_RANK)
    """
    members = _C.group_members(_group(group))
    me = _C.rank()
    data = _dumps(obj)
    for dest in members:
        if dest != me:
            _C.send_bytes(data, dest, timeout)
    return obj


def send(obj, dest_rank, rank_type, timeout=None):
    """Sends ``obj`` to the member of this process's group of ``rank_type`` whose
    rank of that type is ``dest_rank``; it calls ``smp.recv_from``.

        smp.send(activations, smp.pp_rank() + 1, smp.RankType.PP_RANK)
    """
    _C.send_bytes(_dumps(obj), _peer_world_rank(dest_rank, rank_type), timeout)


def recv_from(src_rank, rank_type, timeout=None):
    """Receives the next object sent (``smp.send`` or ``smp.broadcast``) by the
    member of this process's group of ``rank_type`` whose rank of that type is
    ``src_rank``. Raises smp.CommTimeoutError when nothing arrives in time.

        obj = smp.recv_from(0, smp.RankType.WORLD_RANK)
    """
    return _loads(_C.recv_bytes(_peer_world_rank(src_rank, rank_type), timeout))


def allgather(obj, group, timeout=None):
    """Every member's ``obj``, as a list ordered by rank within ``group``.

        smp.allgather(smp.rank(), smp.TP_GROUP)   # e.g. [4, 5]
    """
    return [_loads(b) for b in _C.allgather_bytes(_dumps(obj), _group(group), timeout)]


def gather(obj, group, rank=0, timeout=None):
    """Every member's ``obj`` as a list (ordered by group rank) on the member of
    group rank ``rank``; None on the others."""
    group = _group(group)
    n = len(_C.group_members(group))
    if not 0 <= rank < n:
        raise _C.ConfigError(
            f"smp.gather: rank {rank} is not a rank of {group.name}, which has {n} members "
            f"(ranks 0..{n - 1}); pass rank= within that range"
        )
    parts = _C.allgather_bytes(_dumps(obj), group, timeout)
    if _C.rank_of_type(RankType(int(group))) != rank:
        return None
    return [_loads(b) for b in parts]


def barrier(group=CommGroup.WORLD, timeout=None):
    """Blocks until every member of ``group`` has called it."""
    _C.barrier(_group(group), timeout)


def dp_barrier(timeout=None):
    """barrier(smp.DP_GROUP)"""
    _C.barrier(CommGroup.DP_GROUP, timeout)


def mp_barrier(timeout=None):
    """barrier(smp.MP_GROUP)"""
    _C.barrier(CommGroup.MP_GROUP, timeout)
