"""Runs one smp.step on this pipeline stage: the schedule's actions (from the
C++ engine, smp._C.pipeline.build_schedule) over the microbatches.

Actions and what they do here:
- Forward(mb): runs the step function on microbatch mb. The model's forward
  (``stage_forward``) runs this stage's modules: stage 0 on the model's input,
  other stages on the activation received from stage - 1. On a stage other
  than the last, the step function stops at the model call (``_StageExit``);
  on the last stage it runs to the end and its return value is mb's result.
  ``model.backward(loss)`` only records the loss (``StepContext.record_backward``).
- Backward(mb): the last stage back-propagates ``loss / microbatches``; other
  stages back-propagate their output with the gradient received from stage + 1.
  Then mb's saved activations are dropped.
- Send/RecvActivation, Send/RecvGrad: a 10-element int64 header (present,
  dtype, ndim, dims), then the tensor, with smp.comm send/recv over PP_RANK. An
  absent gradient (the last stage did not call model.backward, e.g. evaluation)
  travels as a header only, and the stages before skip that backward.

Hook API for a model wrapper (smp.DistributedModel), all optional, looked up
on the step function's first argument:
- ``model._smp_begin_step()``: first thing of every step, before the schedule
  (DistributedModel partitions there on the first step and runs its
  post-partition hooks).
- ``model._smp_end_step()``: last thing of every step, after the results were
  shared (DistributedModel runs its post-step hooks after the first step).
- ``model.average_grads_across_microbatches``: False makes the last stage
  back-propagate the loss itself instead of ``loss / microbatches``.
- ``model._smp_begin_microbatch_backward(is_last)``: called on every stage
  before each microbatch's backward; ``is_last`` is True for the stage's final
  backward of the step (gradient-averaging hooks should fire only then).
- ``model._smp_finish_gradients()``: called once per step after the final
  microbatch backward of the stage, if any backward ran; the wrapper completes
  its gradient averaging there.
- ``current_step()``: the StepContext while a step runs (None otherwise); a
  wrapper's ``backward(loss)`` must call ``current_step().record_backward(loss,
  grad_tensors)`` when it is not None, and its forward must call
  ``stage_forward(plan, args, kwargs)`` when pp_size() > 1.
"""

import collections.abc

import torch

from smp import _C, _objects, comm
from smp._C import CommGroup, RankType

_current = None
_last_stats = {}

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_HEADER = 10
_MAX_DIMS = _HEADER - 3


class _StageExit(BaseException):
    """Ends the step function on a stage other than the last once the model's
    forward for the microbatch is done (a BaseException so that the user's
    ``except Exception`` does not catch it)."""


def current_step():
    """The StepContext of the running smp.step, or None."""
    return _current


def last_step_stats():
    """Statistics of this process's last step: {"max_live_microbatches": most
    microbatches whose activations were alive at once on this stage,
    "schedule": the action list}."""
    return dict(_last_stats)


class StepContext:
    """State of one smp.step on this stage."""

    def __init__(self, model, num_microbatches, stage, num_stages):
        self.model = model
        self.num_microbatches = num_microbatches
        self.stage = stage
        self.num_stages = num_stages
        self.microbatch = None
        self.losses = {}      # mb -> (tensor, grad_tensors), last stage
        self.saved = {}       # mb -> {"input": ..., "output": ...}: live activations
        self.received = {}    # mb -> input activation from stage - 1
        self.grads_out = {}   # mb -> gradient of the output, from stage + 1
        self.grads_in = {}    # mb -> gradient of the input, for stage - 1
        self.results = {}
        self.max_live = 0
        self.device = None

    @property
    def is_last_stage(self):
        return self.stage == self.num_stages - 1

    def record_backward(self, tensor, grad_tensors=None):
        """model.backward(loss) inside a step: the backward of loss / microbatches
        runs at this microbatch's Backward action."""
        mb = self.microbatch
        if mb is None:
            raise _C.StateError("model.backward inside smp.step but outside a microbatch")
        if mb in self.losses:
            raise _C.StateError(
                f"model.backward called twice for microbatch {mb} (rank {_C.rank()}, stage "
                f"{self.stage}); call it once per step function call, on the total loss")
        if not self.is_last_stage:
            raise _C.StateError(
                f"model.backward reached on pipeline stage {self.stage} (rank {_C.rank()}), "
                "which is not the last: the step function must call the model before "
                "model.backward")
        self.losses[mb] = (tensor, grad_tensors)


def _stage_device(model):
    fn = getattr(model, "_smp_stage_device", None)
    if fn is not None:
        return fn()
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _send_tensor(t, peer, what):
    header = torch.zeros(_HEADER, dtype=torch.int64)
    if t is not None:
        if not isinstance(t, torch.Tensor):
            raise _C.NotSupportedError(
                f"pipeline stage {_C.pp_rank()} (rank {_C.rank()}): the {what} sent to stage "
                f"{peer} is a {type(t).__name__}; stages of a chain pass exactly one tensor")
        if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
            raise _C.NotSupportedError(
                f"pipeline stage {_C.pp_rank()}: the {what} has dtype {t.dtype} and "
                f"{t.dim()} dims; supported: {_MAX_DIMS} dims at most, dtypes {_DTYPES}")
        header[0] = 1
        header[1] = _DTYPES.index(t.dtype)
        header[2] = t.dim()
        for i, d in enumerate(t.shape):
            header[3 + i] = d
    _C.send(header, peer, RankType.PP_RANK, None)
    if t is not None:
        _C.send(t.detach().contiguous(), peer, RankType.PP_RANK, None)


def _recv_tensor(peer, device):
    header = torch.zeros(_HEADER, dtype=torch.int64)
    _C.recv(header, peer, RankType.PP_RANK, None)
    if int(header[0]) == 0:
        return None
    ndim = int(header[2])
    shape = [int(header[3 + i]) for i in range(ndim)]
    t = torch.empty(shape, dtype=_DTYPES[int(header[1])], device=device)
    _C.recv(t, peer, RankType.PP_RANK, None)
    return t


def stage_forward(run_stage, args, kwargs):
    """The model's forward inside a step with pp_size() > 1. ``run_stage(x)``
    runs this stage's modules on x. Returns the model's output on the last
    stage; on the others it saves the output and ends the step function."""
    ctx = _current
    if ctx is None:
        raise _C.StateError(
            f"the model was called outside smp.step on rank {_C.rank()} with "
            f"pipeline_parallel_degree {_C.pp_size()}: call it inside a function decorated "
            "with @smp.step")
    mb = ctx.microbatch
    slot = ctx.saved.setdefault(mb, {})
    if "input" in slot:
        raise _C.NotSupportedError(
            f"the model was called twice for microbatch {mb} (rank {_C.rank()}, stage "
            f"{ctx.stage}); with pipeline parallelism the step function calls the model once")
    if ctx.stage == 0:
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise _C.NotSupportedError(
                f"pipeline stage 0 (rank {_C.rank()}): a pipelined model takes exactly one "
                f"tensor argument, got {len(args)} positional and keyword(s) {sorted(kwargs)}; "
                "pack the inputs into one tensor or use pipeline_parallel_degree 1")
        x = args[0]
    else:
        x = ctx.received.pop(mb)
    slot["input"] = x
    y = run_stage(x)
    if ctx.is_last_stage:
        return y
    slot["output"] = y
    raise _StageExit()


_SHARED_DTYPES = frozenset(_DTYPES)


class _Slot:
    """Where tensor ``index`` of a shared step result goes back in."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


def _extract(value, tensors):
    """``value`` with every tensor inside dicts (any mapping becomes a dict),
    lists and tuples replaced by a _Slot; the tensors are appended to
    ``tensors``. Tensors of a dtype the communicators do not carry stay in
    place (they travel pickled)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _SHARED_DTYPES or value.is_sparse:
            return value.detach()
        tensors.append(value.detach())
        return _Slot(len(tensors) - 1)
    if isinstance(value, (list, tuple)):
        items = [_extract(v, tensors) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*items)
        return type(value)(items) if type(value) in (list, tuple) else list(items)
    if isinstance(value, collections.abc.Mapping):
        return {k: _extract(v, tensors) for k, v in value.items()}
    return value


def _insert(value, tensors):
    if isinstance(value, _Slot):
        return tensors[value.index]
    if isinstance(value, (list, tuple)):
        items = [_insert(v, tensors) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, dict):
        return {k: _insert(v, tensors) for k, v in value.items()}
    return value


def share_results(results):
    """The last pipeline stage's per-microbatch step results on every stage of
    this pipeline (PP_GROUP). Collective: every stage calls it once per step,
    the last stage with ``results``, the others with None. The structure and
    the Python values travel pickled (one object broadcast); the tensors
    travel as one flat buffer per (dtype, device kind) with smp.comm.broadcast
    (MPI or gloo for CPU tensors, NCCL for CUDA ones). CUDA tensors arrive on
    the receiver's current CUDA device. The last stage keeps its own objects."""
    last = _C.pp_size() - 1
    if _C.pp_rank() == last:
        tensors = []
        skeleton = _extract(results, tensors)
        groups = {}
        layout = []
        for i, t in enumerate(tensors):
            key = (t.dtype, t.device.type == "cuda")
            groups.setdefault(key, []).append(i)
            layout.append((key, tuple(t.shape)))
        order = list(groups)
        _objects.broadcast((skeleton, layout, order), CommGroup.PP_GROUP)
        for key in order:
            flat = torch.cat([tensors[i].reshape(-1) for i in groups[key]])
            comm.broadcast(flat, last, CommGroup.PP_GROUP)
        return results
    skeleton, layout, order = _objects.recv_from(last, RankType.PP_RANK)
    tensors = [None] * len(layout)
    for key in order:
        dtype, is_cuda = key
        members = [i for i, (k, _) in enumerate(layout) if k == key]
        sizes = [_numel(layout[i][1]) for i in members]
        device = torch.device("cuda", torch.cuda.current_device()) if is_cuda else "cpu"
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        comm.broadcast(flat, last, CommGroup.PP_GROUP)
        for i, piece in zip(members, torch.split(flat, sizes)):
            tensors[i] = piece.view(layout[i][1])
    return _insert(skeleton, tensors)


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _call_hook(model, name, *args):
    fn = getattr(model, name, None)
    if fn is not None:
        fn(*args)


def run_step(fn, model, pieces, prepare=None):
    """Runs ``fn`` over the microbatch argument lists ``pieces`` following this
    stage's schedule; returns the per-microbatch results on every stage (the
    last stage's, after ``prepare(result)`` when given, shared over PP_GROUP
    with share_results)."""
    global _current, _last_stats

    _call_hook(model, "_smp_begin_step")
    n = len(pieces)
    stages, stage = _C.pp_size(), _C.pp_rank()
    cfg = _C.config()
    actions = _C.pipeline.build_schedule(stages, stage, n, cfg["pipeline"],
                                         int(cfg["active_microbatches"]))
    last_backward = max(i for i, (k, _) in enumerate(actions) if k == "Backward")
    ctx = StepContext(model, n, stage, stages)
    ctx.device = _stage_device(model)
    ran_backward = False
    _current = ctx
    try:
        for index, (kind, mb) in enumerate(actions):
            if kind == "Forward":
                ctx.microbatch = mb
                ctx.saved.setdefault(mb, {})
                ctx.max_live = max(ctx.max_live, len(ctx.saved))
                args, kwargs = pieces[mb]
                try:
                    result = fn(*args, **kwargs)
                except _StageExit:
                    result = _StageExit
                if ctx.is_last_stage:
                    ctx.results[mb] = result
                elif result is not _StageExit:
                    raise _C.NotSupportedError(
                        f"the step function '{fn.__name__}' returned without calling the model "
                        f"on pipeline stage {stage} (rank {_C.rank()}, microbatch {mb}); every "
                        "microbatch must call the model once")
                ctx.microbatch = None
            elif kind == "Backward":
                _call_hook(model, "_smp_begin_microbatch_backward", index == last_backward)
                ran_backward |= _backward(ctx, mb)
                ctx.saved.pop(mb, None)
            elif kind == "SendActivation":
                _send_tensor(ctx.saved[mb]["output"], stage + 1, "activation")
            elif kind == "RecvActivation":
                x = _recv_tensor(stage - 1, ctx.device)
                if x.is_floating_point():
                    x.requires_grad_(True)
                ctx.received[mb] = x
            elif kind == "RecvGrad":
                ctx.grads_out[mb] = _recv_tensor(stage + 1, ctx.device)
            elif kind == "SendGrad":
                _send_tensor(ctx.grads_in.pop(mb), stage - 1, "gradient")
        if ran_backward:
            _call_hook(model, "_smp_finish_gradients")
    finally:
        _current = None
        _last_stats = {"max_live_microbatches": ctx.max_live, "schedule": list(actions)}
    results = None
    if ctx.is_last_stage:
        results = [ctx.results[mb] for mb in range(n)]
        if prepare is not None:
            results = [prepare(r) for r in results]
    if stages > 1:
        results = share_results(results)
    _call_hook(model, "_smp_end_step")
    return results


def _backward(ctx, mb):
    """mb's backward on this stage; returns whether anything was back-propagated."""
    slot = ctx.saved.get(mb, {})
    if ctx.is_last_stage:
        recorded = ctx.losses.pop(mb, None)
        if recorded is None:
            ran = False
        else:
            tensor, grad_tensors = recorded
            scale = 1.0 / ctx.num_microbatches
            if not getattr(ctx.model, "average_grads_across_microbatches", True):
                scale = 1.0
            if grad_tensors is None:
                torch.autograd.backward(tensor * scale)
            else:
                if isinstance(grad_tensors, torch.Tensor):
                    grad_tensors = grad_tensors * scale
                else:
                    grad_tensors = [g * scale for g in grad_tensors]
                torch.autograd.backward(tensor, grad_tensors)
            ran = True
    else:
        grad = ctx.grads_out.pop(mb)
        ran = grad is not None
        if ran:
            torch.autograd.backward(slot["output"], grad)
    if ctx.stage > 0:
        x = slot.get("input")
        ctx.grads_in[mb] = x.grad if (ran and x is not None and x.requires_grad) else None
    return ran
