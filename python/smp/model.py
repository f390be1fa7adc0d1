"""smp.DistributedModel: wraps the user's torch.nn.Module for tensor and data
parallelism, and with pp_size() > 1 for pipeline parallelism (see _partition).

    model = smp.DistributedModel(MyNet())
    optimizer = smp.DistributedOptimizer(torch.optim.Adam(model.parameters()))
    loss = loss_fn(model(x), y)
    model.backward(loss)          # backward + gradient averaging
    optimizer.step()

What the wrapper does, in order:
1. broadcasts every parameter and buffer of the original module from world
   rank 0 over WORLD, so that every rank starts from identical full weights;
2. with tp_size() > 1, replaces marked modules of registered types
   (smp.tensor_parallelism, smp.set_tensor_parallelism, smp.tp_register) in
   place by their tensor-parallel versions, which slice the full weights;
   parameters keep their original names;
3. registers a post-accumulate-grad hook on every parameter that hands the
   finished gradient to the engine's GradReducer, which averages it over
   DP_GROUP (replicated parameters) or RDP_GROUP (parameters of tensor-parallel
   modules whose shard spec says "distributed": split ones and those held by one
   tp rank) in buckets while backward runs;
4. with pp_size() > 1, releases the storage of the parameters and buffers of the
   other pipeline stages' modules (see below).

Steps 3 and 4 happen when the model is partitioned: at construction with
pp_size() == 1; with pp_size() > 1 at the first smp.step, or earlier at the
first call that needs the stage assignment (local_*(), state dicts,
DistributedOptimizer, .to(), checkpoints), so that smp.set_partition after
wrapping takes effect (smp v1 partitions at the first step). Post-partition and
post-step hooks get (model, optimizer) with v1's timing (docs/pipeline.md).
With "ddp": True, ``model.module`` is a DataParallelModule holding the user's
module (v1's DistributedDataParallel position); ``get_module()`` is the user's
module either way, and every name (state dicts, param_spec) is relative to it.

Pipeline parallelism and devices. With pp_size() > 1 the module's top-level
children are assigned to stages (smp.pipeline.PipelineModule) and each rank
keeps only its own stage's tensors: after wrapping, every parameter and buffer
of another stage is an empty tensor (0 elements, no storage) that keeps its
name, dtype, device and requires_grad, so ``model.parameters()`` still lists
every parameter and ``torch.optim.X(model.parameters())`` works (released
parameters never get a gradient, so optimizers skip them). This stage's tensors
are local_parameters() / local_buffers() (local_named_parameters(), ...). The
state dicts and DistributedOptimizer cover only this stage's tensors on each
rank (state_dict(gather_to_rank0=True) gathers the stages' parts), and
param_spec(name) keeps every parameter's full shape. Running another stage's
module directly (through model.module) fails: its tensors are empty.

The module is not moved to a device by the wrapper. To train a model too large
for one device, build it on the CPU, wrap it, then move it::

    model = smp.DistributedModel(build_model())     # on the CPU, all stages built
    model.to(torch.device("cuda", smp.local_rank()))  # moves this stage's tensors only

``model.to()`` / ``.cuda()`` / ``.half()`` ... move or convert the local tensors
(released ones have no bytes) and rebuild the gradient buckets for the new
device and dtype; do it before building the optimizer and between steps (not
while gradients await averaging: smp.StateError). A model already placed on its
device before wrapping works as well.

Gradients are final after ``model.backward(loss)``. A plain ``loss.backward()``
also works: DistributedOptimizer.step() then completes the averaging before
stepping (the gradients in .grad are the local ones until then). Data sharding
is the user's DataLoader's job: shard by dp_rank()/dp_size(), or by
rdp_rank()/rdp_size() with prescaled_batch.

smp v1's keyword arguments are all accepted; what each does here is in
docs/api.md ("DistributedModel constructor arguments"): backward_passes_per_step,
average_grads_across_microbatches and bucket_cap_mb act, the others have no
effect.
"""

import collections
import functools
import weakref

import torch

from smp import _C, _objects, _runtime, _state, comm, tp
from smp.nn import huggingface as hf
from smp.pipeline import engine, modcall
from smp.pipeline.module import PipelineModule
from smp.pipeline.partition import trace_chain
from smp._C import CommGroup

current_model = _state.current_model
_current_optimizer = _state.current_optimizer


def _reset():
    """Forgets this process's DistributedModel (smp.shutdown runs it)."""
    model = current_model()
    if model is not None:
        model._release()
    _state._set_model(None)


_runtime.register_shutdown_hook(_reset)


def _broadcast_from_rank0(module):
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_contiguous():
                comm.broadcast(t.data, 0, CommGroup.WORLD)
            else:
                tmp = t.data.contiguous()
                comm.broadcast(tmp, 0, CommGroup.WORLD)
                t.data.copy_(tmp)


def _state_entries(module, is_local, prefix=""):
    """The full state dict's entries in torch's state_dict order, as the
    engine's state-dict rules take them (smp._C.state_dict_*): (full name,
    local tensor or None, gather or None, load or None, local). A full
    parameter of a tensor-parallel module has gather/load (its
    _smp_gather_full / _smp_load_full); local is False for another pipeline
    stage's entry."""
    out = []
    if tp.is_dist_module(module):
        full = tp.full_param_names(module)
        for n in full:
            out.append((prefix + n, None, functools.partial(module._smp_gather_full, n),
                        functools.partial(module._smp_load_full, n), is_local(prefix + n)))
        names = set(full)
        for n, b in module.named_buffers():
            mod_name, _, leaf = n.rpartition(".")
            owner = module.get_submodule(mod_name) if mod_name else module
            if n not in names and leaf not in owner._non_persistent_buffers_set:
                out.append((prefix + n, b, None, None, is_local(prefix + n)))
        return out
    for n, p in module._parameters.items():
        if p is not None:
            out.append((prefix + n, p, None, None, is_local(prefix + n)))
    for n, b in module._buffers.items():
        if b is not None and n not in module._non_persistent_buffers_set:
            out.append((prefix + n, b, None, None, is_local(prefix + n)))
    for n, child in module._modules.items():
        if child is not None:
            out.extend(_state_entries(child, is_local, prefix + n + "."))
    return out


class DataParallelModule(torch.nn.Module):
    """What ``DistributedModel.module`` is with ``"ddp": True``: the layer that
    holds the user's module as ``.module``, where smp v1 puts its
    DistributedDataParallel wrapper (so ``model.module.module`` is the user's
    model there, as in v1). Gradient averaging is DistributedModel's; this
    layer only forwards."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# smp v1's DistributedModel keyword arguments and what each does here
# (docs/api.md, "DistributedModel constructor arguments").
_V1_ARGUMENTS = ("trace_device", "trace_execution_times", "trace_memory_usage",
                 "overlapping_allreduce", "backward_passes_per_step",
                 "average_grads_across_microbatches", "bucket_cap_mb", "find_unused_parameters",
                 "broadcast_buffers", "gradient_as_bucket_view")


class DistributedModel(torch.nn.Module):
    """Wraps ``module`` for smp (see the module docstring). One per process;
    needs smp.init()."""

    def __init__(self, module, trace_device="gpu", trace_execution_times=False,
                 trace_memory_usage=False, overlapping_allreduce=True,
                 backward_passes_per_step=1, average_grads_across_microbatches=True,
                 bucket_cap_mb=25, find_unused_parameters=False, broadcast_buffers=True,
                 gradient_as_bucket_view=False, **kwargs):
        if not _C.is_initialized():
            raise _C.StateError("smp.DistributedModel needs smp.init() first")
        if kwargs:
            raise _C.ConfigError(
                f"smp.DistributedModel: unknown keyword argument(s) {sorted(kwargs)}; smp v1's "
                f"arguments are {', '.join(_V1_ARGUMENTS)}")
        if not isinstance(module, torch.nn.Module):
            raise _C.ConfigError(
                f"smp.DistributedModel expects a torch.nn.Module, got {type(module).__name__}")
        existing = current_model()
        if existing is not None:
            raise _C.StateError(
                f"smp.DistributedModel was already created in this process (rank {_C.rank()}, "
                f"wrapping a {type(existing.get_module()).__name__}); smp supports one "
                "DistributedModel per process: wrap the whole model once")
        if trace_device not in ("cpu", "gpu"):
            raise _C.ConfigError(
                f"smp.DistributedModel: trace_device must be 'cpu' or 'gpu', got "
                f"{trace_device!r}")
        if isinstance(backward_passes_per_step, bool) or \
                not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
            raise _C.ConfigError(
                f"smp.DistributedModel: backward_passes_per_step must be an int >= 1, got "
                f"{backward_passes_per_step!r}")
        for name, value in (("trace_execution_times", trace_execution_times),
                            ("trace_memory_usage", trace_memory_usage),
                            ("overlapping_allreduce", overlapping_allreduce),
                            ("average_grads_across_microbatches",
                             average_grads_across_microbatches),
                            ("find_unused_parameters", find_unused_parameters),
                            ("broadcast_buffers", broadcast_buffers),
                            ("gradient_as_bucket_view", gradient_as_bucket_view)):
            if not isinstance(value, bool):
                raise _C.ConfigError(
                    f"smp.DistributedModel: {name} must be True or False, got {value!r}")
        if not isinstance(bucket_cap_mb, (int, float)) or bucket_cap_mb <= 0:
            raise _C.ConfigError(
                f"smp.DistributedModel: bucket_cap_mb must be a positive number, got "
                f"{bucket_cap_mb!r}")
        super().__init__()
        self.trace_device = trace_device
        self.trace_execution_times = trace_execution_times
        self.trace_memory_usage = trace_memory_usage
        self.overlapping_allreduce = overlapping_allreduce
        self.backward_passes_per_step = backward_passes_per_step
        #: Read by the pipeline engine: False back-propagates each microbatch's
        #: loss unscaled, so gradients are summed over microbatches.
        self.average_grads_across_microbatches = average_grads_across_microbatches
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self._bucket_bytes = int(bucket_cap_mb * (1 << 20))
        self._backward_calls = 0
        self._hooks_armed = True
        self._finished = True  # no gradients pending averaging
        self._post_partition_hooks = collections.OrderedDict()
        self._post_step_hooks = collections.OrderedDict()
        self._partitioned = False
        self._partitioning = False
        self._first_step_begun = False
        self._first_step_done = False
        self._reducer = None
        self._hook_handles = []
        self._local_param_names = []
        self._distributed_ids = set()
        # The user's module (after tensor-parallel replacement) and, with
        # pp_size() > 1, the pipeline stage runner: neither is a registered
        # child, so parameters keep their names under self.module.
        object.__setattr__(self, "_net", module)
        object.__setattr__(self, "_pipe_impl", None)

        _broadcast_from_rank0(module)
        if _C.tp_size() > 1:
            self._replace_tp_modules()
        self.module = DataParallelModule(self._net) if _C.config()["ddp"] else self._net
        # Specs (global shapes) need every parameter's full tensor: before the release.
        self._build_specs()
        if _C.pp_size() > 1:
            # Partitioning waits for the first smp.step (or the first call that
            # needs the stages), so that smp.set_partition after wrapping counts;
            # what can be checked without the stage assignment fails here.
            self._check_pipeline_structure()
        else:
            self._ensure_partitioned()
        _state._set_model(self)

    # ---- construction ------------------------------------------------------

    def get_module(self):
        """The user's module (with tensor-parallel replacements), below every
        wrapper layer: ``model.module`` without ddp, ``model.module.module``
        with it (smp v1's get_module)."""
        return self._net

    def _replace_tp_modules(self):
        object.__setattr__(self, "_net", tp.replace_marked(self._net))
        # Replaced Hugging Face layers: their translators map the full state
        # dict's names to and from the original model's.
        hf.register_translators(self._net)

    @property
    def partitioned(self):
        """True once the module's stages are assigned (smp v1's property): at
        construction with pp_size() == 1, else at the first smp.step or the
        first call that needs the stages (see _ensure_partitioned)."""
        return self._partitioned

    @property
    def _pipe(self):
        """The stage runner with pp_size() > 1 (None otherwise); partitions on
        first use."""
        self._ensure_partitioned()
        return self._pipe_impl

    @property
    def _param_names(self):
        """Names of this stage's parameters, in the model's order."""
        self._ensure_partitioned()
        return self._local_param_names

    def _ensure_partitioned(self):
        """Assigns the module's top-level children to pipeline stages
        (smp.pipeline.PipelineModule, with the smp.partition/set_partition
        marks as they are now), builds the gradient reducer over this stage's
        parameters and releases the other stages' tensors. Runs once: at
        construction with pp_size() == 1, else at the first smp.step or at the
        first call that needs to know the stages (local_*(), state dicts,
        DistributedOptimizer, .to(), checkpoints), whichever comes first."""
        if self._partitioned or self._partitioning:
            return
        self._partitioning = True
        try:
            if _C.pp_size() > 1:
                if getattr(self, "_smp_module_pipeline", False):  # module-level pipeline
                    object.__setattr__(self, "_pipe_impl", modcall.ModulePipeline(self._net))
                else:
                    object.__setattr__(self, "_pipe_impl", PipelineModule(self._net))
                    self._check_every_tensor_has_a_stage(
                        {n for n, _, _ in self._pipe_impl.plan})
            self._build_reducer()
            self._release_other_stages()
            self._partitioned = True
        finally:
            self._partitioning = False

    def _check_pipeline_structure(self):
        """With pp_size() > 1, the checks that do not depend on the stage
        assignment: the forward is a chain (smp.pipeline.partition.trace_chain)
        and every parameter and buffer is in a module the chain calls."""
        if modcall.use_module_pipeline(self._net):  # not a chain: module-level pipeline
            object.__setattr__(self, "_smp_module_pipeline", True)
            return
        order, _ = trace_chain(self._net)
        self._check_every_tensor_has_a_stage(set(order))

    def _check_every_tensor_has_a_stage(self, staged):
        """Parameters and persistent buffers outside every stage (the root
        module's own, or those of a top-level module that forward never calls)
        would be neither trained nor saved: refuse them."""
        # The state dict's keys: every parameter and persistent buffer.
        orphans = [n for n in self._net.state_dict(keep_vars=True)
                   if n.split(".", 1)[0] not in staged]
        if orphans:
            raise _C.NotSupportedError(
                f"smp.DistributedModel: with pipeline_parallel_degree {_C.pp_size()}, "
                f"{orphans} belong to no pipeline stage (stages hold the top-level modules that "
                f"forward calls: {sorted(staged)}), so they would be neither trained nor saved; "
                "move them into a submodule that forward calls, or remove them")

    def _build_specs(self):
        """Records {"split_dim", "global_shape", "distributed"} of every parameter
        (every stage's: the optimizer's state dicts carry them all). Runs before
        _release_other_stages, while every parameter still has its full shape."""
        # A spec without "distributed" counts as distributed: its gradient holds
        # the whole TP group's batches (smp.nn.DistributedModule's convention).
        specs = {}
        for prefix, m in self._net.named_modules():
            if tp.is_dist_module(m):
                for local, spec in m._smp_shard_specs().items():
                    full = f"{prefix}.{local}" if prefix else local
                    specs[full] = (spec.get("split_dim"), tuple(spec["global_shape"]),
                                   bool(spec.get("distributed", True)))
        self._specs = {}
        for name, p in self._net.named_parameters():
            split, shape, dist = specs.get(name, (None, tuple(p.shape), False))
            self._specs[name] = {"split_dim": split, "global_shape": tuple(shape),
                                 "distributed": dist}

    def _build_reducer(self):
        """(Re)builds the GradReducer over this stage's parameters, from the specs
        recorded at construction, and hooks each parameter into it."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        self._distributed_ids = set()
        params, names, split_dims, shapes, distributed = [], [], [], [], []
        for name, p in self._net.named_parameters():
            spec = self._specs.get(name)
            if spec is None:
                raise _C.StateError(
                    f"smp.DistributedModel: parameter '{name}' was not in the model when it was "
                    "wrapped; add parameters before smp.DistributedModel(...)")
            if spec["distributed"]:
                self._distributed_ids.add(id(p))
            # Parameters of other pipeline stages: released, never averaged here.
            if not self._is_local(name):
                continue
            params.append(p)
            names.append(name)
            split_dims.append(spec["split_dim"])
            shapes.append(list(spec["global_shape"]))
            distributed.append(spec["distributed"])
        self._local_param_names = names
        self._params = params
        self._reducer = _C.GradReducer(params, names, split_dims, shapes,
                                       bucket_bytes=self._bucket_bytes, distributed=distributed)
        self._reducer_layout = self._local_layout()
        self_ref = weakref.ref(self)

        def hook(index):
            def on_grad(_param):
                model = self_ref()
                if model is not None:
                    model._grad_ready(index)
            return on_grad

        for i, p in enumerate(params):
            if p.requires_grad:
                self._hook_handles.append(p.register_post_accumulate_grad_hook(hook(i)))

    def _local_layout(self):
        """What the reducer's buckets depend on: each local parameter's identity,
        device and dtype."""
        return [(id(p), p.device, p.dtype) for p in self.local_parameters()]

    def _release_other_stages(self):
        """With pp_size() > 1, frees the storage of the parameters and buffers of
        the other stages' top-level modules: each keeps its name, dtype, device
        and requires_grad, with an empty (0-element) tensor. Tensors shared with
        this stage's modules are kept."""
        pipe = self._pipe_impl
        if pipe is None:
            return
        if hasattr(pipe, "release_other_stages"):  # module-level pipeline hook
            pipe.release_other_stages()
            return
        keep = set()
        for _, child in pipe._local:
            keep.update(id(t) for _, t in child.named_parameters(remove_duplicate=False))
            keep.update(id(t) for _, t in child.named_buffers(remove_duplicate=False))
        released = set()
        with torch.no_grad():
            for _, child, stage in pipe.plan:
                if stage == pipe.stage:
                    continue
                tensors = [t for _, t in child.named_parameters(remove_duplicate=False)]
                tensors += [t for _, t in child.named_buffers(remove_duplicate=False)]
                for t in tensors:
                    if id(t) in keep or id(t) in released:
                        continue
                    released.add(id(t))
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
                    if isinstance(t, torch.nn.Parameter):
                        t.grad = None

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() ...: the released tensors have no bytes to
        # move; the reducer's buckets follow the local parameters' new device
        # and dtype. Partitions first, so that only this stage's tensors move.
        if "_net" in self.__dict__:
            self._ensure_partitioned()
        if self._reducer is not None and not self._finished:
            raise _C.StateError(
                "smp.DistributedModel: the model was moved or converted (.to(), .cuda(), ...) "
                "while gradients await averaging; call optimizer.step() (or finish "
                "model.backward) first, or move the model before training")
        out = super()._apply(fn, *args, **kwargs)
        if self._reducer is not None and self._local_layout() != self._reducer_layout:
            self._build_reducer()
        return out

    def _release(self):
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        self._reducer = None

    # ---- gradients ---------------------------------------------------------

    def _grad_ready(self, index):
        if self._hooks_armed and self._reducer is not None:
            self._finished = False
            self._reducer.mark_ready(index)

    def _finish_grads(self):
        """Completes gradient averaging if a backward pass left it pending."""
        self._ensure_partitioned()
        if self._reducer is None:
            raise _C.StateError("smp.DistributedModel: smp was shut down; wrap the model again "
                                "after smp.init()")
        if not self._finished:
            self._reducer.finish()
            self._finished = True

    def backward(self, tensor, grad_tensors=None):
        """Backward from ``tensor`` (the loss), then averages the gradients over
        the data-parallel ranks; .grad holds the averages on return. With
        backward_passes_per_step=N, gradients accumulate locally over N calls
        (or N steps) and are averaged on the N-th. Inside an smp.step function
        it records the microbatch's loss; the step runs the backward passes on
        the pipeline schedule and averages the gradients after the last one."""
        ctx = engine.current_step()
        if ctx is not None:
            ctx.record_backward(tensor, grad_tensors)
            return
        self._ensure_partitioned()
        self._backward_calls += 1
        final = self._backward_calls % self.backward_passes_per_step == 0
        self._hooks_armed = final
        try:
            torch.autograd.backward(tensor, grad_tensors)
        finally:
            self._hooks_armed = True
        if final:
            self._finished = False
            self._finish_grads()

    # ---- module API --------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self._pipe is not None:
            return self._pipe(*args, **kwargs)
        return self.module(*args, **kwargs)

    # ---- pipeline engine hooks (smp.pipeline.engine) -------------------------

    def _smp_begin_step(self):
        self._ensure_partitioned()
        if not self._first_step_begun:
            self._first_step_begun = True
            hooks = list(self._post_partition_hooks.values())
            self._post_partition_hooks.clear()
            optimizer = _current_optimizer()
            for fn in hooks:
                fn(self, optimizer)

    def _smp_end_step(self):
        if not self._first_step_done:
            self._first_step_done = True
            hooks = list(self._post_step_hooks.values())
            self._post_step_hooks.clear()
            optimizer = _current_optimizer()
            for fn in hooks:
                fn(self, optimizer)

    def _final_pass(self):
        """Whether the current step's backward ends a backward_passes_per_step group."""
        return (self._backward_calls + 1) % self.backward_passes_per_step == 0

    def _smp_begin_microbatch_backward(self, is_last):
        # Only the step's last backward produces final gradients to average,
        # and only on every backward_passes_per_step-th step.
        self._hooks_armed = bool(is_last) and self._final_pass()

    def _smp_finish_gradients(self):
        final = self._final_pass()
        self._backward_calls += 1
        self._hooks_armed = True
        if final:
            self._finished = False
            self._finish_grads()

    def _smp_stage_device(self):
        for p in self.local_parameters():
            return p.device
        return torch.device("cpu")

    def _is_local(self, name):
        """True when state-dict entry ``name`` belongs to this rank's pipeline stage."""
        if self._pipe is None:
            return True
        if hasattr(self._pipe, "is_local_name"):  # module-level pipeline hook
            return self._pipe.is_local_name(name)
        return name.split(".", 1)[0] in self._pipe.local_names

    def register_post_partition_hook(self, hook):
        """``hook(model, optimizer)`` runs once the model is partitioned, at the
        first smp.step before its first forward (smp v1), with this process's
        latest DistributedOptimizer (None if there is none). Called at once when
        the model is partitioned and an optimizer exists, or when the first step
        has begun. Returns a torch.utils.hooks.RemovableHandle (None when
        called at once)."""
        optimizer = _current_optimizer()
        if self._first_step_begun or (self._partitioned and optimizer is not None):
            hook(self, optimizer)
            return None
        handle = torch.utils.hooks.RemovableHandle(self._post_partition_hooks)
        self._post_partition_hooks[handle.id] = hook
        return handle

    def register_post_step_hook(self, hook):
        """``hook(model, optimizer)`` runs once, after the first smp.step (smp
        v1), with this process's latest DistributedOptimizer (None if there is
        none). Called at once when the model is partitioned and an optimizer
        exists, or when the first step is over. Returns a
        torch.utils.hooks.RemovableHandle (None when called at once)."""
        optimizer = _current_optimizer()
        if self._first_step_done or (self._partitioned and optimizer is not None):
            hook(self, optimizer)
            return None
        handle = torch.utils.hooks.RemovableHandle(self._post_step_hooks)
        self._post_step_hooks[handle.id] = hook
        return handle

    def local_parameters(self, recurse=True):
        return (p for _, p in self.local_named_parameters(recurse=recurse))

    def local_named_parameters(self, prefix="", recurse=True):
        return ((prefix + n, p) for n, p in self._net.named_parameters("", recurse)
                if self._is_local(n))

    def local_modules(self):
        return (m for _, m in self.local_named_modules())

    def local_named_modules(self):
        if self._pipe is None:
            return self._net.named_modules()
        return ((n, m) for n, m in self._net.named_modules()
                if n and self._is_local(n))

    def local_buffers(self, recurse=True):
        return (b for _, b in self.local_named_buffers(recurse=recurse))

    def local_named_buffers(self, prefix="", recurse=True):
        return ((prefix + n, b) for n, b in self._net.named_buffers("", recurse)
                if self._is_local(n))

    def is_distributed_parameter(self, param):
        """True for parameters of tensor-parallel modules (averaged over RDP_GROUP)."""
        self._ensure_partitioned()
        return id(param) in self._distributed_ids

    def param_spec(self, name):
        """{"split_dim", "global_shape", "distributed"} of parameter ``name``, recorded
        at wrapping for every parameter (other pipeline stages' too, whose tensors
        are released here): global_shape is the full, unsplit shape."""
        return self._specs[name]

    # ---- state dicts -------------------------------------------------------

    def local_state_dict(self, *args, **kwargs):
        """This rank's parameters and buffers under their original names (shards
        for tensor-parallel ones) and ``"_smp_is_partial": True``."""
        sd = self._net.state_dict(*args, **kwargs)
        if self._pipe is not None:
            sd = collections.OrderedDict((k, v) for k, v in sd.items() if self._is_local(k))
        sd[_C.PARTIAL_STATE_KEY] = True
        return sd

    def state_dict(self, *args, gather_to_rank0=True, translate=True, **kwargs):
        """The full model (full tensors, original names) on world rank 0, ``{}``
        on other ranks; loadable with strict=True into the unwrapped module.
        Collective over TP_GROUP (and, with pipeline parallelism, over the
        PP_GROUP of tp_rank 0): every rank with rdp_rank() == 0 must call it;
        ranks with rdp_rank() > 0 return {} at once. gather_to_rank0=False
        gives local_state_dict().

        The gathered dict passes through smp.state.module_manager.translate_functions
        (the Hugging Face layers smp replaced get their original names back);
        translate=False (an smp extension) returns smp's names."""
        if not gather_to_rank0:
            return self.local_state_dict(*args, **kwargs)
        if _C.rdp_rank() != 0:
            return {}
        sd = self._gather_full()
        if sd and translate:
            sd = _state.state.module_manager.translate_full(sd)
        return sd

    def _gather_full(self):
        entries = _state_entries(self._net, self._is_local)
        stage = collections.OrderedDict(_C.state_dict_gather_full(entries, _C.tp_rank() == 0))
        if self._pipe is None:
            return stage if _C.rank() == 0 else {}
        if _C.tp_rank() != 0:
            return {}
        # The tp_rank 0 ranks of the stages (one PP_GROUP, holding world rank 0)
        # send their stages' full tensors to pp_rank 0.
        parts = _objects.gather({k: v.cpu() for k, v in stage.items()}, CommGroup.PP_GROUP,
                                rank=0)
        if _C.rank() != 0:
            return {}
        merged = {}
        for part in parts:
            merged.update(part)
        device = next(iter(stage.values())).device if stage else torch.device("cpu")
        return collections.OrderedDict((full, merged[full].to(device))
                                       for full, *_ in entries if full in merged)

    def load_state_dict(self, state_dict, strict=True, same_partition_load=False):
        """Loads a full state dict (state_dict(), or the unwrapped module's): every
        rank slices its part, no communication. Or a partial one
        (local_state_dict(), with "_smp_is_partial"), copied as is; it must come
        from the same tensor-parallel layout (same_partition_load=True states
        that; a partial dict whose shapes match is accepted either way). strict:
        raise smp.ConfigError listing missing and unexpected keys. The rules are
        the engine's (smp/model/state_dict.h), shared with smp::DistributedModel.
        A dict that smp.load(partial=True) resharded from another layout carries
        "_smp_resharded_from" and loads with same_partition_load=False only.
        A full dict in the original model's names (a Hugging Face state dict,
        save_pretrained's) is first translated to smp's names by the inverse
        of smp.state.module_manager.translate_functions."""
        resharded_from = state_dict.get("_smp_resharded_from") if hasattr(state_dict, "get") else None
        if resharded_from is not None:
            if same_partition_load:
                raise _C.CheckpointError(
                    f"smp.DistributedModel.load_state_dict(same_partition_load=True): the state "
                    f"dict was saved with {resharded_from} but this job has pp_size "
                    f"{_C.pp_size()}, tp_size {_C.tp_size()}, rdp_size {_C.rdp_size()}; smp.load "
                    "resharded it for this layout: load it with same_partition_load=False")
            state_dict = {k: v for k, v in state_dict.items() if k != "_smp_resharded_from"}
        if _C.state_dict_is_partial(state_dict):
            local = [(k, v) for k, v in self._net.state_dict(keep_vars=True).items()
                     if self._is_local(k)]
            missing, unexpected = _C.state_dict_load_partial(local, state_dict, strict)
        else:
            # A full dict in the original model's names (a Hugging Face
            # model's): back to smp's (no-op for a dict already in them).
            state_dict = _state.state.module_manager.translate_full_back(state_dict)
            missing, unexpected = _C.state_dict_load_full(
                _state_entries(self._net, self._is_local), state_dict, strict)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    # ---- more of smp v1's DistributedModel API -----------------------------

    @property
    def partitioned(self):
        """True once the model is split into its pipeline stages."""
        return self._partitioned

    def distributed_modules(self):
        """The tensor-parallel modules of the model (iterator)."""
        return (m for m in self.module.modules() if tp.is_dist_module(m))

    def is_distributed_buffer(self, buf):
        """False: smp's tensor-parallel modules hold no split buffers."""
        return False

    def is_scaled_batch_parameter(self, param):
        """True for parameters whose gradient already covers the tensor-parallel
        group's batch (those of tensor-parallel modules, averaged over RDP_GROUP):
        here the same as is_distributed_parameter."""
        return self.is_distributed_parameter(param)

    def is_scaled_batch_buffer(self, buf):
        """False (see is_distributed_buffer)."""
        return False

    def default_reducer_named_parameters(self):
        """(name, parameter) of the parameters averaged over DP_GROUP."""
        return ((n, p) for n, p in self._net.named_parameters()
                if not self.is_distributed_parameter(p))

    def scaled_batch_reducer_named_parameters(self):
        """(name, parameter) of the parameters averaged over RDP_GROUP."""
        return ((n, p) for n, p in self._net.named_parameters()
                if self.is_distributed_parameter(p))

    def cpu(self):
        raise _C.NotSupportedError(
            "smp.DistributedModel.cpu() (gather every rank's parameters onto the CPU) is not "
            "supported; get the full model with model.state_dict(gather_to_rank0=True) on the "
            "ranks with rdp_rank() == 0 and load it into an unwrapped module")

    def join(self, *args, **kwargs):
        raise _C.NotSupportedError(
            "smp.DistributedModel.join() (uneven inputs across data-parallel ranks) is not "
            "supported; give every rank the same number of batches (e.g. drop_last=True in the "
            "DataLoader with a DistributedSampler over dp_rank()/dp_size())")

    def register_comm_hook(self, state, hook):
        raise _C.NotSupportedError(
            "smp.DistributedModel.register_comm_hook is not supported: smp averages gradients "
            "in its own buckets (DP_GROUP / RDP_GROUP); modify gradients after "
            "model.backward() and before optimizer.step() instead")
