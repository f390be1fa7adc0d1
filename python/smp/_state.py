"""smp.state: the process-wide state that smp v1's framework integrations read.

    smp.state.cfg.fp16                      # any config key, on every rank
    smp.state.cfg.shard_optimizer_state
    smp.state.model, smp.state.optimizer    # this process's DistributedModel / -Optimizer
    smp.state.module_manager.translate_functions.append(fn)
    smp.state.num_microbatches()

Everything here is local to the process: reading it never communicates, so any
subset of ranks may read it at any time.
"""

import types
import weakref

from smp import _C, torch_dist

# This process's DistributedModel and latest DistributedOptimizer (weakrefs):
# set by smp.model / smp.optimizer, read by every module that needs them
# (a leaf module, so that reading them imports nothing that imports back).
_model_ref = None
_optimizer_ref = None


def current_model():
    """This process's smp.DistributedModel, or None."""
    return _model_ref() if _model_ref is not None else None


def current_optimizer():
    """This process's latest smp.DistributedOptimizer, or None."""
    return _optimizer_ref() if _optimizer_ref is not None else None


def _set_model(model):
    global _model_ref
    _model_ref = weakref.ref(model) if model is not None else None


def _set_optimizer(optimizer):
    global _optimizer_ref
    _optimizer_ref = weakref.ref(optimizer) if optimizer is not None else None


class ConfigView:
    """Read-only attribute access to the resolved config (smp.config()):
    ``cfg.<key>`` for every key smp.init accepts, v1's aliases included
    (``partitions``, ``fp16_params``). A snapshot: it does not change when smp
    is re-initialized."""

    _ALIASES = {"partitions": "pipeline_parallel_degree", "fp16_params": "fp16"}

    def __init__(self, values):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key):
        values = object.__getattribute__(self, "_values")
        key = ConfigView._ALIASES.get(key, key)
        try:
            return values[key]
        except KeyError:
            raise AttributeError(
                f"smp config has no key '{key}'; keys: {', '.join(sorted(values))}") from None

    def __setattr__(self, key, value):
        raise _C.StateError(
            f"smp.state.cfg is read-only (setting '{key}'); pass config keys to smp.init")

    def __dir__(self):
        return sorted(object.__getattribute__(self, "_values")) + ["to_dict", "zero2d_enabled"]

    def __repr__(self):
        return f"smp.state.cfg({object.__getattribute__(self, '_values')!r})"

    def to_dict(self):
        """The resolved config as a plain dict."""
        return dict(object.__getattribute__(self, "_values"))

    def zero2d_enabled(self):
        """smp v1: whether sharded data parallelism is on. Always False here
        (sharded_data_parallel_degree > 1 is refused at smp.init)."""
        return False


class ModuleManager:
    """The part of smp v1's module manager that integrations touch.

    ``translate_functions``: a list of callables ``fn(state_dict) ->
    state_dict`` that turn smp's full state dict into the names of the
    user's original model. smp.DistributedModel appends one
    smp.nn.huggingface.HFTranslator per Hugging Face layer type it replaced
    with tensor parallelism (removed at smp.shutdown); scripts may append
    their own. DistributedModel.state_dict(gather_to_rank0=True) applies
    every function in order (translate_full); load_state_dict of a full dict
    applies, in reverse order, the ``inverse`` of those that have one
    (translate_full_back)."""

    def __init__(self):
        self.translate_functions = []

    def translate_full(self, state_dict):
        """state_dict passed through every translate function, in order."""
        for fn in list(self.translate_functions):
            state_dict = fn(state_dict)
        return state_dict

    def translate_full_back(self, state_dict):
        """state_dict passed through the ``inverse`` of every translate
        function that has one, in reverse order (the others are skipped)."""
        for fn in reversed(list(self.translate_functions)):
            inverse = getattr(fn, "inverse", None)
            if callable(inverse):
                state_dict = inverse(state_dict)
        return state_dict


class State:
    """Type of smp.state (one instance per process)."""

    def __init__(self):
        self.module_manager = ModuleManager()
        # smp v1's "core": the rank queries.
        self.core = types.SimpleNamespace(
            rank=_C.rank, size=_C.size, local_rank=_C.local_rank, local_size=_C.local_size,
            pp_rank=_C.pp_rank, pp_size=_C.pp_size, tp_rank=_C.tp_rank, tp_size=_C.tp_size,
            dp_rank=_C.dp_rank, dp_size=_C.dp_size, rdp_rank=_C.rdp_rank, rdp_size=_C.rdp_size,
            mp_rank=_C.mp_rank, mp_size=_C.mp_size)

    @property
    def initialized(self):
        return _C.is_initialized()

    @property
    def cfg(self):
        """The running job's config as attributes (smp.state.cfg.fp16, ...);
        None before smp.init, as in smp v1."""
        return ConfigView(_C.config()) if _C.is_initialized() else None

    @property
    def model(self):
        """This process's smp.DistributedModel, or None."""
        return current_model()

    @property
    def optimizer(self):
        """This process's smp.DistributedOptimizer, or None."""
        return current_optimizer()

    def num_microbatches(self):
        """The config's microbatches (1 before smp.init, as in smp v1)."""
        return int(_C.config()["microbatches"]) if _C.is_initialized() else 1

    def is_tracing(self):
        """smp does not trace models: always False."""
        return False

    # Megatron-style "mpu" queries that smp v1 offered on its state (DeepSpeed
    # and Megatron integrations call them): model parallel = MP_GROUP, data
    # parallel = RDP_GROUP.
    def get_model_parallel_rank(self):
        return _C.mp_rank()

    def get_model_parallel_world_size(self):
        return _C.mp_size()

    def get_model_parallel_group(self):
        return torch_dist.get_mp_process_group()

    def get_data_parallel_rank(self):
        return _C.rdp_rank()

    def get_data_parallel_world_size(self):
        return _C.rdp_size()

    def get_data_parallel_group(self):
        return torch_dist.get_rdp_process_group()

    def __getattr__(self, name):
        # torch process groups as smp v1 named them: world_process_group,
        # dp_process_group, mp_process_group, pp_process_group, tp_process_group,
        # rdp_process_group.
        if name.endswith("_process_group"):
            getter = getattr(torch_dist, "get_" + name, None)
            if getter is not None:
                return getter()
        raise AttributeError(f"smp.state has no attribute '{name}'")

    def __repr__(self):
        return f"smp.state(initialized={self.initialized})"


state = State()


def num_microbatches():
    """The number of microbatches of each smp.step (config ``microbatches``)."""
    return state.num_microbatches()
