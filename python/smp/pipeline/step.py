"""smp.step and StepOutput: split a batch into microbatches and run a training
step function once per microbatch, following the pipeline schedule.

    @smp.step
    def train_step(model, data, target):
        output = model(data)
        loss = F.nll_loss(output, target)
        model.backward(loss)
        return output, loss

    output_mb, loss_mb = train_step(model, data, target)
    loss = loss_mb.reduce_mean()

Splitting (``split_microbatches``): every tensor argument, and every tensor
nested in lists, tuples (named tuples included) and dicts, is split into
``smp config microbatches`` equal pieces along axis 0, or the axis given in
``input_split_axes={name: axis}``; arguments named in ``non_split_inputs`` and
non-tensor values are passed unchanged to every microbatch. A tensor whose size
along the split axis is not a multiple of microbatches raises smp.ConfigError.

Gradients: ``model.backward(loss)`` inside a step back-propagates
``loss / microbatches``, so after the step the gradients are the average over
microbatches, i.e. those of one step on the whole batch with the loss averaged
over microbatches (smp v1's average_grads_across_microbatches=True; a model
whose ``average_grads_across_microbatches`` attribute is False gets the sum).

Return values: the step function's return value on the last pipeline stage, for
each microbatch, is handed to every rank of the pipeline inside the step (one
object broadcast and one tensor broadcast per dtype over PP_GROUP,
engine.share_results), then mapped container by container: every tensor becomes
a StepOutput of its per-microbatch values, dicts (and model-output mappings)
become dicts, lists and tuples keep their type, other values become lists of
their per-microbatch values. StepOutput is then a local object on every rank.
Tensors are detached per microbatch unless ``detach_outputs=False`` (a
StepOutput does not keep the autograd graph, hence the activations, alive).
"""

import collections.abc
import functools
import inspect

import torch

from smp import _C
from smp.pipeline import engine, modcall


class StepOutput:
    """The values one tensor returned by a step function took on each
    microbatch, in microbatch order (smp v1's StepOutput).

    A plain local object: smp.step hands the last pipeline stage's return
    values to every rank of the pipeline inside the step (see
    docs/pipeline.md), so every rank holds every microbatch's value and none
    of these methods communicates. Any subset of ranks may call them, in any
    order, or not at all.
    """

    def __init__(self, outputs=None):
        #: The per-microbatch values (a list).
        self.outputs = list(outputs) if outputs is not None else []

    def reduce_mean(self):
        """Mean over microbatches (tensors: stacked on a new dim 0, then the
        mean over it; numbers: arithmetic mean)."""
        return _reduce_values(self.outputs, "mean")

    def reduce_sum(self):
        """Sum over microbatches."""
        return _reduce_values(self.outputs, "sum")

    def concat(self):
        """torch.cat of the per-microbatch tensors along dim 0 (the batch)."""
        self._require_values("concat")
        return torch.cat(self.outputs, dim=0)

    def stack(self):
        """torch.stack of the per-microbatch tensors on a new dim 0."""
        self._require_values("stack")
        return torch.stack(self.outputs, dim=0)

    def map(self, fn):
        """A new StepOutput of ``fn(value)`` for each microbatch's value."""
        return StepOutput([fn(v) for v in self.outputs])

    def add_output(self, value):
        """Appends one more microbatch's value."""
        self.outputs.append(value)

    def clear(self):
        """Drops every value."""
        self.outputs = []

    def _require_values(self, what):
        if not self.outputs:
            raise _C.StateError(f"StepOutput.{what}() on an empty StepOutput (rank {_C.rank()})"
                                if _C.is_initialized() else
                                f"StepOutput.{what}() on an empty StepOutput")

    def __getitem__(self, index):
        return self.outputs[index]

    def __len__(self):
        return len(self.outputs)

    def __iter__(self):
        return iter(self.outputs)

    def __repr__(self):
        return f"StepOutput({len(self.outputs)} microbatches)"


def _reduce_values(values, how):
    if not values:
        raise _C.StateError(f"StepOutput.reduce_{how}() on an empty StepOutput")
    if all(isinstance(v, torch.Tensor) for v in values):
        stacked = torch.stack(values, dim=0)
        return stacked.mean(dim=0) if how == "mean" else stacked.sum(dim=0)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        total = sum(values)
        return total / len(values) if how == "mean" else total
    kinds = sorted({type(v).__name__ for v in values})
    raise _C.NotSupportedError(
        f"StepOutput.reduce_{how}: the step returned values of type(s) {kinds}; only tensors "
        "and numbers can be reduced; use .outputs for other values")


def _split_value(value, axis, n, where):
    """n pieces of value (see the module docstring); ``where`` names it in errors."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return [value] * n
        if not -value.dim() <= axis < value.dim():
            raise _C.ConfigError(
                f"smp.step: argument {where} has shape {tuple(value.shape)}, which has no split "
                f"axis {axis}; set input_split_axes={{name: axis}} to a valid axis or list it in "
                "non_split_inputs")
        size = value.shape[axis]
        if size % n != 0:
            raise _C.ConfigError(
                f"smp.step: argument {where} has size {size} along split axis {axis} (shape "
                f"{tuple(value.shape)}), which is not divisible by microbatches={n}; use a batch "
                f"size that is a multiple of {n}, change 'microbatches' in smp.init, or list the "
                "argument in non_split_inputs")
        return list(torch.split(value, size // n, dim=axis))
    if isinstance(value, (list, tuple)):
        parts = [_split_value(v, axis, n, f"{where}[{i}]") for i, v in enumerate(value)]
        out = []
        for k in range(n):
            items = [p[k] for p in parts]
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                out.append(type(value)(*items))
            else:
                out.append(type(value)(items))
        return out
    if isinstance(value, dict):
        parts = {key: _split_value(v, axis, n, f"{where}[{key!r}]") for key, v in value.items()}
        out = []
        for k in range(n):
            d = type(value)() if type(value) is not dict else {}
            for key in value:
                d[key] = parts[key][k]
            out.append(d)
        return out
    return [value] * n


def split_microbatches(bound_arguments, n, non_split_inputs=(), input_split_axes=None):
    """Splits an inspect.BoundArguments' values into n microbatches; returns a
    list of n (args, kwargs). The first parameter (the model) is never split."""
    axes = dict(input_split_axes or {})
    skip = set(non_split_inputs or ())
    names = list(bound_arguments.signature.parameters)
    known = set(names)
    for name in list(skip) + list(axes):
        if name not in known:
            raise _C.ConfigError(
                f"smp.step: '{name}' in non_split_inputs/input_split_axes is not a parameter of "
                f"the step function (parameters: {names})")
    per_name = {}
    for i, (name, value) in enumerate(bound_arguments.arguments.items()):
        kind = bound_arguments.signature.parameters[name].kind
        if i == 0 or name in skip:
            per_name[name] = [value] * n
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            parts = [_split_value(v, axes.get(name, 0), n, f"'{name}'[{j}]")
                     for j, v in enumerate(value)]
            per_name[name] = [tuple(p[k] for p in parts) for k in range(n)]
        elif kind == inspect.Parameter.VAR_KEYWORD:
            parts = {key: _split_value(v, axes.get(key, axes.get(name, 0)), n, f"'{key}'")
                     if key not in skip else [v] * n for key, v in value.items()}
            per_name[name] = [{key: parts[key][k] for key in value} for k in range(n)]
        else:
            per_name[name] = _split_value(value, axes.get(name, 0), n, f"'{name}'")
    out = []
    for k in range(n):
        ba = inspect.BoundArguments(bound_arguments.signature,
                                    {name: per_name[name][k] for name in per_name})
        out.append((ba.args, ba.kwargs))
    return out


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        items = [_detach(v) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, collections.abc.Mapping):
        return {k: _detach(v) for k, v in value.items()}
    return value


def step(fn=None, *, non_split_inputs=None, input_split_axes=None, detach_outputs=True):
    """Decorator for ``fn(model, *args, **kwargs)``: see the module docstring.
    Usable as ``@smp.step`` or ``@smp.step(non_split_inputs=[...],
    input_split_axes={...}, detach_outputs=True)``. Returns fn's return value
    with every tensor replaced by a StepOutput of its per-microbatch values
    (see _to_step_outputs), on every rank."""
    if fn is None:
        return functools.partial(step, non_split_inputs=non_split_inputs,
                                 input_split_axes=input_split_axes,
                                 detach_outputs=detach_outputs)
    signature = inspect.signature(fn)
    if not signature.parameters:
        raise _C.ConfigError(
            f"smp.step: '{fn.__name__}' takes no arguments; a step function takes the model "
            "first: def train_step(model, data, target)")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _C.is_initialized():
            raise _C.StateError(f"smp.step '{fn.__name__}' needs smp.init() first")
        if engine.current_step() is not None:
            raise _C.StateError(
                f"smp.step '{fn.__name__}' called inside another smp.step function; "
                "call step functions from the training loop only")
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise _C.ConfigError(f"smp.step '{fn.__name__}': {e}") from None
        n = int(_C.config()["microbatches"])
        pieces = split_microbatches(bound, n, non_split_inputs, input_split_axes)
        model = bound.arguments[next(iter(signature.parameters))]
        # A model that is not a chain runs on the module-level pipeline (modcall).
        run = modcall.run_step if getattr(model, "_smp_module_pipeline", False) else engine.run_step
        results = run(fn, model, pieces, prepare=_detach if detach_outputs else None)
        return _to_step_outputs(results)

    wrapper._smp_step = True
    return wrapper


def _to_step_outputs(results):
    """Maps the per-microbatch return values ``results`` (one per microbatch,
    every rank holds them) container by container, as smp v1 does: a mapping
    (dict, a model-output class) becomes a dict, a list a list, a tuple a
    tuple of the same type (named tuples too), each tensor a StepOutput of its
    per-microbatch values, and any other value the list of its
    per-microbatch values. Where the microbatches' values differ in structure,
    that position becomes the per-microbatch list."""
    return _map_microbatches(list(results))


def _map_microbatches(values):
    first = values[0] if values else None
    if values and all(isinstance(v, torch.Tensor) for v in values):
        return StepOutput(values)
    if isinstance(first, collections.abc.Mapping):
        keys = list(first.keys())
        if all(isinstance(v, collections.abc.Mapping) and list(v.keys()) == keys
               for v in values):
            return {k: _map_microbatches([v[k] for v in values]) for k in keys}
    elif isinstance(first, (list, tuple)):
        kind = type(first)
        if all(type(v) is kind and len(v) == len(first) for v in values):
            items = [_map_microbatches([v[i] for v in values]) for i in range(len(first))]
            if isinstance(first, tuple) and hasattr(first, "_fields"):
                return kind(*items)
            return kind(items) if kind in (list, tuple) else list(items)
    return list(values)
