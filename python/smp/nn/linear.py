"""smp.nn.DistributedLinear: torch.nn.Linear split along the input dimension."""

import torch

from smp import _C
from smp._runtime import tp_rank, tp_size
from smp.nn.base import DistributedModule, _require_init


class DistributedLinear(DistributedModule):
    """torch.nn.Linear(in_features, out_features, bias) across TP_GROUP.

    Every tp rank holds ``weight[:, in_slice]`` (uneven splits give the extra
    input features to the lowest tp ranks); ``bias`` lives on tp rank 0 only
    (it is None elsewhere). With prescaled_batch off each tp rank passes its own
    batch ``[b, ..., in_features]`` and gets its own rows back; with it on the
    group shares one batch. Parameters start as one full torch.nn.Linear
    initialization drawn from ``seed`` (None: drawn from torch's generator, so
    seed torch alike on every rank).

        smp.init({"tensor_parallel_degree": 2, "ddp": True})
        fc = smp.nn.DistributedLinear(1024, 4096)
        y = fc(x)
    """

    def __init__(self, in_features, out_features, bias=True, seed=None, dtype=None, device=None):
        _require_init(type(self).__name__)
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._smp_build(
            _C.nn.linear_layout(self.in_features, self.out_features, bool(bias)), seed, dtype, device
        )
        if not hasattr(self, "bias"):
            self.register_parameter("bias", None)
        self._in_offset = self._smp_layout("weight").offset(tp_size(), tp_rank())

    def forward(self, x):
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise _C.ConfigError(
                f"DistributedLinear: the input has shape {tuple(x.shape)} but in_features is "
                f"{self.in_features}"
            )
        return _C.nn.linear_forward(
            x, self.weight, self.bias, self._in_offset, self._smp_prescaled_batch
        )

    @classmethod
    def from_module(cls, module):
        """A DistributedLinear holding this rank's slices of ``module``'s
        (a torch.nn.Linear) weight and bias, same dtype and device."""
        if not isinstance(module, torch.nn.Linear):
            raise _C.ConfigError(
                f"DistributedLinear.from_module expects a torch.nn.Linear, got {type(module).__name__}"
            )
        out = cls(module.in_features, module.out_features, bias=module.bias is not None, seed=0,
                  dtype=module.weight.dtype, device=module.weight.device)
        out._smp_load_full("weight", module.weight)
        if module.bias is not None:
            out._smp_load_full("bias", module.bias)
        return out

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={'bias' in self._smp_layouts}, tp_rank={tp_rank()}/{tp_size()}")
