"""smp.DistributedOptimizer: makes a torch.optim optimizer built over the
parameters of this process's smp.DistributedModel distributed.

    model = smp.DistributedModel(net)
    optimizer = smp.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)

As in smp v1 the call returns the optimizer object itself, still an instance of
its own class (torch.optim.Adam above) and of torch.optim.Optimizer, so LR
schedulers, smp.amp.GradScaler and isinstance checks work; its class becomes a
subclass of both smp.DistributedOptimizer and the original class, which
replaces step, state_dict, load_state_dict and add_param_group and adds smp
v1's methods (local_state_dict, orig_state_dict, orig_step, ...).

step() first completes gradient averaging when a plain loss.backward() left it
pending (model.backward(loss) completes it itself), then steps.

Sharded optimizer state (config shard_optimizer_state=True): parameters are
assigned to owners over RDP_GROUP (balancing elements, smp._C.partition_params);
each rank steps only the parameters it owns (it hides the other gradients from
the optimizer's own step, relying on the torch.optim convention that parameters
whose .grad is None are skipped, so it keeps state only for owned parameters)
and then every owner broadcasts its updated parameters over RDP_GROUP.

State dicts. Every form carries, besides torch's "state" and "param_groups":
  "_smp_param_names":  [[model parameter name per position, per param group]]
  "_smp_shard_specs":  {name: {"split_dim", "global_shape", "distributed"}}
  "_smp_is_partial":   True for local_state_dict(), False for state_dict()
local_state_dict(cast_to_cpu=True, gather_if_shard=True) is the state for this
rank's parameters (its stage, its tensor-parallel part), state tensors copied
to the CPU unless cast_to_cpu=False; with sharding, gather_if_shard=True
gathers every owner's part over RDP_GROUP (collective) and False keeps only the
owned parameters (plus "_smp_owned": [names]), as smp v1. state_dict() is
collective over the ranks it gathers from: with sharding it gathers every
owner's state over RDP_GROUP, and with tp_size() > 1 it gathers over TP_GROUP
and concatenates the state tensors of split parameters into full tensors, so
the result describes the full model (every rank gets it). With tp_size() == 1
and no sharding it equals local_state_dict(). load_state_dict() takes either
form (or a plain torch optimizer state dict of the same parameter order) and
matches entries by parameter NAME, so it survives reordering; full state of
split parameters is sliced to this rank's part. orig_state_dict() and
orig_load_state_dict() are the optimizer's own torch methods.

Pipeline parallelism: the optimizer may list every parameter of the model
(model.parameters()), but on each rank only this stage's parameters have
tensors (the others are released, empty, and never get a gradient, so the
optimizer neither steps them nor keeps state for them); sharding assigns owners
among this stage's parameters; load_state_dict() skips entries of other stages'
parameters. "_smp_shard_specs" holds every parameter's spec (full shapes
recorded at wrapping). The state dicts hold this stage's state only: they are
not gathered over PP_GROUP.

Each parameter must appear once in the optimizer: duplicates raise
smp.ConfigError at construction (smp v1 could save but not load their state).
"""

import torch

from smp import _C
from smp import _objects, _state
from smp import model as _model
from smp._C import CommGroup

_DEDUP_RECIPE = """\
    unique_params = []
    unique_params_set = set()
    for p in model.parameters():
        if p not in unique_params_set:
            unique_params.append(p)
            unique_params_set.add(p)
    optimizer = torch.optim.Adam(unique_params, ...)"""


current_optimizer = _state.current_optimizer


_classes = {}  # optimizer class -> its DistributedOptimizer subclass


def _distributed_class(base):
    """The subclass of (DistributedOptimizer, base) that a wrapped optimizer of
    class `base` becomes; it keeps base's name, so repr() and type names read
    as before."""
    cls = _classes.get(base)
    if cls is None:
        cls = type(base.__name__, (DistributedOptimizer, base),
                   {"__module__": base.__module__, "__qualname__": base.__qualname__,
                    "__doc__": base.__doc__})
        _classes[base] = cls
    return cls


def _to_cpu(state_dict):
    """A copy of an optimizer state dict whose state tensors (except 0-dim
    ones such as Adam's step) are on the CPU."""
    out = dict(state_dict)
    out["state"] = {
        i: {k: (v.cpu() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
        for i, st in state_dict["state"].items()}
    return out


class DistributedOptimizer:
    """``smp.DistributedOptimizer(optimizer)`` returns ``optimizer`` itself, now
    also an instance of smp.DistributedOptimizer (its class becomes a subclass
    of both): it stays a torch.optim.Optimizer of its own type (LR schedulers,
    GradScaler and isinstance checks work), with step, state_dict,
    load_state_dict and add_param_group replaced and smp v1's methods added.
    The original methods stay reachable as orig_step(), orig_state_dict(),
    orig_load_state_dict() and orig_zero_grad(). See the module docstring.

    static_loss_scale, dynamic_loss_scale and dynamic_loss_args are smp v1's
    fp16 loss scaling arguments: accepted, without effect (smp does not wrap the
    optimizer for fp16; use smp.amp.GradScaler)."""

    def __new__(cls, *args, **kwargs):
        if cls is not DistributedOptimizer:
            # copy.deepcopy / pickle of an already wrapped optimizer
            return object.__new__(cls)
        return _wrap(*args, **kwargs)

    def __init__(self, *args, **kwargs):
        pass  # _wrap set everything up; the optimizer's own __init__ ran long ago

    def __getattr__(self, name):
        # smp v1 with fp16 returned a wrapper whose .optimizer is the torch
        # optimizer (Hugging Face's Trainer reads it): here that is the object itself.
        if name == "optimizer":
            return self
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    # ---- torch.optim API ---------------------------------------------------

    def add_param_group(self, param_group):
        raise _C.NotSupportedError(
            "smp.DistributedOptimizer.add_param_group is not supported; build the optimizer "
            "with all its param groups before wrapping it")

    def step(self, closure=None):
        """Completes pending gradient averaging, then steps (with sharding: the
        owned parameters, then broadcasts them from their owners)."""
        self._smp_model._finish_grads()
        if not self._smp_sharded:
            return self.orig_step(closure)
        hidden = []
        for p, owned in zip(self._smp_params, self._smp_owned):
            if not owned and p.grad is not None:
                hidden.append((p, p.grad))
                p.grad = None
        try:
            loss = self.orig_step(closure)
        finally:
            for p, g in hidden:
                p.grad = g
        _C.broadcast_from_owners(self._smp_canonical, self._smp_canonical_owner,
                                 CommGroup.RDP_GROUP)
        return loss

    # torch.optim.Optimizer wraps a class's step for its step hooks once
    # (_patch_step_function); this step calls the wrapped one of the base class.
    step.hooked = True

    def orig_step(self, *args, **kwargs):
        """The optimizer's own step (no gradient averaging, no sharding)."""
        return super(DistributedOptimizer, self).step(*args, **kwargs)

    def orig_zero_grad(self, *args, **kwargs):
        return super(DistributedOptimizer, self).zero_grad(*args, **kwargs)

    def orig_state_dict(self):
        """The optimizer's own torch state dict (this rank's state, positions
        as in its param_groups, no _smp keys)."""
        return super(DistributedOptimizer, self).state_dict()

    def orig_load_state_dict(self, state_dict):
        """The optimizer's own torch load_state_dict (by position)."""
        return super(DistributedOptimizer, self).load_state_dict(state_dict)

    # ---- state dicts -------------------------------------------------------

    def _specs(self, names):
        return {n: dict(self._smp_model.param_spec(n)) for n in names}

    def _group_names(self):
        names = {id(p): n for p, n in zip(self._smp_params, self._smp_names)}
        return [[names[id(p)] for p in g["params"]] for g in self.param_groups]

    def local_state_dict(self, cast_to_cpu=True, gather_if_shard=True, fp32_states_only=False):
        """This rank's optimizer state (its pipeline stage and tensor-parallel
        part) plus the _smp keys, with "_smp_is_partial": True.

        cast_to_cpu: state tensors are copied to the CPU (0-dim ones stay).
        gather_if_shard: with shard_optimizer_state, gather the state of every
        owner over RDP_GROUP (collective there), so the dict describes every
        parameter of this rank; False gives only the owned parameters' state
        (listed in "_smp_owned"), each rdp rank saving its own part (v3 files).
        Without sharding it changes nothing. fp32_states_only: smp v1's fp16
        optimizer option; without effect here."""
        sd = self.orig_state_dict()
        sd["_smp_param_names"] = self._group_names()
        sd["_smp_shard_specs"] = self._specs(self._smp_names)
        sd["_smp_is_partial"] = True
        if self._smp_sharded:
            if gather_if_shard:
                merged = {}
                for part in _objects.allgather(_by_name(sd), CommGroup.RDP_GROUP):
                    merged.update(part)
                sd["state"] = _state_by_position(merged, sd["_smp_param_names"])
            else:
                sd["_smp_owned"] = [n for n, o in zip(self._smp_names, self._smp_owned) if o]
        return _to_cpu(sd) if cast_to_cpu else sd

    def local_optimizer_state_dict(self, cast_to_cpu=True):
        """smp v1 (>= 1.10): local_state_dict(cast_to_cpu, gather_if_shard=False)."""
        return self.local_state_dict(cast_to_cpu=cast_to_cpu, gather_if_shard=False)

    def state_dict(self, cast_to_cpu=True, gather_if_shard=True, fp32_states_only=False):
        """Full optimizer state (see the module docstring); collective over
        RDP_GROUP with sharding and over TP_GROUP with tp_size() > 1.
        cast_to_cpu as in local_state_dict; gather_if_shard and
        fp32_states_only are accepted for smp v1 compatibility (a full state
        always holds every owner's state)."""
        if not self._smp_sharded and _C.tp_size() == 1:
            return self.local_state_dict(cast_to_cpu=cast_to_cpu)
        local = self.local_state_dict(cast_to_cpu=cast_to_cpu, gather_if_shard=False)
        by_name = _by_name(local)
        if self._smp_sharded:
            merged = {}
            for part in _objects.allgather(by_name, CommGroup.RDP_GROUP):
                merged.update(part)
            by_name = merged
        group_names = local["_smp_param_names"]
        specs = local["_smp_shard_specs"]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in local["param_groups"]]
        if _C.tp_size() > 1:
            parts = _objects.allgather((by_name, group_names, specs), CommGroup.TP_GROUP)
            by_name, group_names, specs = _merge_tp(parts)
        state, groups, index = {}, [], 0
        for g, names in enumerate(group_names):
            idx = list(range(index, index + len(names)))
            index += len(names)
            groups.append({**hyper[g], "params": idx})
            for i, n in zip(idx, names):
                if n in by_name:
                    state[i] = by_name[n]
        return {"state": state, "param_groups": groups, "_smp_param_names": group_names,
                "_smp_shard_specs": specs, "_smp_is_partial": False}

    def load_state_dict(self, state_dict, gather_if_shard=False):
        """Loads local_state_dict() or state_dict() output (see the module
        docstring), matching parameters by name; takes effect at once.
        gather_if_shard is smp v1's back-compatibility switch: accepted, without
        effect (each rank takes its own parameters' entries from either form)."""
        sd = state_dict
        partial = bool(sd.get("_smp_is_partial", False))
        if "_smp_param_names" in sd:
            by_name = _by_name(sd)
            saved_groups = sd["param_groups"]
        else:  # a plain torch optimizer state dict: positions must match
            if len(sd["param_groups"]) != len(self.param_groups) or any(
                    len(a["params"]) != len(b["params"])
                    for a, b in zip(sd["param_groups"], self.param_groups)):
                raise _C.ConfigError(
                    "smp.DistributedOptimizer.load_state_dict: the state dict has no "
                    "'_smp_param_names' and its param groups do not match the optimizer's; save "
                    "it with DistributedOptimizer.state_dict() or local_state_dict()")
            by_name = {}
            for a, names in zip(sd["param_groups"], self._group_names()):
                for i, n in zip(a["params"], names):
                    if i in sd["state"]:
                        by_name[n] = sd["state"][i]
            saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise _C.ConfigError(
                f"smp.DistributedOptimizer.load_state_dict: the state dict has "
                f"{len(saved_groups)} param groups, the optimizer {len(self.param_groups)}")
        names_of = {id(p): n for p, n in zip(self._smp_params, self._smp_names)}
        # Only this pipeline stage's parameters take state: the others' tensors
        # are released on this rank (a full torch state dict may hold theirs).
        local = set(self._smp_model._param_names)
        owned = {n for n, o in zip(self._smp_names, self._smp_owned) if o and n in local}
        state, groups, index = {}, [], 0
        for g, group in enumerate(self.param_groups):
            idx = []
            for p in group["params"]:
                name = names_of[id(p)]
                idx.append(index)
                if name in by_name and name in owned:
                    state[index] = {k: self._fit(name, k, v, p, partial)
                                    for k, v in by_name[name].items()}
                index += 1
            groups.append({**{k: v for k, v in saved_groups[g].items() if k != "params"},
                           "params": idx})
        self.orig_load_state_dict({"state": state, "param_groups": groups})

    def load_local_optimizer_state_dict(self, state_dict):
        """smp v1 (>= 1.10): loads a partial (local_state_dict) state dict."""
        if not state_dict.get("_smp_is_partial", False):
            raise _C.CheckpointError(
                "smp.DistributedOptimizer.load_local_optimizer_state_dict expects a partial "
                "state dict (from local_state_dict(), '_smp_is_partial': True); load a full "
                "one with load_state_dict()")
        self.load_state_dict(state_dict)

    def _no_fp16_wrapper(self, what):
        raise _C.NotSupportedError(
            f"smp.DistributedOptimizer.{what} is not supported: it belongs to smp v1's fp16 "
            "optimizer wrapper, which "
            "smp does not have; train in fp16 with torch.autocast and smp.amp.GradScaler "
            "(its state_dict() holds the loss scale) and clip with torch.nn.utils.clip_grad_norm_")

    def local_fp16_state_dict(self):
        self._no_fp16_wrapper("local_fp16_state_dict")

    def load_local_fp16_state_dict(self, fp16_states):
        self._no_fp16_wrapper("load_local_fp16_state_dict")

    def clip_master_grads(self, grad_clip):
        self._no_fp16_wrapper("clip_master_grads")

    def _fit(self, name, key, value, param, partial):
        """The part of saved state tensor `value` that belongs to this rank's
        `param`: as is when the shapes agree, else sliced from a full tensor."""
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape == param.shape:
            return value
        spec = self._smp_model.param_spec(name)
        split = spec["split_dim"]
        if not partial and split is not None and tuple(value.shape) == tuple(spec["global_shape"]):
            total = value.shape[split]
            tp, r = _C.tp_size(), _C.tp_rank()
            base, rem = divmod(total, tp)
            size = base + (1 if r < rem else 0)
            offset = r * base + min(r, rem)
            return value.narrow(split, offset, size).clone()
        raise _C.ConfigError(
            f"smp.DistributedOptimizer.load_state_dict: state '{key}' of parameter '{name}' has "
            f"shape {tuple(value.shape)} but the parameter on this rank (tp_rank {_C.tp_rank()} of "
            f"{_C.tp_size()}) has {tuple(param.shape)}; a partial optimizer state dict loads only "
            "on the layout it was saved on: save a full one with state_dict() to change it")


def _wrap(optimizer, static_loss_scale=1.0, dynamic_loss_scale=False, dynamic_loss_args=None,
          model=None, **kwargs):
    if kwargs:
        raise TypeError(
            f"smp.DistributedOptimizer() got unexpected keyword arguments {sorted(kwargs)}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise _C.ConfigError(
            f"smp.DistributedOptimizer expects a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}")
    model = model if model is not None else _state.current_model()
    if model is None:
        raise _C.StateError(
            "smp.DistributedOptimizer needs the model: create smp.DistributedModel(...) "
            "first and build the optimizer over its parameters")
    names = {id(p): n for n, p in model.get_module().named_parameters()}
    seen = {}
    params, param_names = [], []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            name = names.get(id(p))
            if name is None:
                raise _C.ConfigError(
                    f"smp.DistributedOptimizer: param_groups[{gi}]['params'][{pi}] (shape "
                    f"{tuple(p.shape)}) is not a parameter of the DistributedModel on rank "
                    f"{_C.rank()}; build the optimizer from model.parameters() after "
                    "smp.DistributedModel(...) (tensor parallelism replaces modules)")
            if id(p) in seen:
                g0, p0 = seen[id(p)]
                raise _C.ConfigError(
                    f"smp.DistributedOptimizer: parameter '{name}' appears more than once in "
                    f"the optimizer's parameters (param_groups[{g0}]['params'][{p0}] and "
                    f"param_groups[{gi}]['params'][{pi}]); optimizer state of duplicated "
                    "parameters cannot be saved and loaded. Pass each parameter once:\n"
                    + _DEDUP_RECIPE)
            seen[id(p)] = (gi, pi)
            params.append(p)
            param_names.append(name)
    sharded = bool(_C.config()["shard_optimizer_state"])
    # Ownership follows the model's parameter order, not the optimizer's, so
    # that it does not depend on how the optimizer lists its parameters.
    by_name = dict(zip(param_names, params))
    canonical = [by_name[n] for n in model._param_names if n in by_name]
    if sharded:
        owner = _C.partition_params([p.numel() for p in canonical], _C.rdp_size())
        owner_of = {id(p): o for p, o in zip(canonical, owner)}
        # Parameters of other pipeline stages never get gradients here;
        # they count as this rank's (nothing to step, nothing to broadcast).
        owners = [owner_of.get(id(p), _C.rdp_rank()) for p in params]
    else:
        owners = [_C.rdp_rank()] * len(params)
    if not isinstance(optimizer, DistributedOptimizer):
        optimizer.__class__ = _distributed_class(type(optimizer))
    optimizer._smp_model = model
    optimizer._smp_params = params
    optimizer._smp_names = param_names
    optimizer._smp_sharded = sharded
    optimizer._smp_owned = [o == _C.rdp_rank() for o in owners]
    optimizer._smp_canonical = canonical
    optimizer._smp_canonical_owner = list(owner) if sharded else []
    optimizer._smp_loss_scaling = (static_loss_scale, dynamic_loss_scale, dynamic_loss_args)
    _state._set_optimizer(optimizer)
    return optimizer


def _state_by_position(by_name, group_names):
    """{position: state} for the parameter names of each group (in order)."""
    state, index = {}, 0
    for names in group_names:
        for n in names:
            if n in by_name:
                state[index] = by_name[n]
            index += 1
    return state


def _by_name(sd):
    """{parameter name: state} of a state dict carrying _smp_param_names."""
    out = {}
    for group, names in zip(sd["param_groups"], sd["_smp_param_names"]):
        for i, n in zip(group["params"], names):
            if i in sd["state"]:
                out[n] = sd["state"][i]
    return out


def _merge_tp(parts):
    """Merges (by_name, group_names, specs) of every TP rank (tp order) into full
    state: state tensors of split parameters shaped like the local parameter are
    concatenated along the split dimension; others are taken from the first
    rank that has them."""
    group_names = [list(g) for g in parts[0][1]]
    for _, names, _ in parts[1:]:
        for g, ns in enumerate(names):
            for n in ns:
                if n not in group_names[g]:
                    group_names[g].append(n)
    specs = {}
    for _, _, s in parts:
        for n, v in s.items():
            specs.setdefault(n, v)
    state = {}
    for n, spec in specs.items():
        holders = [p[0][n] for p in parts if n in p[0]]
        if not holders:
            continue
        split = spec["split_dim"]
        if split is None or len(holders) == 1:
            state[n] = holders[0]
            continue
        merged = {}
        for k, v in holders[0].items():
            if torch.is_tensor(v) and v.dim() > 0 and v.dim() == len(spec["global_shape"]):
                merged[k] = torch.cat([h[k] for h in holders], dim=split)
            else:
                merged[k] = v
        state[n] = merged
    return state, group_names, specs
