"""Assigning a model's modules to pipeline stages.

The units of placement are the model's top-level children in registration
order (a Sequential's layers). Each unit goes to one stage:

- automatic (``auto_partition``, the default): contiguous runs of units,
  balanced by parameter count (the largest stage's count is as small as
  possible); deterministic, so identical on every rank;
- manual (``"auto_partition": False``): the stage a unit was given with
  ``with smp.partition(i):`` around its creation or ``smp.set_partition(module,
  i)`` on it or on the model itself; else ``default_partition``. A unit whose
  submodules were given other stages is an error (units are not split).

For chain execution the stages must not decrease along the chain and every
stage must hold at least one unit; plan() raises smp.ConfigError otherwise.
"""

import contextlib

import torch
import torch.fx

from smp import _C, _state

_ATTR = "_smp_partition"
_active = []  # stack of partition indices of open smp.partition contexts


def _on_register(parent, name, submodule):
    if _active and submodule is not None and getattr(submodule, _ATTR, None) is None:
        setattr(submodule, _ATTR, _active[-1])
    return None


_hook = torch.nn.modules.module.register_module_module_registration_hook(_on_register)


@contextlib.contextmanager
def partition(index):
    """Modules registered as submodules inside this context (``self.net2 =
    Net2()``) go to pipeline stage ``index`` when auto_partition is False.
    Inner contexts win for modules created inside them."""
    index = int(index)
    if index < 0:
        raise _C.ConfigError(f"smp.partition({index}): the stage must be >= 0")
    _active.append(index)
    try:
        yield
    finally:
        _active.pop()


def set_partition(module, index):
    """Places ``module`` (and its submodules without a stage of their own) on
    pipeline stage ``index`` when auto_partition is False."""
    index = int(index)
    if index < 0:
        raise _C.ConfigError(f"smp.set_partition({type(module).__name__}, {index}): the stage "
                             "must be >= 0")
    wrapped = _state.current_model()
    if wrapped is not None and wrapped.partitioned and _C.pp_size() > 1 and \
            any(m is module for m in wrapped.get_module().modules()):
        raise _C.StateError(
            f"smp.set_partition({type(module).__name__}, {index}) on rank {_C.rank()}: the "
            "DistributedModel holding this module is already partitioned (at the first "
            "smp.step, or earlier by a call that needed the stages: local_parameters(), "
            "state dicts, smp.DistributedOptimizer, model.to(), checkpoints); call "
            "set_partition right after smp.DistributedModel(...), before those")
    setattr(module, _ATTR, index)


def get_partition(module):
    """The stage given to ``module`` itself, or None."""
    return getattr(module, _ATTR, None)


def balanced_split(weights, num_stages):
    """Stage of each weight: contiguous runs, num_stages of them, each non-empty,
    minimising the largest run's sum; ties go to the split whose earlier stages
    are as large as possible. Raises ConfigError for fewer weights than stages."""
    n = len(weights)
    if n < num_stages:
        raise _C.ConfigError(
            f"automatic partitioning: the model has {n} top-level module(s) but "
            f"pipeline_parallel_degree is {num_stages}; every stage needs at least one module: "
            "use a torch.nn.Sequential with at least as many layers as stages, or a smaller "
            "pipeline_parallel_degree")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: least possible max for the first i units in k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(i - 1, k - 2, -1):  # last stage holds units j..i-1
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    stages = [0] * n
    i = n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        for u in range(j, i):
            stages[u] = k - 1
        i = j
    return stages


def units(module):
    """The ordered (name, module) units of ``module``: its top-level children."""
    return [(name, child) for name, child in module.named_children()]


def _manual_stage(root, name, unit, default):
    own = get_partition(unit)
    stage = own if own is not None else get_partition(root)
    if stage is None:
        stage = default
    for sub_name, sub in unit.named_modules():
        s = get_partition(sub)
        if sub is not unit and s is not None and s != stage:
            raise _C.NotSupportedError(
                f"manual partitioning: module '{name}.{sub_name}' was given stage {s} but its "
                f"top-level module '{name}' is on stage {stage}; smp places whole top-level "
                "modules: give the stage to the top-level module instead")
    return stage


def plan(module, num_stages, auto_partition=True, default_partition=0, order=None):
    """[(name, child, stage)] for the units of ``module`` (see module docstring),
    in the order of ``order`` (unit names, e.g. the call order from
    trace_chain), by default registration order."""
    items = units(module)
    if order is not None:
        children = dict(items)
        items = [(name, children[name]) for name in order]
    if not items:
        raise _C.ConfigError(
            f"pipeline partitioning: {type(module).__name__} has no submodules to place on "
            f"{num_stages} stages; use a torch.nn.Sequential of layers")
    if auto_partition:
        weights = [sum(p.numel() for p in child.parameters()) for _, child in items]
        stages = balanced_split(weights, num_stages)
    else:
        if not 0 <= default_partition < num_stages:
            raise _C.ConfigError(
                f"default_partition is {default_partition}; it must be in 0..{num_stages - 1} "
                f"(pipeline_parallel_degree {num_stages})")
        stages = [_manual_stage(module, n, c, default_partition) for n, c in items]
    previous = 0
    for (name, _), s in zip(items, stages):
        if not 0 <= s < num_stages:
            raise _C.ConfigError(
                f"module '{name}' was placed on stage {s}, but pipeline_parallel_degree is "
                f"{num_stages}; use a stage in 0..{num_stages - 1}")
        if s < previous:
            raise _C.NotSupportedError(
                f"module '{name}' is on stage {s} but comes after a module on stage {previous}; "
                "a pipelined chain needs stages in non-decreasing order of the modules")
        previous = s
    empty = sorted(set(range(num_stages)) - set(stages))
    if empty:
        raise _C.ConfigError(
            f"pipeline stage(s) {empty} hold no module (assignment: "
            f"{dict((n, s) for (n, _), s in zip(items, stages))}); every stage needs at least "
            "one top-level module: change smp.partition/set_partition or default_partition")
    return [(n, c, s) for (n, c), s in zip(items, stages)]


class _TopLevelTracer(torch.fx.Tracer):
    """Traces a module's own forward, keeping its direct children as leaves."""

    def __init__(self, root):
        super().__init__()
        self._children = {id(c) for c in root.children()}

    def is_leaf_module(self, m, qualname):
        return id(m) in self._children or super().is_leaf_module(m, qualname)


_CHAIN_RULE = (
    "with pipeline_parallel_degree > 1 the model's forward must be a chain: one tensor "
    "input, then operations (calls of its submodules, torch functions, tensor methods) each "
    "taking only the result of the previous one (plus constants), returning the last result; "
    "see docs/pipeline.md")


def trace_chain(module):
    """The forward of ``module`` as a chain: (unit names in first-call order,
    steps), each step (fx node, unit name or None). Traced with torch.fx,
    top-level children as leaves; raises smp.NotSupportedError naming the
    offending operation when the data flow is not a chain."""
    name = type(module).__name__
    try:
        graph = _TopLevelTracer(module).trace(module)
    except Exception as e:  # fx raises many types for untraceable code
        raise _C.NotSupportedError(
            f"pipeline: the forward of {name} could not be traced with torch.fx "
            f"({type(e).__name__}: {e}); {_CHAIN_RULE}") from None
    nodes = list(graph.nodes)
    used = [n for n in nodes if n.op == "placeholder" and n.users]
    if len(used) != 1:
        raise _C.NotSupportedError(
            f"pipeline: the forward of {name} uses {len(used)} inputs "
            f"({[n.target for n in used]}); {_CHAIN_RULE}")
    prev, order, steps = used[0], [], []
    for n in nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            if n.args[0] is not prev:
                raise _C.NotSupportedError(
                    f"pipeline: the forward of {name} returns {n.args[0]!r}, not the result of "
                    f"its last operation '{prev}'; {_CHAIN_RULE}")
            break
        if n.op == "get_attr" or n.all_input_nodes != [prev]:
            raise _C.NotSupportedError(
                f"pipeline: in the forward of {name}, operation '{n.format_node()}' takes "
                f"{[str(i) for i in n.all_input_nodes]} but the previous result is '{prev}'; "
                f"{_CHAIN_RULE}")
        unit = n.target.split(".")[0] if n.op == "call_module" else None
        if unit is not None and unit not in order:
            order.append(unit)
        steps.append((n, unit))
        prev = n
    if not order:
        raise _C.NotSupportedError(
            f"pipeline: the forward of {name} calls none of its submodules; {_CHAIN_RULE}")
    return order, steps


def run_steps(module, steps, x):
    """Runs fx chain steps (as from trace_chain) on x."""
    for node, _ in steps:
        args = torch.fx.node.map_arg(node.args, lambda _n: x)
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda _n: x)
        if node.op == "call_module":
            x = module.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            x = node.target(*args, **kwargs)
        else:  # call_method
            x = getattr(args[0], node.target)(*args[1:], **kwargs)
    return x
