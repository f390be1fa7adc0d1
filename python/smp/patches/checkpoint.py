"""Activation checkpointing with smp v1's API, on torch.utils.checkpoint
(non-reentrant): the activations inside a checkpointed module are dropped after
forward and recomputed during backward.

    smp.set_activation_checkpointing(model.transformer.seq_layers)    # each layer
    smp.set_activation_checkpointing(block)                            # one module
    y = checkpoint(block, x)                                           # one call
    y = checkpoint_sequential(seq, x, strategy="group_2")

Tensor-parallel modules recompute their collectives in backward, in the same
order on every member of TP_GROUP, so checkpoint the same modules on every
rank. With pipeline parallelism a stage holds whole top-level modules, so the
layers of one nn.Sequential always share a partition: ``contiguous`` groups
all of them.
"""

import functools
import logging
import re

import torch
import torch.utils.checkpoint

from smp import _C

# Options of smp.set_activation_checkpointing on a module, carried over to its
# tensor-parallel replacement (smp.tp).
CHECKPOINT_ATTR = "_smp_activation_checkpointing"

_INNER_ATTR = "_smp_checkpoint_inner_forward"
logger = logging.getLogger("smp.checkpoint")


def _group_size(strategy, who):
    """Layers per checkpointed group: 1 for "each", None (all) for
    "contiguous", x for "group_x"."""
    if strategy == "each":
        return 1
    if strategy == "contiguous":
        return None
    m = re.fullmatch(r"group_(\d+)", str(strategy))
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise _C.ConfigError(
        f"{who}: strategy must be \"each\", \"contiguous\" or \"group_<x>\" with x >= 1, "
        f"got {strategy!r}")


def _checkpoint(fn, args, kwargs, preserve_rng_state):
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs)


def checkpoint(module, *args, preserve_rng_state=True):
    """``module(*args)`` with its activations recomputed in backward."""
    if not isinstance(module, torch.nn.Module):
        raise _C.ConfigError(
            f"smp checkpoint: expects a torch.nn.Module (smp checkpoints whole modules), got "
            f"{type(module).__name__}; use torch.utils.checkpoint.checkpoint for a function")
    return _checkpoint(module, args, {}, bool(preserve_rng_state))


def _run_layers(layers, inp):
    for layer in layers:
        inp = layer(inp)
    return inp


def _sequential(layers, inp, size, preserve_rng_state):
    layers = list(layers)
    size = len(layers) if size is None else size
    for start in range(0, len(layers), max(size, 1)):
        group = layers[start:start + size]
        inp = _checkpoint(functools.partial(_run_layers, group), (inp,), {}, preserve_rng_state)
    return inp


def checkpoint_sequential(sequential_module, input, strategy="each", preserve_rng_state=True,
                          pack_args_as_tuple=False):
    """Runs the layers of ``sequential_module`` (a torch.nn.Sequential) on
    ``input``, checkpointing them one by one ("each"), all together
    ("contiguous": one partition holds all of them here) or in groups of x
    ("group_x"). A layer that takes a tuple gets the tuple (``input`` or the
    previous layer's output) as its one argument; ``pack_args_as_tuple`` is
    accepted for smp v1 scripts (non-reentrant checkpointing needs no packing)."""
    if not isinstance(sequential_module, torch.nn.Sequential):
        raise _C.ConfigError(
            "smp checkpoint_sequential: expects a torch.nn.Sequential, got "
            f"{type(sequential_module).__name__}; use checkpoint(module, *args) for other modules")
    size = _group_size(strategy, "smp checkpoint_sequential")
    del pack_args_as_tuple
    return _sequential(sequential_module, input, size, bool(preserve_rng_state))


def set_activation_checkpointing(module, preserve_rng_state=True, pack_args_as_tuple=False,
                                 strategy="each"):
    """Checkpoints every later call of ``module`` (its forward is wrapped on
    this instance). An nn.Sequential's layers are checkpointed per
    ``strategy`` ("each", "contiguous", "group_x"); an nn.ModuleList's modules
    each on their own. ``pack_args_as_tuple`` and ``strategy`` apply to
    nn.Sequential only (as in smp v1). Call it before or after
    smp.DistributedModel: a module replaced by a tensor-parallel one passes the
    setting on to its replacement. Calling it again replaces the options."""
    if not isinstance(module, torch.nn.Module):
        raise _C.ConfigError(
            f"smp.set_activation_checkpointing expects a torch.nn.Module, got "
            f"{type(module).__name__}")
    preserve_rng_state = bool(preserve_rng_state)
    is_seq = isinstance(module, torch.nn.Sequential)
    size = _group_size(strategy, "smp.set_activation_checkpointing")
    if not is_seq and not isinstance(module, torch.nn.ModuleList) and (
            pack_args_as_tuple or strategy != "each"):
        raise _C.ConfigError(
            f"smp.set_activation_checkpointing: pack_args_as_tuple and strategy apply to "
            f"torch.nn.Sequential modules only, got a {type(module).__name__} with "
            f"pack_args_as_tuple={pack_args_as_tuple!r}, strategy={strategy!r}")
    options = {"preserve_rng_state": preserve_rng_state,
               "pack_args_as_tuple": bool(pack_args_as_tuple), "strategy": strategy}
    if isinstance(module, torch.nn.ModuleList):
        if strategy != "each":
            logger.info("smp.set_activation_checkpointing: a ModuleList's modules are called "
                        "one by one by its owner, so each is checkpointed on its own "
                        "(strategy %r applies to nn.Sequential)", strategy)
        for child in module:
            set_activation_checkpointing(child, preserve_rng_state=preserve_rng_state)
        object.__setattr__(module, CHECKPOINT_ATTR, options)
        return
    # The forward before the first wrapping (the class's, or an instance one
    # such as a tp_register forward_hook), not a previously installed wrapper.
    inner = module.__dict__.get(_INNER_ATTR)
    if inner is None:
        inner = module.__dict__.get("forward") or functools.partial(type(module).forward, module)
        object.__setattr__(module, _INNER_ATTR, inner)
    if is_seq:
        def forward(input):
            return _sequential(module, input, size, preserve_rng_state)
    else:
        def forward(*args, **kwargs):
            return _checkpoint(inner, args, kwargs, preserve_rng_state)
    object.__setattr__(module, "forward", forward)
    object.__setattr__(module, CHECKPOINT_ATTR, options)
