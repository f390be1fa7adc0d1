"""torch.distributed process groups for smp's groups (created by smp.init when
the config has ``"ddp": True``).

When torch.distributed is not initialized yet, smp initializes it on the job's
TCPStore (served by rank 0's smp runtime; keys under the prefix "torch_dist")
with rank = smp.rank() and world size = smp.size(). Backend (config key
ddp_dist_backend): "auto" gives "cpu:gloo,cuda:nccl" when CUDA is available and
"gloo" otherwise; "gloo" and "nccl" select that backend. Then every process
creates one torch group per smp group of each kind, in the same order, and keeps
the ones it belongs to. Ranks inside a torch group follow torch's convention
(ascending world rank).

    smp.init({"tensor_parallel_degree": 2, "ddp": True})
    torch.distributed.all_reduce(x, group=smp.get_dp_process_group())
"""

import datetime

import torch
import torch.distributed as dist

from smp import _C
from smp._C import CommGroup

_STORE_PREFIX = "torch_dist"

# Process groups of this process by CommGroup, and whether smp initialized
# torch.distributed itself (then shutdown destroys the default group too).
_groups = {}
_all_created = []
_owns_default_group = False
_store = None


def _backend(choice):
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if choice == "nccl":
        if not cuda:
            raise _C.ConfigError(
                "smp config key 'ddp_dist_backend' is 'nccl' but CUDA is not available in this "
                f"process (rank {_C.rank()}); use 'gloo' or 'auto' on CPU-only machines"
            )
        return "nccl"
    return "gloo"


def create_process_groups():
    """Creates the torch process groups of this job. Collective over the world."""
    global _owns_default_group, _store
    if _groups:
        raise _C.StateError("smp torch process groups already exist; call smp.shutdown() first")
    cfg = _C.config()
    timeout = datetime.timedelta(seconds=_C.default_timeout())
    if dist.is_initialized():
        if dist.get_world_size() != _C.size() or dist.get_rank() != _C.rank():
            raise _C.StateError(
                f"torch.distributed is already initialized with rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but smp has rank {_C.rank()} of {_C.size()}; "
                "initialize torch.distributed with the same ranks, or let smp.init do it"
            )
    else:
        host, port = _C.store_host(), _C.store_port()
        try:
            store = dist.TCPStore(
                host, port, is_master=False, timeout=timeout, wait_for_workers=False
            )
        except Exception as e:
            raise _C.CommError(
                f"rank {_C.rank()}: cannot connect to the smp job store at {host}:{port} to "
                f"create torch process groups: {e}; check that rank 0 is running and the port "
                "is reachable"
            ) from e
        _store = dist.PrefixStore(_STORE_PREFIX, store)
        dist.init_process_group(
            backend=_backend(cfg["ddp_dist_backend"]),
            store=_store,
            rank=_C.rank(),
            world_size=_C.size(),
            timeout=timeout,
        )
        _owns_default_group = True
    _groups[CommGroup.WORLD] = dist.group.WORLD
    topo = _C.topology()
    me = _C.rank()
    for kind in (
        CommGroup.PP_GROUP,
        CommGroup.TP_GROUP,
        CommGroup.RDP_GROUP,
        CommGroup.DP_GROUP,
        CommGroup.MP_GROUP,
    ):
        for ranks in topo.all_groups(kind):
            pg = dist.new_group(ranks=list(ranks), timeout=timeout)
            if me in ranks:
                _groups[kind] = pg
                _all_created.append(pg)


def destroy_process_groups():
    """Destroys the groups create_process_groups made (and the default group
    when smp initialized torch.distributed)."""
    global _owns_default_group, _store
    try:
        if dist.is_available() and dist.is_initialized():
            if _owns_default_group:
                dist.destroy_process_group()
            else:
                for pg in _all_created:
                    dist.destroy_process_group(pg)
    finally:
        _groups.clear()
        _all_created.clear()
        _owns_default_group = False
        _store = None


def _get(kind, name):
    pg = _groups.get(kind)
    if pg is None:
        if not _C.is_initialized():
            raise _C.StateError(f"smp.{name}() called before smp.init(); call smp.init first")
        raise _C.StateError(
            f"smp.{name}(): smp created no torch process groups because the smp config has "
            "ddp=False; pass {'ddp': True} to smp.init to get them"
        )
    return pg


def get_world_process_group():
    """The torch process group of all processes (torch's default group)."""
    return _get(CommGroup.WORLD, "get_world_process_group")


def get_pp_process_group():
    """The torch process group of this process's PP_GROUP."""
    return _get(CommGroup.PP_GROUP, "get_pp_process_group")


def get_tp_process_group():
    """The torch process group of this process's TP_GROUP."""
    return _get(CommGroup.TP_GROUP, "get_tp_process_group")


def get_rdp_process_group():
    """The torch process group of this process's RDP_GROUP."""
    return _get(CommGroup.RDP_GROUP, "get_rdp_process_group")


def get_dp_process_group():
    """The torch process group of this process's DP_GROUP."""
    return _get(CommGroup.DP_GROUP, "get_dp_process_group")


def get_mp_process_group():
    """The torch process group of this process's MP_GROUP."""
    return _get(CommGroup.MP_GROUP, "get_mp_process_group")
