"""smp v1's ``smdistributed.modelparallel.torch.utils`` helpers used by
training scripts and framework integrations (fp16 gradient-norm code asks
which parameters are split across TP_GROUP).

    from smdistributed.modelparallel.torch.utils import get_distribution_axis
    axis = get_distribution_axis(param)   # 0 / 1 ... for split tensors, else None
"""

import torch

from smp import _C, _state

_AXIS_ATTR = "_smp_distribution_axis"


def get_distribution_axis(obj):
    """The dimension along which the tensor ``obj`` is split across TP_GROUP
    (a shard of a tensor-parallel module's parameter), or None for tensors that
    are not split: replicated parameters, parameters held by one tp rank (a
    row-parallel bias), buffers, other objects, and everything when
    tensor_parallel_degree is 1."""
    if not isinstance(obj, torch.Tensor):
        return None
    axis = getattr(obj, _AXIS_ATTR, None)
    if axis is not None:
        return axis if _C.is_initialized() and _C.tp_size() > 1 else None
    # A parameter that lost the mark (re-created by the user): the wrapped
    # model's recorded specs.
    model = _state.current_model()
    if model is None:
        return None
    for name, p in model.get_module().named_parameters():
        if p is obj:
            return model.param_spec(name)["split_dim"]
    return None


def mark_distribution_axis(tensor, axis):
    """Records that ``tensor`` is split along ``axis`` across TP_GROUP (None:
    not split); smp.nn modules call it for their parameters."""
    setattr(tensor, _AXIS_ATTR, None if axis is None or axis < 0 else int(axis))
    return tensor
