"""Differentiable collectives of tensor parallelism over an smp group
(TP_GROUP by default); each backward is the adjoint collective. Batch sizes and
split sizes may differ across members.

    rows = smp.nn.functional.gather_batch(x)                   # the TP group's batches
    y = smp.nn.functional.reduce_scatter_batch(partial, x.shape[0])
"""

from smp import _C
from smp._C import CommGroup

_F = _C.nn


def gather_batch(x, group=CommGroup.TP_GROUP):
    """Every member's x concatenated along dim 0 in group order. Backward: each
    member gets the sum over members of its own rows' gradients."""
    return _F.gather_batch(x, CommGroup(group))


def reduce_scatter_batch(x, local_batch, group=CommGroup.TP_GROUP):
    """x holds the rows of every member's batch in group order; returns the sum
    over members of this rank's ``local_batch`` rows. Backward: gathers."""
    return _F.reduce_scatter_batch(x, int(local_batch), CommGroup(group))


def reduce_from_group(x, group=CommGroup.TP_GROUP):
    """Sum over the group. Backward: identity."""
    return _F.reduce_from_group(x, CommGroup(group))


def copy_to_group(x, group=CommGroup.TP_GROUP):
    """Identity. Backward: sum of the gradients over the group."""
    return _F.copy_to_group(x, CommGroup(group))


def scatter_to_group(x, dim, group=CommGroup.TP_GROUP):
    """This rank's piece of x along ``dim`` (remainder to the lowest ranks).
    Backward: gathers the pieces' gradients."""
    return _F.scatter_to_group(x, int(dim), CommGroup(group))


def gather_from_group(x, dim, group=CommGroup.TP_GROUP):
    """Every member's x concatenated along ``dim``. Backward: this rank's piece."""
    return _F.gather_from_group(x, int(dim), CommGroup(group))


def allgather_along(x, dim, group=CommGroup.TP_GROUP):
    """Not differentiable: every member's x concatenated along ``dim``."""
    return _F.allgather_along(x, int(dim), CommGroup(group))
