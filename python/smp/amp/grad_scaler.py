"""smp.amp.GradScaler: torch's GradScaler for a model split across ranks.

torch.amp.GradScaler skips optimizer.step() when this process's gradients hold
an inf or NaN. With pipeline and tensor parallelism each rank holds only part
of the gradients, and with sharded optimizer state the data-parallel ranks
step together (owners broadcast), so every rank must take the same decision:
this scaler combines the inf/NaN check over WORLD (a float max through smp's
communicator), so an overflow anywhere skips the step, and lowers the scale,
on every rank alike. unscale_ completes pending gradient averaging of a
smp.DistributedOptimizer before checking.

smp v1 combined the check over PP_GROUP; combining over WORLD also covers the
tensor-parallel parts of split parameters and keeps one scale for the job.
"""

import torch

from smp import _C, comm
from smp.optimizer import DistributedOptimizer
from smp._C import CommGroup, ReduceOp


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class GradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler whose inf/NaN check spans every rank (WORLD). Arguments as
    torch.cuda.amp.GradScaler (the positional order smp v1 took), plus
    ``device`` (default: "cuda" when available, else "cpu")."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True, device=None):
        super().__init__(device or _default_device(), init_scale=init_scale,
                         growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)

    def _local_device(self):
        if self._device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self._device)

    def unscale_(self, optimizer):
        """Completes pending gradient averaging (smp.DistributedOptimizer),
        unscales this rank's gradients, then combines the inf/NaN verdict over
        WORLD (collective: every rank calls it, through step() or directly)."""
        if not self._enabled:
            return
        if isinstance(optimizer, DistributedOptimizer):
            optimizer._smp_model._finish_grads()
        if self._scale is None:
            # Ranks whose stage does not compute the loss never called scale().
            self._lazy_init_scale_growth_tracker(self._local_device())
        super().unscale_(optimizer)
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        local = max((float(v.item()) for v in found.values()), default=0.0)
        flag = torch.tensor([local], dtype=torch.float32)
        if _C.is_initialized() and _C.size() > 1:
            comm.allreduce(flag, group=CommGroup.WORLD, op=ReduceOp.MAX)
        combined = float(flag.item())
        if not found:
            # No local parameter has a gradient (e.g. an empty stage).
            device = self._scale.device
            found[device] = torch.full((1,), combined, dtype=torch.float32, device=device)
        for v in found.values():
            v.fill_(combined)
