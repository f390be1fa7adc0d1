"""Smaller names of smp v1's PyTorch API: activation checkpointing functions,
model_creation, is_tracing and the per-group barriers, plus the stubs of v1
names smp does not implement (they raise smp.NotSupportedError naming the
alternative, instead of AttributeError)."""

import contextlib
import re

import torch
import torch.utils.checkpoint as _torch_checkpoint

from smp import _C, tp
from smp._C import CommGroup
from smp._objects import barrier


def is_tracing():
    """smp v1: whether this process runs the tracing step. smp does not trace
    models: always False."""
    return False


def pp_barrier(timeout=None):
    """smp.barrier(smp.PP_GROUP)."""
    barrier(CommGroup.PP_GROUP, timeout=timeout)


def tp_barrier(timeout=None):
    """smp.barrier(smp.TP_GROUP)."""
    barrier(CommGroup.TP_GROUP, timeout=timeout)


def rdp_barrier(timeout=None):
    """smp.barrier(smp.RDP_GROUP)."""
    barrier(CommGroup.RDP_GROUP, timeout=timeout)


def checkpoint(module, *args, preserve_rng_state=True):
    """smp v1's smp.checkpoint: runs ``module(*args)`` without keeping its
    activations; backward recomputes them (torch.utils.checkpoint, non-reentrant).
    The module's stage must be this rank's (with pp_size() > 1 call it inside the
    stage's forward)."""
    if not isinstance(module, torch.nn.Module):
        raise _C.ConfigError(
            f"smp.checkpoint expects a torch.nn.Module, got {type(module).__name__}; smp "
            "checkpoints modules (for a function use torch.utils.checkpoint.checkpoint)")
    return _torch_checkpoint.checkpoint(module, *args, use_reentrant=False,
                                        preserve_rng_state=preserve_rng_state)


def _groups(n, strategy):
    """Sizes of the consecutive groups of n layers that `strategy` checkpoints
    together: "each" -> 1 each; "group_<k>" -> k each (the last may be
    smaller); "contiguous" -> all n (this rank's layers form one group)."""
    if strategy == "each":
        return [1] * n
    if strategy == "contiguous":
        return [n] if n else []
    m = re.fullmatch(r"group_(\d+)", strategy or "")
    if m and int(m.group(1)) >= 1:
        k = int(m.group(1))
        return [min(k, n - i) for i in range(0, n, k)]
    raise _C.ConfigError(
        f"smp.checkpoint_sequential: strategy is {strategy!r}; use 'each', 'contiguous' or "
        "'group_<k>' (k >= 1)")


def checkpoint_sequential(sequential_module, input, strategy="each", preserve_rng_state=True,
                          pack_args_as_tuple=False):
    """smp v1's smp.checkpoint_sequential: runs the layers of an
    nn.Sequential, checkpointing groups of consecutive layers per ``strategy``
    ("each", "contiguous" or "group_<k>"). With pack_args_as_tuple the input
    (and each layer's output) is a tuple passed to the next layer as one
    argument."""
    if not isinstance(sequential_module, torch.nn.Sequential):
        raise _C.ConfigError(
            "smp.checkpoint_sequential expects a torch.nn.Sequential, got "
            f"{type(sequential_module).__name__}")
    layers = list(sequential_module)
    x = input
    start = 0
    for size in _groups(len(layers), strategy):
        block = torch.nn.Sequential(*layers[start:start + size])
        start += size
        if pack_args_as_tuple:
            x = _torch_checkpoint.checkpoint(lambda *a, _b=block: _b(tuple(a)), *x,
                                             use_reentrant=False,
                                             preserve_rng_state=preserve_rng_state)
        else:
            x = _torch_checkpoint.checkpoint(block, x, use_reentrant=False,
                                             preserve_rng_state=preserve_rng_state)
    return x


@contextlib.contextmanager
def model_creation(tensor_parallelism=False, dtype=None, **tensor_parallel_config):
    """smp v1's smp.model_creation: modules created inside are marked for
    tensor parallelism when ``tensor_parallelism`` is true (with
    ``tensor_parallel_config`` as in smp.tensor_parallelism), and floating
    point parameters are created in ``dtype`` (torch's default dtype while the
    context is open). Parameter initialization is not delayed (see
    smp.delay_param_initialization)."""
    old_dtype = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        if tensor_parallelism:
            stack.enter_context(tp.tensor_parallelism(True, **tensor_parallel_config))
        if dtype is not None:
            torch.set_default_dtype(dtype)
            stack.callback(torch.set_default_dtype, old_dtype)
        yield


def _unsupported(name, alternative):
    def raiser(*args, **kwargs):
        raise _C.NotSupportedError(f"{name} is not supported by smp; {alternative}")

    raiser.__name__ = name.rsplit(".", 1)[-1]
    raiser.__qualname__ = raiser.__name__
    raiser.__doc__ = f"Not supported: raises smp.NotSupportedError ({alternative})."
    return raiser


def unsupported_class(name, alternative):
    """A class whose construction raises smp.NotSupportedError naming
    `alternative` (for smp v1 classes that smp does not implement)."""

    def __init__(self, *args, **kwargs):
        raise _C.NotSupportedError(f"{name} is not supported by smp; {alternative}")

    short = name.rsplit(".", 1)[-1]
    return type(short, (), {"__init__": __init__, "__module__": name.rsplit(".", 1)[0],
                            "__doc__": f"Not supported: constructing it raises "
                                       f"smp.NotSupportedError ({alternative})."})
