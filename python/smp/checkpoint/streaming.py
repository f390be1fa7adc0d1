"""Streaming full save inside a job: smp.checkpoint.save_full_streaming gathers
the full model tensor by tensor and rank 0 writes each as it arrives
(smp::ckpt::write_file_streaming), so rank 0 holds at most one full tensor
(plus its transfer buffer) instead of the whole model that
``smp.save(model.state_dict(gather_to_rank0=True), f, partial=False)`` needs.
smp.save_checkpoint(..., partial=False) uses it.
"""

import collections
import os
import secrets
import time

import torch

from smp import _C
from smp._C import CommGroup, RankType
from smp._objects import allgather, recv_from, send
from smp.model import _state_entries


def _entries(model):
    return _state_entries(model._net, model._is_local)


def _meta(model, entries):
    """{name: (dtype name, global shape)} of this stage's entries."""
    local = model._net.state_dict(keep_vars=True)
    specs = getattr(model, "_specs", {})
    out = {}
    for name, tensor, gather, _load, is_local in entries:
        if not is_local:
            continue
        if tensor is not None:
            out[name] = (str(tensor.dtype).replace("torch.", ""), list(tensor.shape))
            continue
        spec = specs.get(name)
        t = local.get(name)
        if t is not None and spec is None:  # held whole by this tp rank (e.g. a bias)
            out[name] = (str(t.dtype).replace("torch.", ""), list(t.shape))
            continue
        if spec is None or t is None:
            raise _C.CheckpointError(
                f"save_full_streaming: no shard spec or local tensor for '{name}'; use "
                "smp.save(model.state_dict(gather_to_rank0=True), f, partial=False)")
        out[name] = (str(t.dtype).replace("torch.", ""), list(spec["global_shape"]))
    return out


def save_full_streaming(model, f, extra=None, fsync=True):
    """Writes ``model.state_dict(gather_to_rank0=True)`` (plus the entries of
    ``extra``, e.g. ``{"_smp_is_partial": False}``) to `f` on world rank 0,
    gathering and writing one tensor at a time: peak host memory on rank 0 is
    2x the largest tensor (measured with tp 2: a dimension-1 split is gathered
    as rows, then transposed), whatever the model's size. The file
    holds the same object, data.pkl and tensor records as
    ``smp.save(model.state_dict(gather_to_rank0=True), f, partial=False)``.
    Collective like state_dict(gather_to_rank0=True): every rank with
    rdp_rank() == 0 calls it (others return at once). Returns the write stats
    on rank 0, None elsewhere.
    """
    if _C.rdp_rank() != 0:
        return None
    f = os.fspath(f)
    entries = _entries(model)
    pipe = getattr(model, "_pipe", None) is not None and _C.pp_size() > 1
    # Shapes and dtypes matter on tp_rank 0 (which sends to / is world rank 0) only.
    meta = _meta(model, entries) if _C.tp_rank() == 0 else {}
    stage_of = {n: _C.pp_rank() for n in meta}
    if pipe and _C.tp_rank() == 0:
        merged = {}
        for pp, part in enumerate(allgather(meta, CommGroup.PP_GROUP)):
            merged.update(part)
            stage_of.update({n: pp for n in part})
        meta = merged
    order = [e for e in entries if e[0] in meta] if (pipe and _C.tp_rank() == 0) else \
        [e for e in entries if e[4]]
    root = _C.rank() == 0

    def gather_one(entry):
        """The full tensor of `entry` on world rank 0 (None elsewhere)."""
        name = entry[0]
        t = None
        if entry[4]:
            got = _C.state_dict_gather_full([entry], _C.tp_rank() == 0)
            t = got[0][1].detach().cpu() if got else None
        if pipe and _C.tp_rank() == 0:
            owner = stage_of[name]
            if owner != 0:
                if _C.pp_rank() == owner:
                    send(t, 0, RankType.PP_RANK)
                    t = None
                elif _C.pp_rank() == 0:
                    t = recv_from(owner, RankType.PP_RANK)
        return t if root else None

    if not root:
        for e in order:
            gather_one(e)
        return None
    obj = collections.OrderedDict()
    pending = {}
    for e in order:
        dtype, shape = meta[e[0]]
        ph = torch.empty((), dtype=getattr(torch, dtype)).expand(*shape) if shape else \
            torch.empty((), dtype=getattr(torch, dtype))
        obj[e[0]] = ph
        pending[ph.data_ptr()] = e
    for k, v in (extra or {}).items():
        obj[k] = v

    def produce(placeholder):
        return gather_one(pending[placeholder.data_ptr()])

    t0 = time.perf_counter()
    stats = _C.ckpt_write_streaming(obj, f, produce, info={"save_id": secrets.token_hex(8),
                                                          "partial": "false"}, fsync=fsync)
    stats["seconds"] = time.perf_counter() - t0
    return stats
