"""Module-level pipeline: nn.Module subtrees on stages and cross-stage module
calls (smp v1's approach), for models whose forward is not a chain that
torch.fx can trace (Hugging Face GPT-2, BERT, Python control flow, keyword
inputs, children called more than once). See docs/pipeline.md.

Placement (``ModulePlan``): the root module's forward and every module not in a
placed subtree (the "skeleton") run on pipeline stage 0, the driver. Subtrees
("units") are placed on stages; a unit on stage s > 0 runs entirely there (all
its submodules, parameters and buffers live on s).

- automatic (auto_partition): units start as the root's children; containers
  that are never called (ModuleList, ModuleDict) are always replaced by their
  children, and the heaviest unit is replaced by its children while it holds
  more than 1/pp_size of the parameters. The units, in registration order, are
  then split into pp_size contiguous runs balanced by parameter count
  (smp.pipeline.partition.balanced_split). Units sharing a parameter (tied
  embeddings: GPT-2's wte and lm_head) all go to the stage of the first one:
  a tied parameter has one owner, one gradient and one copy in checkpoints.
- manual (auto_partition False): a module's stage is its own
  smp.partition/set_partition mark, else its parent's; the root's children
  default to the root's mark, else default_partition. A module on stage s > 0
  must have all its submodules on s.

Execution (``run_step``): stage 0, the driver, runs the step function for
each microbatch and each microbatch's backward in the order of smp config
``pipeline``, taken from the C++ schedule builder seen as one stage
(smp._C.pipeline.build_schedule(1, 0, microbatches, pipeline, ...)):
"simple" runs every microbatch's forward, then every backward (smp v1's
simple pipeline: the activations of all microbatches are alive at once, on
every stage); "interleaved" (the default) runs each microbatch's backward
right after its forward, so that at most one microbatch's activations are
alive on any stage. A call of a module placed on stage s > 0
(``module(*args, **kwargs)``, any nested arguments: tensors, tuples, lists,
dicts, ModelOutput mappings, dataclasses, None, Python scalars) sends the
pickled arguments, with the tensors, to stage s, which runs the module and
sends the outputs back; autograd connects them (``_RemoteCall``): backward
through a remote call sends the output gradients to s, which back-propagates
through its saved graph and returns the input gradients. Remote calls are
synchronous, so one stage computes at a time whichever the schedule: the
schedules differ in activation memory, not in overlap (docs/pipeline.md).
Stages other than 0 serve calls until stage 0 ends the step; then the step's
results are broadcast from stage 0 over PP_GROUP. Gradient averaging over RDP
runs at the end of the step (GradReducer.finish).

Limitations: objects that a remote module mutates in place (a Hugging Face
KV cache: build the model with use_cache=False for training) do not travel
back; a parent forward that reads a remote child's parameters directly
(``self.child.weight``) sees an empty tensor; only stage 0 calls across
stages (a unit never calls back into another stage).

Mode choice (``use_module_pipeline``): environment variable
SMP_PIPELINE_MODE = "auto" (default: fx chain when the forward traces as a
chain, module-level otherwise), "module" or "fx".
"""

import io
import os
import pickle

import torch

from smp import _C, _objects
from smp._C import CommGroup, RankType
from smp.pipeline import engine
from smp.pipeline.partition import balanced_split, get_partition, trace_chain

_MODE_ENV = "SMP_PIPELINE_MODE"
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)
_SKELETON_ONLY = (torch.nn.ParameterList, torch.nn.ParameterDict)


def pipeline_mode():
    mode = os.environ.get(_MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "module", "fx"):
        raise _C.ConfigError(
            f"{_MODE_ENV}={mode!r}: use 'auto' (fx chain when the model "
            "traces as a chain, module-level otherwise), 'module' or 'fx'")
    return mode


def use_module_pipeline(module):
    """Whether ``module`` runs on the module-level pipeline (see module docstring)."""
    mode = pipeline_mode()
    if mode == "module":
        return True
    if mode == "fx":
        return False
    try:
        trace_chain(module)
    except _C.NotSupportedError:
        return True
    return False


# ---- placement ---------------------------------------------------------------


def _own_params(m):
    return list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))


def _sizes(m):
    """(key, size) of every parameter under ``m``. A tensor-parallel module's
    parameters count with their full shapes (its ``_smp_full_param_names``),
    so that every tp rank computes the same placement from its own shards."""
    out = []

    def visit(mod):
        full = getattr(mod, "_smp_full_param_names", None)
        if callable(full) and callable(getattr(mod, "_smp_shard_specs", None)):
            names = full()
            if isinstance(names, dict):
                for name, info in names.items():
                    size = 1
                    for d in info["global_shape"]:
                        size *= int(d)
                    out.append(((id(mod), name), size))
                return
        for p in mod.parameters(recurse=False):
            out.append((id(p), p.numel()))
        for child in mod.children():
            visit(child)

    visit(m)
    return out


def _numel(m):
    """Parameters under ``m`` (full sizes, a tied parameter once)."""
    return sum(dict(_sizes(m)).values())


def _weight(m, counted):
    """Parameters of ``m`` not counted yet (a tied parameter counts once)."""
    total = 0
    for key, size in _sizes(m):
        if key not in counted:
            counted.add(key)
            total += size
    return total


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _auto_units(root, num_stages):
    total = _numel(root)
    units = [(n, c) for n, c in root.named_children()]

    def expand(i):
        name, m = units[i]
        units[i:i + 1] = [(_join(name, n), c) for n, c in m.named_children()]

    changed = True
    while changed:
        changed = False
        for i, (_, m) in enumerate(units):
            if isinstance(m, _CONTAINERS):
                expand(i)
                changed = True
                break
        if changed:
            continue
        weights = [_numel(m) for _, m in units]
        order = sorted(range(len(units)), key=lambda i: -weights[i])
        for i in order:
            m = units[i][1]
            if weights[i] * num_stages > total and next(m.children(), None) is not None:
                expand(i)
                changed = True
            break
    units = [(n, m) for n, m in units if not isinstance(m, _SKELETON_ONLY)]
    if len(units) < num_stages:
        raise _C.ConfigError(
            f"module-level pipeline partitioning: {type(root).__name__} has only "
            f"{len(units)} placeable submodule(s) ({[n for n, _ in units]}) for "
            f"pipeline_parallel_degree {num_stages}; use a smaller pipeline_parallel_degree")
    counted = set(id(p) for p in root.parameters(recurse=False))
    weights = [_weight(m, counted) for _, m in units]
    stages = balanced_split(weights, num_stages)
    return [(n, m, s) for (n, m), s in zip(units, stages)]


def _manual_units(root, num_stages, default):
    base = get_partition(root)
    if base is None:
        base = default
    if not 0 <= base < num_stages:
        raise _C.ConfigError(
            f"default_partition (or the root module's smp.set_partition) is {base}; it must be "
            f"in 0..{num_stages - 1} (pipeline_parallel_degree {num_stages})")
    units = []

    def visit(prefix, m, parent_stage):
        own = get_partition(m)
        stage = parent_stage if own is None else own
        if not 0 <= stage < num_stages:
            raise _C.ConfigError(
                f"module '{prefix}' was placed on stage {stage}, but pipeline_parallel_degree "
                f"is {num_stages}; use a stage in 0..{num_stages - 1}")
        if stage != 0 and not isinstance(m, _SKELETON_ONLY):
            for sub_name, sub in m.named_modules():
                s = get_partition(sub)
                if s is not None and s != stage:
                    raise _C.NotSupportedError(
                        f"manual partitioning: module '{_join(prefix, sub_name)}' was given "
                        f"stage {s} but it is inside '{prefix}' on stage {stage}; with the "
                        "module-level pipeline a module on a stage > 0 runs there whole: give "
                        "its submodules the same stage")
            units.append((prefix, m, stage))
            return
        for n, c in m.named_children():
            visit(_join(prefix, n), c, stage)

    for n, c in root.named_children():
        visit(n, c, base)
    return units


def _tie_units(units):
    """Units sharing a parameter or buffer go to the stage of the first."""
    owner = {}
    out = []
    for name, m, stage in units:
        for t in list(m.parameters()) + list(m.buffers()):
            first = owner.get(id(t))
            if first is not None:
                stage = first[1]
        for t in list(m.parameters()) + list(m.buffers()):
            owner.setdefault(id(t), (name, stage))
        out.append((name, m, stage))
    return out


class ModulePlan:
    """Stage of every module, parameter and buffer name (see module docstring)."""

    def __init__(self, root, num_stages, auto_partition=True, default_partition=0):
        if auto_partition:
            units = _tie_units(_auto_units(root, num_stages))
        else:
            units = _manual_units(root, num_stages, default_partition)
        self.units = units
        self.num_stages = num_stages
        self._stage = {n: s for n, _, s in units}
        if not auto_partition:
            self._check_ties(root)

    def _check_ties(self, root):
        uses = {}
        for name, t in list(root.named_parameters(remove_duplicate=False)) + \
                list(root.named_buffers(remove_duplicate=False)):
            uses.setdefault(id(t), []).append((name, self.stage_of(name)))
        for names in uses.values():
            stages = sorted({s for _, s in names})
            if len(stages) > 1:
                raise _C.NotSupportedError(
                    f"manual partitioning: the tied parameter {[n for n, _ in names]} is used "
                    f"on stages {stages}; a tied parameter has one owner: place the modules "
                    "sharing it on the same stage (smp.set_partition)")

    def stage_of(self, name):
        """Stage of the module, parameter or buffer ``name`` (0 for the skeleton)."""
        best, stage = -1, 0
        for unit, s in self._stage.items():
            if (name == unit or name.startswith(unit + ".")) and len(unit) > best:
                best, stage = len(unit), s
        return stage

    def assignment(self):
        return {n: s for n, _, s in self.units}


# ---- transport -------------------------------------------------------------


class _Pickler(pickle.Pickler):
    """Pickles a call's arguments or results with each tensor replaced by its
    index in ``tensors`` (the same tensor object once)."""

    def __init__(self, buf):
        super().__init__(buf, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = []
        self._index = {}

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            key = id(obj)
            if key not in self._index:
                self._index[key] = len(self.tensors)
                self.tensors.append(obj)
            return ("smp_tensor", self._index[key])
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, tensors):
        super().__init__(io.BytesIO(data))
        self._tensors = tensors

    def persistent_load(self, pid):
        return self._tensors[pid[1]]


def _flatten(value):
    buf = io.BytesIO()
    p = _Pickler(buf)
    try:
        p.dump(value)
    except Exception as e:
        raise _C.NotSupportedError(
            f"module-level pipeline (rank {_C.rank()}): a cross-stage module call's arguments "
            f"or results cannot be pickled ({type(e).__name__}: {e}); pass tensors, "
            "containers and picklable Python values") from None
    return buf.getvalue(), p.tensors


def _unflatten(data, tensors):
    return _Unpickler(data, tensors).load()


def _wire(tensors):
    """Tensors as they travel: detached compact CPU copies."""
    return [None if t is None else t.detach().to("cpu", copy=True).contiguous()
            for t in tensors]


def _send(msg, peer):

    _objects.send(msg, peer, RankType.PP_RANK)


def _recv(peer):

    return _objects.recv_from(peer, RankType.PP_RANK)


# ---- the driver side (stage 0) -----------------------------------------------


class _Call:
    """One cross-stage call's bookkeeping (passed through _RemoteCall)."""

    def __init__(self, runner, unit, stage, skeleton, device):
        self.runner = runner
        self.unit = unit
        self.stage = stage
        self.skeleton = skeleton
        self.device = device
        self.call_id = None
        self.out_skeleton = None
        self.input_grad_mask = None


class _RemoteCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, _anchor, *tensors):
        call.input_grad_mask = [t.is_floating_point() and t.requires_grad for t in tensors]
        outs, skel = call.runner.forward_request(call, tensors, True, call.input_grad_mask)
        call.out_skeleton = skel
        ctx.call = call
        ctx.num_inputs = len(tensors)
        nondiff = [t for t in outs if not (t.is_floating_point() or t.is_complex())]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        grads_in = call.runner.backward_request(call, grads)
        return (None, None) + tuple(grads_in)


class Runner:
    """One step of the module-level pipeline on this rank."""

    def __init__(self, pipe, num_microbatches):
        self.pipe = pipe
        self.n = num_microbatches
        self.next_id = 0
        self.microbatch = None
        self.calls = 0

    def remote(self, unit, stage, args, kwargs):
        data, tensors = _flatten((args, kwargs))
        device = self.pipe.device()
        call = _Call(self, unit, stage, data, device)
        if torch.is_grad_enabled():
            anchor = torch.empty(0, requires_grad=True)
            outs = _RemoteCall.apply(call, anchor, *tensors)
        else:
            outs, call.out_skeleton = self.forward_request(call, tensors, False,
                                                           [False] * len(tensors))
        return _unflatten(call.out_skeleton, list(outs))

    def forward_request(self, call, tensors, grad, mask):
        call.call_id = self.next_id
        self.next_id += 1
        self.calls += 1
        _send({"op": "fwd", "id": call.call_id, "unit": call.unit, "mb": self.microbatch,
               "grad": grad, "args": call.skeleton, "tensors": _wire(tensors),
               "requires_grad": mask}, call.stage)
        reply = _recv(call.stage)
        self._check(reply, call)
        outs = [t.to(call.device) for t in reply["tensors"]]
        return outs, reply["out"]

    def backward_request(self, call, grads):
        _send({"op": "bwd", "id": call.call_id, "grads": _wire(grads)}, call.stage)
        reply = _recv(call.stage)
        self._check(reply, call)
        return [None if g is None else g.to(call.device) for g in reply["grads"]]

    @staticmethod
    def _check(reply, call):
        if reply.get("op") == "error":
            raise _C.NotSupportedError(
                f"module-level pipeline: the call of module '{call.unit}' on pipeline stage "
                f"{call.stage} failed there: {reply['error']}")


# ---- the pipeline module -------------------------------------------------------


class ModulePipeline:
    """Stage runner of smp.DistributedModel for the module-level pipeline."""

    def __init__(self, module):
        cfg = _C.config()
        self.module = module
        self.num_stages = _C.pp_size()
        self.stage = _C.pp_rank()
        self.plan = ModulePlan(module, self.num_stages, bool(cfg["auto_partition"]),
                               int(cfg["default_partition"]))
        self.units = {n: (m, s) for n, m, s in self.plan.units}
        self.runner = None
        self._stubs = []
        if self.stage == 0:
            for name, (m, s) in self.units.items():
                if s != 0:
                    self._install_stub(name, m, s)

    def _install_stub(self, name, m, stage):
        pipe = self

        def forward(*args, **kwargs):
            runner = pipe.runner
            if runner is None:
                raise _C.StateError(
                    f"module '{name}' (pipeline stage {stage}) was called outside smp.step on "
                    f"rank {_C.rank()} with pipeline_parallel_degree {_C.pp_size()}: call the "
                    "model inside a function decorated with @smp.step")
            return runner.remote(name, stage, args, kwargs)

        object.__setattr__(m, "forward", forward)
        self._stubs.append(m)

    # -- what DistributedModel asks ----------------------------------------

    def is_local_name(self, name):
        return self.plan.stage_of(name) == self.stage

    def stage_assignment(self):
        return self.plan.assignment()

    def device(self):
        for n, p in self.module.named_parameters():
            if self.is_local_name(n) and p.numel():
                return p.device
        return torch.device("cpu")

    def release_other_stages(self):
        keep = set()
        for n, t in list(self.module.named_parameters(remove_duplicate=False)) + \
                list(self.module.named_buffers(remove_duplicate=False)):
            if self.is_local_name(n):
                keep.add(id(t))
        with torch.no_grad():
            for n, t in list(self.module.named_parameters(remove_duplicate=False)) + \
                    list(self.module.named_buffers(remove_duplicate=False)):
                if id(t) in keep or t.numel() == 0:
                    continue
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
                if isinstance(t, torch.nn.Parameter):
                    t.grad = None

    def __call__(self, *args, **kwargs):
        if self.stage != 0:
            raise _C.StateError(
                f"module-level pipeline: the model was called on pipeline stage {self.stage} "
                f"(rank {_C.rank()}); only stage 0 runs the model's forward")
        if self.runner is None:
            raise _C.StateError(
                f"the model was called outside smp.step on rank {_C.rank()} with "
                f"pipeline_parallel_degree {_C.pp_size()}: call it inside a function decorated "
                "with @smp.step")
        return self.module(*args, **kwargs)

    # -- serving (stages > 0) ----------------------------------------------

    def serve(self):
        """Serves stage 0's calls until it ends the step; returns its end message."""
        saved = {}
        device = self.device()
        self.max_live = 0   # most microbatches with saved calls at once (step statistics)
        while True:
            msg = _recv(0)
            op = msg["op"]
            if op == "end":
                return msg
            try:
                if op == "fwd":
                    self._serve_forward(msg, saved, device)
                elif op == "bwd":
                    self._serve_backward(msg, saved, device)
                else:
                    raise _C.StateError(f"unknown request {op!r}")
            except Exception as e:  # reported to stage 0, which raises
                saved.pop(msg.get("id"), None)
                _send({"op": "error", "error": f"rank {_C.rank()}: {type(e).__name__}: {e}"}, 0)

    def _serve_forward(self, msg, saved, device):
        module, _ = self.units[msg["unit"]]
        tensors = []
        for t, rg in zip(msg["tensors"], msg["requires_grad"]):
            t = t.to(device)
            if rg and msg["grad"]:
                t.requires_grad_(True)
            tensors.append(t)
        args, kwargs = _unflatten(msg["args"], tensors)
        with torch.set_grad_enabled(msg["grad"]):
            out = module(*args, **kwargs)
        data, outs = _flatten(out)
        if msg["grad"]:
            saved[msg["id"]] = (tensors, outs, msg["mb"])
            live = {mb for _, _, mb in saved.values()}
            self.max_live = max(self.max_live, len(live))
        _send({"op": "out", "out": data, "tensors": _wire(outs)}, 0)

    def _serve_backward(self, msg, saved, device):
        inputs, outs, _ = saved.pop(msg["id"])
        pairs = [(o, g.to(device)) for o, g in zip(outs, msg["grads"])
                 if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [t.grad if t.requires_grad else None for t in inputs]
        _send({"op": "grads", "grads": _wire(grads)}, 0)


# ---- the step ----------------------------------------------------------------


def schedule_actions(num_microbatches):
    """The driver's (kind, microbatch) actions for smp config ``pipeline``:
    the C++ schedule of a one-stage pipeline (see the module docstring)."""
    cfg = _C.config()
    return [(k, mb) for k, mb in _C.pipeline.build_schedule(
        1, 0, num_microbatches, cfg["pipeline"], int(cfg["active_microbatches"]))
        if k in ("Forward", "Backward")]


def run_step(fn, model, pieces, prepare=None):
    """smp.step on the module-level pipeline (see module docstring)."""
    engine._call_hook(model, "_smp_begin_step")
    pipe = model._pipe
    n = len(pieces)
    stage = _C.pp_rank()
    schedule = "module-" + str(_C.config()["pipeline"])
    engine._call_hook(model, "_smp_begin_microbatch_backward", False)
    if stage != 0:
        engine._last_stats = {"max_live_microbatches": 0, "schedule": schedule}
        try:
            end = pipe.serve()
        finally:
            engine._last_stats["max_live_microbatches"] = pipe.max_live
        if end.get("error"):
            raise _C.StateError(
                f"module-level pipeline: the step failed on pipeline stage 0: {end['error']} "
                f"(rank {_C.rank()}, stage {stage} stops too)")
        if end["backward"]:
            engine._call_hook(model, "_smp_finish_gradients")
        results = _objects.recv_from(0, RankType.PP_RANK)
        engine._call_hook(model, "_smp_end_step")
        return results

    ctx = engine.StepContext(model, n, 0, 1)  # the driver is "the last stage" for losses
    ctx.device = pipe.device()
    runner = Runner(pipe, n)
    actions = schedule_actions(n)
    ran_backward = False
    error = None
    prev = engine._current
    engine._current = ctx
    pipe.runner = runner
    live = set()
    try:
        for kind, mb in actions:
            if kind == "Forward":
                ctx.microbatch = mb
                runner.microbatch = mb
                live.add(mb)
                ctx.max_live = max(ctx.max_live, len(live))
                args, kwargs = pieces[mb]
                ctx.results[mb] = fn(*args, **kwargs)
                ctx.microbatch = None
            else:
                runner.microbatch = mb
                engine._call_hook(model, "_smp_begin_microbatch_backward", False)
                ran_backward |= engine._backward(ctx, mb)
                live.discard(mb)
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        pipe.runner = None
        engine._current = prev
        engine._last_stats = {"max_live_microbatches": ctx.max_live, "schedule": schedule,
                              "actions": actions, "remote_calls": runner.calls}
        for s in range(1, _C.pp_size()):
            _send({"op": "end", "backward": ran_backward and error is None, "error": error}, s)
    if ran_backward:
        engine._call_hook(model, "_smp_finish_gradients")
    results = [ctx.results[mb] for mb in range(n)]
    if prepare is not None:
        results = [prepare(r) for r in results]
    _objects.broadcast(results, CommGroup.PP_GROUP)
    engine._call_hook(model, "_smp_end_step")
    return results
