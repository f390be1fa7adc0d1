"""Resharding partial checkpoints: smp.load(f, partial=True) on a layout
(pipeline / tensor parallel degrees, rdp degree with sharded optimizer state)
other than the saving one.

Save side (shard_records): smp.save records, for every tensor of the state
dicts it recognises in the saved object, the tensor's full name and shard
spec in the file's index:
  model state dicts (DistributedModel.local_state_dict(): "_smp_is_partial"
  and no "_smp_param_names"):  "model/<state-dict key>"
  optimizer state dicts (DistributedOptimizer.local_state_dict(): carry
  "_smp_param_names"):          "optimizer/<parameter name>/<state key>"
(docs/file_format.md, "Shard records").

Load side (load_resharded): the structure of the result is that of this
rank's CURRENT model and optimizer (smp.DistributedModel /
smp.DistributedOptimizer of this process); every tensor is planned by the C++
planner and read by byte ranges (smp._C.ReshardSource); with rdp replicas the
bytes they all need are read once per replica group and broadcast
(load_cooperatively); non-tensor entries
come from one file: per-parameter ones from a file holding that parameter,
the rest from the file of pp_rank 0, tp_rank 0.
"""

import collections
import os
import time

import torch

from smp import _C, _state
from smp._C import CheckpointError

MODEL_PREFIX = "model/"
OPTIMIZER_PREFIX = "optimizer/"
#: Largest broadcast of a cooperative load (bytes, whole rows at least): the MPI
#: backend progresses a nonblocking broadcast only while it polls it, with a
#: backoff of up to 1 ms, so one large broadcast waits far longer than a series
#: of small ones (measured on the CPU: 64 KiB 1.9 s, 256 KiB 0.55 s, 1 MiB 0.34 s,
#: 16 MiB 0.63 s of broadcasts for 112 MB per rank; tests/bench/reshard_bench.py).
BROADCAST_PIECE_BYTES = 1 << 20
#: Key of a resharded model state dict naming the saving layout.
RESHARDED_KEY = "_smp_resharded_from"


def _is_model_sd(x):
    return isinstance(x, dict) and x.get("_smp_is_partial") is True and \
        "_smp_param_names" not in x


def _is_optimizer_sd(x):
    return isinstance(x, dict) and "_smp_param_names" in x and "state" in x and \
        "param_groups" in x


def _split_spec(spec_split, global_shape, local_shape):
    """(split_dim, num_shards, shard_index) of a tensor of local_shape whose
    parameter is split along spec_split on this layout; replicated when the
    tensor is not shaped like the parameter's shard."""
    tp = _C.tp_size()
    if spec_split is None or tp == 1 or len(local_shape) != len(global_shape):
        return None, 1, 0
    total = global_shape[spec_split]
    r = _C.tp_rank()
    base, rem = divmod(total, tp)
    size = base + (1 if r < rem else 0)
    expected = list(global_shape)
    expected[spec_split] = size
    if list(local_shape) != expected:
        return None, 1, 0
    return spec_split, tp, r


def shard_records(obj):
    """[(key path, full name, global_shape, split_dim, num_shards, shard_index)]
    for the tensors of the model and optimizer state dicts inside `obj`
    (None when there are none)."""
    if not _C.is_initialized():
        return None
    model = _state.current_model()
    specs = getattr(model, "_specs", {}) if model is not None else {}
    out = []

    def model_sd(sd, path):
        for k, v in sd.items():
            if not torch.is_tensor(v) or not isinstance(k, str):
                continue
            shape = tuple(v.shape)
            spec = specs.get(k)
            if spec is not None:
                split, n, i = _split_spec(spec["split_dim"], tuple(spec["global_shape"]), shape)
                glob = tuple(spec["global_shape"]) if split is not None else shape
            else:
                split, n, i, glob = None, 1, 0, shape
            out.append((path + [k], MODEL_PREFIX + k, list(glob), split, n, i))

    def optimizer_sd(sd, path):
        pspecs = sd.get("_smp_shard_specs", {})
        names = {}
        for group, gnames in zip(sd["param_groups"], sd["_smp_param_names"]):
            for pos, n in zip(group["params"], gnames):
                names[pos] = n
        for pos, st in sd["state"].items():
            n = names.get(pos)
            if n is None or not isinstance(st, dict):
                continue
            spec = pspecs.get(n)
            for k, v in st.items():
                if not torch.is_tensor(v) or not isinstance(k, str):
                    continue
                shape = tuple(v.shape)
                split, cnt, i, glob = None, 1, 0, shape
                if spec is not None:
                    split, cnt, i = _split_spec(spec["split_dim"], tuple(spec["global_shape"]),
                                                shape)
                    if split is not None:
                        glob = tuple(spec["global_shape"])
                out.append((path + ["state", str(pos), k], f"{OPTIMIZER_PREFIX}{n}/{k}",
                            list(glob), split, cnt, i))

    def walk(x, path):
        if _is_optimizer_sd(x):
            optimizer_sd(x, path)
        elif _is_model_sd(x):
            model_sd(x, path)
        elif isinstance(x, dict):
            for k, v in x.items():
                if isinstance(k, (str, int)) and not isinstance(k, bool):
                    walk(v, path + [str(k)])
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, path + [str(i)])

    walk(obj, [])
    return out or None


# ---- load side ------------------------------------------------------------------

def _sharded_now():
    return bool(_C.config().get("shard_optimizer_state", False))


def layout_differs(f):
    """True when `f`'s manifest names a layout this job's part cannot be read
    from as is (another pp/tp degree, or sharded optimizer state saved with
    another rdp degree): the engine's one layout check (smp::ckpt::saved_layout_differs)."""
    return _C.ckpt_saved_layout_differs(os.fspath(f))


def holds_partial_owned_state(obj):
    """True when `obj` holds an optimizer state dict with only its owner's
    parameters ("_smp_owned") while this job does not shard optimizer state."""
    if _sharded_now():
        return False
    found = []

    def walk(x):
        if found:
            return
        if _is_optimizer_sd(x):
            if "_smp_owned" in x:
                found.append(True)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return bool(found)


def describe_layout(layout):
    text = f"pp_size {layout['pp_size']}, tp_size {layout['tp_size']}, " \
           f"rdp_size {layout['rdp_size']}"
    return text + (" (sharded optimizer state)" if layout.get("v3") else "")


def current_layout():
    return {"pp_size": _C.pp_size(), "tp_size": _C.tp_size(), "rdp_size": _C.rdp_size(),
            "v3": _sharded_now()}


def _at(obj, path):
    for k in path:
        if isinstance(obj, dict):
            if k in obj:
                obj = obj[k]
            else:
                obj = {str(kk): vv for kk, vv in obj.items()}[k]
        else:
            obj = obj[int(k)]
    return obj


class _Loader:
    def __init__(self, f):
        self.f = f
        self.src = _C.ReshardSource(f)
        self.layout = self.src.layout
        self.parts = self.src.parts
        self.skeletons = {}
        self.targets = []   # (name, global_shape, split_dim, num_shards, shard_index)
        self.tensors = []
        # full name -> (part, key path) of its first copy
        self.where = {}
        self.by_param = collections.defaultdict(list)  # param -> [state keys]
        for p in range(len(self.parts)):
            for name, path in self.src.part_names(p).items():
                if name not in self.where:
                    self.where[name] = (p, list(path))
                    if name.startswith(OPTIMIZER_PREFIX):
                        param, _, key = name[len(OPTIMIZER_PREFIX):].rpartition("/")
                        self.by_param[param].append(key)
        order = sorted(range(len(self.parts)), key=lambda i: (
            self.parts[i]["pp_rank"], self.parts[i]["tp_rank"], max(self.parts[i]["rdp_rank"], 0)))
        self.primary = order[0]

    def skeleton(self, part):
        """The part's object with its tensors memory-mapped (never read here)."""
        if part not in self.skeletons:
            self.skeletons[part] = torch.load(self.parts[part]["file"], mmap=True,
                                              weights_only=True, map_location="cpu")
        return self.skeletons[part]

    def target(self, name, local_shape_fn, split_of):
        """Allocates the target tensor for `name`; split_of(saved) gives
        (split_dim, num_shards, shard_index, global_shape)."""
        saved = self.src.saved_spec(name)
        if saved is None:
            return None
        split, n, i, glob = split_of(saved)
        shape = list(glob)
        if split is not None:
            base, rem = divmod(glob[split], n)
            shape[split] = base + (1 if i < rem else 0)
        t = torch.empty(shape, dtype=getattr(torch, saved["dtype"]))
        self.targets.append((name, list(glob), split, n, i))
        self.tensors.append(t)
        return t

    def model_sd(self, saved_sd):
        model = _state.current_model()
        if model is None:
            raise CheckpointError(
                f"smp.load('{self.f}', partial=True): the checkpoint was saved on another layout "
                f"({describe_layout(self.layout)}); resharding it needs this job's "
                "smp.DistributedModel: create the model (and optimizer) before smp.load")
        model._ensure_partitioned()
        out = collections.OrderedDict()
        for k, cur in model._net.state_dict(keep_vars=True).items():
            if not model._is_local(k):
                continue
            spec = model._specs.get(k)

            def split_of(saved, spec=spec, cur=cur):
                if spec is not None and spec["split_dim"] is not None and _C.tp_size() > 1:
                    glob = tuple(spec["global_shape"])
                    return spec["split_dim"], _C.tp_size(), _C.tp_rank(), glob
                return None, 1, 0, tuple(saved["global_shape"])

            t = self.target(MODEL_PREFIX + k, None, split_of)
            if t is not None:
                out[k] = t
        meta = getattr(saved_sd, "_metadata", None)
        if meta is not None:
            out._metadata = meta
        out["_smp_is_partial"] = True
        out[RESHARDED_KEY] = describe_layout(self.layout)
        return out

    def optimizer_sd(self, saved_osd):
        opt = _state.current_optimizer()
        if opt is None:
            raise CheckpointError(
                f"smp.load('{self.f}', partial=True): the checkpoint holds optimizer state saved "
                f"on another layout ({describe_layout(self.layout)}); resharding it needs this "
                "job's smp.DistributedOptimizer: create it before smp.load")
        model = opt._smp_model
        group_names = opt._group_names()
        if len(group_names) != len(saved_osd["param_groups"]):
            raise CheckpointError(
                f"smp.load('{self.f}'): the saved optimizer state has "
                f"{len(saved_osd['param_groups'])} param groups but this job's optimizer has "
                f"{len(group_names)}; build the optimizer with the same param groups")
        local = set(model._param_names)
        wanted = {n for n, o in zip(opt._smp_names, opt._smp_owned) if o and n in local}
        state, groups, index = {}, [], 0
        for g, names in enumerate(group_names):
            idx = []
            for n in names:
                idx.append(index)
                if n in wanted and n in self.by_param:
                    state[index] = self.param_state(model, n)
                index += 1
            hyper = {k: v for k, v in saved_osd["param_groups"][g].items() if k != "params"}
            groups.append({**hyper, "params": idx})
        return {"state": state, "param_groups": groups, "_smp_param_names": group_names,
                "_smp_shard_specs": opt._specs(opt._smp_names), "_smp_is_partial": True}

    def param_state(self, model, n):
        first = f"{OPTIMIZER_PREFIX}{n}/{self.by_param[n][0]}"
        part, path = self.where[first]
        saved_state = _at(self.skeleton(part), path[:-1])
        spec = model.param_spec(n)
        out = {}
        for k, v in saved_state.items():
            if not torch.is_tensor(v):
                out[k] = v
                continue

            def split_of(saved, spec=spec):
                glob = tuple(saved["global_shape"])
                if spec["split_dim"] is not None and _C.tp_size() > 1 and \
                        glob == tuple(spec["global_shape"]):
                    return spec["split_dim"], _C.tp_size(), _C.tp_rank(), glob
                return None, 1, 0, glob

            t = self.target(f"{OPTIMIZER_PREFIX}{n}/{k}", None, split_of)
            out[k] = t if t is not None else v.clone()
        return out

    def build(self, x):
        if _is_optimizer_sd(x):
            return self.optimizer_sd(x)
        if _is_model_sd(x):
            return self.model_sd(x)
        if isinstance(x, dict):
            out = type(x)() if isinstance(x, collections.OrderedDict) else {}
            for k, v in x.items():
                out[k] = self.build(v)
            return out
        if isinstance(x, list):
            return [self.build(v) for v in x]
        if isinstance(x, tuple):
            return tuple(self.build(v) for v in x)
        if torch.is_tensor(x):
            return x.clone()
        return x

    def run(self, threads=4):
        obj = self.build(self.skeleton(self.primary))
        if _C.rdp_size() > 1 and os.environ.get("SMP_RESHARD_COOPERATIVE", "1") != "0":
            stats = self.load_cooperatively(threads)
        else:
            stats = self.src.load(self.targets, self.tensors, pp_rank=_C.pp_rank(),
                                  tp_rank=_C.tp_rank(), rdp_rank=_C.rdp_rank(), threads=threads)
        self.skeletons.clear()
        stats["resharded_from"] = describe_layout(self.layout)
        return obj, stats


    def load_cooperatively(self, threads):
        """The rdp replicas (RDP_GROUP: same pp and tp rank) need the same model
        bytes: the planner (plan_group) gives each one a contiguous share of the
        bytes every member needs, each member reads its share and its own
        tensors, and every shared chunk is broadcast from its reader, in the
        plan's order, into the others' target tensors (no extra buffer). Each
        byte is read from disk once per group (docs/design.md, "Cooperative
        reads")."""
        from smp import _objects, comm

        group = _C.CommGroup.RDP_GROUP
        members = _objects.allgather(
            (_C.pp_rank(), _C.tp_rank(), _C.rdp_rank(), self.targets), group)
        me = [m[2] for m in members].index(_C.rdp_rank())
        stats = self.src.load_group(members, me, self.tensors, threads=threads)
        chunks = stats.pop("chunks")
        t0 = time.perf_counter()
        piece = BROADCAST_PIECE_BYTES
        for i, lo, hi, reader in chunks:
            t = self.tensors[i]
            if t.dim() == 0:
                comm.broadcast(t, reader, group)
                continue
            row = max(t[0].numel() * t.element_size(), 1)
            step = max(piece // row, 1)
            for a in range(lo, hi, step):
                comm.broadcast(t[a:min(a + step, hi)], reader, group)
        stats["cooperative"] = {"group_size": len(members), "chunks": len(chunks),
                                "broadcast_seconds": time.perf_counter() - t0}
        return stats


def load_resharded(f, threads=4):
    """(this rank's object for the current model/optimizer, stats)."""
    return _Loader(f).run(threads=threads)
