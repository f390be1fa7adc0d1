"""Marking modules for tensor parallelism, and the registry of module types that
smp.DistributedModel replaces with tensor-parallel ones when tp_size() > 1.

    with smp.tensor_parallelism():
        self.fc = torch.nn.Linear(512, 512)       # marked
    smp.set_tensor_parallelism(model.encoder)       # marks encoder and its submodules

    @smp.tp_register(MyDistributedAttention)      # MyAttention -> MyDistributedAttention
    class MyAttention(torch.nn.Module): ...

Marks are attributes on the module (``_smp_tp_config``: the keyword arguments of
the marking call, or None for "explicitly not"). A registered type is replaced by
``dist_cls.from_module(module)`` (which slices the full weights) when the
distributed class has it and no init_hook is given; otherwise by
``dist_cls(*args, **kwargs)`` built from the original constructor arguments
(recorded for modules created inside ``smp.tensor_parallelism()``, passed
through ``init_hook(*args, **kwargs) -> (args, kwargs)``) and then loaded with
the full weights. ``forward_hook(*args, **kwargs) -> (args, kwargs)`` adapts the
inputs of the replacement's forward and ``return_hook(output)`` its output.

Built-in entries torch.nn.Linear -> smp.nn.DistributedLinear,
torch.nn.Embedding -> smp.nn.DistributedEmbedding and the Hugging Face layers
of smp.nn.huggingface (transformers' GPT2Block, BertLayer) are resolved when
first needed; a user registration of the same type takes precedence.

As in smp v1, a replacement gets only the marking keywords that its
from_module / constructor accepts, and a module that shares a parameter with a
module outside its subtree (a tied LM head) is not distributed (replace_marked).
"""

import collections
import contextlib
import functools
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from smp import _C
from smp import nn as snn
from smp.patches.checkpoint import CHECKPOINT_ATTR, set_activation_checkpointing

_TP_ATTR = "_smp_tp_config"
_INIT_ARGS_ATTR = "_smp_init_args"

logger = logging.getLogger("smp.tp")


@dataclass
class _Entry:
    dist_cls: type
    init_hook: Optional[Callable] = None
    forward_hook: Optional[Callable] = None
    return_hook: Optional[Callable] = None
    builtin: bool = False


_registry = {}
_lock = threading.Lock()
# Active tensor_parallelism() contexts, innermost last: (enabled, kwargs).
_context_stack = []
_patched_inits = {}


def tp_register_with_module(module_cls, dist_module_cls, init_hook=None, forward_hook=None,
                            return_hook=None):
    """Registers ``dist_module_cls`` as the tensor-parallel replacement of
    ``module_cls`` (exact type match). See the module docstring for the hooks."""
    if not (isinstance(module_cls, type) and issubclass(module_cls, torch.nn.Module)):
        raise _C.ConfigError(
            f"smp.tp_register_with_module: module_cls must be a torch.nn.Module subclass, got "
            f"{module_cls!r}")
    if not (isinstance(dist_module_cls, type) and issubclass(dist_module_cls, torch.nn.Module)):
        raise _C.ConfigError(
            f"smp.tp_register_with_module: the distributed class for {module_cls.__name__} must "
            f"be a torch.nn.Module subclass, got {dist_module_cls!r}")
    with _lock:
        _registry[module_cls] = _Entry(dist_module_cls, init_hook, forward_hook, return_hook)
        if _context_stack:
            _patch_init(module_cls)


def tp_register(dist_module_cls, init_hook=None, forward_hook=None, return_hook=None):
    """Class decorator form of tp_register_with_module:

        @smp.tp_register(DistributedFoo)
        class Foo(torch.nn.Module): ...
    """

    def decorator(module_cls):
        tp_register_with_module(module_cls, dist_module_cls, init_hook, forward_hook,
                                return_hook)
        return module_cls

    return decorator


def _resolve_builtins():
    """Adds torch.nn.Linear / Embedding -> smp.nn.Distributed* unless the user
    registered those types."""
    for module_cls, name in ((torch.nn.Linear, "DistributedLinear"),
                             (torch.nn.Embedding, "DistributedEmbedding")):
        dist_cls = getattr(snn, name, None)
        if dist_cls is not None and module_cls not in _registry:
            _registry[module_cls] = _Entry(dist_cls, builtin=True)
    # Hugging Face layers (GPT2Block, BertLayer) of the modeling modules the
    # program has imported (smp.nn.huggingface imports no transformers).
    for module_cls, dist_cls in snn.huggingface.builtin_entries().items():
        if module_cls not in _registry:
            _registry[module_cls] = _Entry(dist_cls, builtin=True)


def registry():
    """A copy of the registry: {module type: distributed type}."""
    with _lock:
        _resolve_builtins()
        return {k: v.dist_cls for k, v in _registry.items()}


def _entry_for(module):
    with _lock:
        _resolve_builtins()
        return _registry.get(type(module))


# ---- marking -----------------------------------------------------------------

_orig_module_init = torch.nn.Module.__init__


@functools.wraps(_orig_module_init)
def _marking_module_init(self, *args, **kwargs):
    _orig_module_init(self, *args, **kwargs)
    if _context_stack and not hasattr(self, _TP_ATTR):
        enabled, tp_kwargs = _context_stack[-1]
        object.__setattr__(self, _TP_ATTR, dict(tp_kwargs) if enabled else None)


def _patch_init(module_cls):
    """Records the constructor arguments of module_cls instances created while
    a context is active (needs _lock)."""
    if module_cls in _patched_inits or "__init__" not in module_cls.__dict__:
        return
    orig = module_cls.__dict__["__init__"]

    @functools.wraps(orig)
    def recording_init(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        if type(self) is module_cls:
            object.__setattr__(self, _INIT_ARGS_ATTR, (args, kwargs))

    _patched_inits[module_cls] = orig
    module_cls.__init__ = recording_init


def _unpatch_all():
    for cls, orig in _patched_inits.items():
        cls.__init__ = orig
    _patched_inits.clear()


@contextlib.contextmanager
def tensor_parallelism(enabled=True, **kwargs):
    """Modules created inside are marked for tensor parallelism (``enabled``)
    with ``kwargs`` (or marked as excluded with enabled=False). Nested contexts:
    the innermost wins. The marking patches torch.nn.Module.__init__ while any
    context is open, in every thread of the process."""
    with _lock:
        _resolve_builtins()
        if not _context_stack:
            torch.nn.Module.__init__ = _marking_module_init
            for cls in _registry:
                _patch_init(cls)
        _context_stack.append((bool(enabled), dict(kwargs)))
    try:
        yield
    finally:
        with _lock:
            _context_stack.pop()
            if not _context_stack:
                torch.nn.Module.__init__ = _orig_module_init
                _unpatch_all()


def set_tensor_parallelism(module, enabled=True, **kwargs):
    """Marks ``module`` and all its submodules for tensor parallelism with
    ``kwargs`` (enabled=False: excludes them). Call before smp.DistributedModel."""
    if not isinstance(module, torch.nn.Module):
        raise _C.ConfigError(
            f"smp.set_tensor_parallelism expects a torch.nn.Module, got {type(module).__name__}")
    for m in module.modules():
        object.__setattr__(m, _TP_ATTR, dict(kwargs) if enabled else None)


def tp_config(module):
    """The kwargs a module was marked with, or None when it is not marked."""
    return getattr(module, _TP_ATTR, None)


def is_dist_module(module):
    """True for modules that follow smp's tensor-parallel protocol."""
    return callable(getattr(module, "_smp_shard_specs", None))


def accepted_kwargs(fn, kwargs):
    """The keywords of ``kwargs`` that ``fn`` accepts (every one when fn takes
    **kwargs): smp v1 hands each replacement only the tensor_parallelism()
    keywords its constructor knows, so one context can carry options of
    several module types (``attention_in_fp32`` for transformer layers next to
    plain Linears)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def make_distributed(module):
    """The tensor-parallel replacement of ``module`` (a marked module of a
    registered type), built from the module's full weights; None when the type
    is not registered. Only the marking keywords that the replacement's
    from_module / constructor accepts are passed on."""
    entry = _entry_for(module)
    if entry is None:
        return None
    tp_kwargs = tp_config(module) or {}
    from_module = getattr(entry.dist_cls, "from_module", None)
    if entry.init_hook is None and from_module is not None:
        kw = accepted_kwargs(from_module, tp_kwargs)
        kw.pop("module", None)
        new = from_module(module, **kw)
    else:
        recorded = getattr(module, _INIT_ARGS_ATTR, None)
        if recorded is None:
            raise _C.ConfigError(
                f"smp.DistributedModel: cannot build {entry.dist_cls.__name__} for a "
                f"{type(module).__name__}: its constructor arguments were not recorded; create "
                f"the module inside `with smp.tensor_parallelism():`, or give "
                f"{entry.dist_cls.__name__} a from_module(module) classmethod")
        args, kwargs = recorded
        if entry.init_hook is not None:
            args, kwargs = entry.init_hook(*args, **kwargs)
        new = entry.dist_cls(*args, **{**kwargs, **accepted_kwargs(entry.dist_cls, tp_kwargs)})
        # Built where its constructor puts it (the CPU for smp.nn modules):
        # move it to the original module's device, as from_module does.
        first = next(iter(module.parameters()), None)
        if first is not None:
            new.to(device=first.device)
        full = module.state_dict()
        for name in full_param_names(new):
            if name in full:
                new._smp_load_full(name, full[name])
    if entry.forward_hook is not None or entry.return_hook is not None:
        inner_forward = new.forward

        def forward(*args, **kwargs):
            if entry.forward_hook is not None:
                args, kwargs = entry.forward_hook(*args, **kwargs)
            out = inner_forward(*args, **kwargs)
            return entry.return_hook(out) if entry.return_hook is not None else out

        new.forward = forward
    checkpointing = getattr(module, CHECKPOINT_ATTR, None)
    if checkpointing is not None:
        set_activation_checkpointing(new, **checkpointing)
    new.train(module.training)
    return new


def _shared_param(module, counts):
    """The name of a parameter of ``module`` that a module outside its subtree
    also holds (a tied output layer and input embedding: GPT-2's lm_head.weight
    is wte.weight), or None. ``counts``: {id(param): occurrences in the root}."""
    params = list(module.named_parameters(remove_duplicate=False))
    inside = collections.Counter(id(p) for _, p in params)
    for name, p in params:
        if inside[id(p)] < counts[id(p)]:
            return name
    return None


_tie_logged = set()


def replace_marked(root):
    """Replaces, in place, the outermost marked modules of registered types
    under ``root`` (root included) by their tensor-parallel versions; returns
    the new root (``root`` itself unless root was replaced).

    As in smp v1, a module that shares a parameter with a module outside its
    own subtree is not distributed (slicing it would untie the two, and they
    would train apart): it stays as it is, and this is logged once per module
    path. Its submodules are not distributed either."""
    counts = collections.Counter(
        id(p) for _, p in root.named_parameters(remove_duplicate=False))

    def replace(module, path):
        if tp_config(module) is None or is_dist_module(module) or _entry_for(module) is None:
            return None
        shared = _shared_param(module, counts)
        if shared is not None:
            key = (path, type(module).__name__)
            if key not in _tie_logged:
                _tie_logged.add(key)
                logger.warning(
                    "smp: %s (%s) shares parameter '%s' with another module, so it is not "
                    "distributed (tensor parallelism keeps tied weights replicated, as smp v1 "
                    "does)", path or "the model", type(module).__name__, shared)
            return module
        return make_distributed(module)

    def visit(parent, prefix):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = prefix + name
            new = replace(child, path)
            if new is child:
                continue
            if new is not None:
                parent._modules[name] = new
                continue
            if not is_dist_module(child):
                visit(child, path + ".")

    new = replace(root, "")
    if new is not None:
        return new
    visit(root, "")
    return root


def full_param_names(dist_module):
    """Names (relative to the module) of every full parameter of a
    tensor-parallel module, from _smp_full_param_names(), which may return a
    dict keyed by name or a sequence of names or of (name, ...) tuples."""
    names = dist_module._smp_full_param_names()
    if isinstance(names, dict):
        return list(names)
    return [n if isinstance(n, str) else n[0] for n in names]
