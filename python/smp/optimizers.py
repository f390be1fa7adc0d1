"""smp.optimizers: smp v1's wrappers of apex's fused optimizers (FusedAdam,
FusedLamb, FusedNovoGrad). smp needs no special optimizer: any
torch.optim.Optimizer works with smp.DistributedOptimizer, so these names raise
smp.NotSupportedError naming the optimizer to build instead."""

from smp._compat import unsupported_class

FusedAdam = unsupported_class(
    "smp.optimizers.FusedAdam",
    "use torch.optim.Adam(params, fused=True) (or apex.optimizers.FusedAdam itself) and wrap it "
    "with smp.DistributedOptimizer")
FusedLamb = unsupported_class(
    "smp.optimizers.FusedLamb",
    "build apex.optimizers.FusedLAMB (any torch.optim.Optimizer works) and wrap it with "
    "smp.DistributedOptimizer")
FusedNovoGrad = unsupported_class(
    "smp.optimizers.FusedNovoGrad",
    "build apex.optimizers.FusedNovoGrad (any torch.optim.Optimizer works) and wrap it with "
    "smp.DistributedOptimizer")

__all__ = ["FusedAdam", "FusedLamb", "FusedNovoGrad"]
