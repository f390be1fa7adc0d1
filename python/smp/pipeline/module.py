"""PipelineModule: runs this rank's pipeline stage of a chain of modules.

``PipelineModule(module)`` partitions ``module``'s top-level children over
pp_size() stages (smp.pipeline.partition) and keeps them all; this rank runs
only the children of its stage (``local_modules()``, ``local_parameters()``).
(smp.DistributedModel, which uses it, then releases the other stages' tensors.)
With pp_size() > 1 the model's forward is traced once with torch.fx (its
top-level children as leaves) and must be a chain: one tensor input, then
operations (submodule calls, torch functions, tensor methods) each taking only
the previous result; smp.NotSupportedError names the operation otherwise. Each
stage runs the operations from its first unit's call up to the next stage's
first unit (operations before any submodule call run on stage 0).

With pp_size() == 1 it is a transparent wrapper. ``backward(loss)`` inside an
smp.step records the microbatch's loss for the schedule; outside a step it is
``loss.backward()``. smp.DistributedModel uses the same engine hooks (see
smp.pipeline.engine).
"""

import torch

from smp import _C
from smp.pipeline import engine, partition


class PipelineModule(torch.nn.Module):
    def __init__(self, module):
        if not _C.is_initialized():
            raise _C.StateError("smp.pipeline.PipelineModule needs smp.init() first")
        super().__init__()
        self.module = module
        cfg = _C.config()
        self.num_stages = _C.pp_size()
        self.stage = _C.pp_rank()
        if self.num_stages > 1:
            order, steps = partition.trace_chain(module)
            self.plan = partition.plan(module, self.num_stages, bool(cfg["auto_partition"]),
                                       int(cfg["default_partition"]), order)
            stage_of = {n: s for n, _, s in self.plan}
            stage, self._steps = 0, []
            for node, unit in steps:
                if unit is not None:
                    stage = stage_of[unit]
                if stage == self.stage:
                    self._steps.append((node, unit))
        else:
            self.plan = [(n, c, 0) for n, c in module.named_children()]
            self._steps = None
        self._local = [(n, c) for n, c, s in self.plan if s == self.stage]
        #: Names of this stage's top-level children.
        self.local_names = frozenset(n for n, _ in self._local)

    def stage_assignment(self):
        """{child name: stage}."""
        return {n: s for n, _, s in self.plan}

    def _run_stage(self, x):
        return partition.run_steps(self.module, self._steps, x)

    def forward(self, *args, **kwargs):
        if self.num_stages == 1:
            return self.module(*args, **kwargs)
        return engine.stage_forward(self._run_stage, args, kwargs)

    def backward(self, tensor, grad_tensors=None):
        ctx = engine.current_step()
        if ctx is not None:
            ctx.record_backward(tensor, grad_tensors)
        else:
            torch.autograd.backward(tensor, grad_tensors)

    def local_modules(self):
        if self.num_stages == 1:
            return [self.module]
        return [c for _, c in self._local]

    def local_parameters(self):
        if self.num_stages == 1:
            return list(self.module.parameters())
        return [p for _, c in self._local for p in c.parameters()]

    def _smp_stage_device(self):
        for p in self.local_parameters():
            return p.device
        return torch.device("cpu")
