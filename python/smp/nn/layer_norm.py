"""smp.nn.FusedLayerNorm: smp v1's LayerNorm (apex's FusedLayerNorm there),
computed with torch's layer_norm here: same constructor, parameters
(``weight``, ``bias``) and results."""

import torch


class FusedLayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm with smp v1's (apex's) constructor:
    ``FusedLayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True)``.
    ``memory_efficient`` (apex) is accepted and changes nothing. The module is
    replicated across tensor-parallel ranks, as in smp v1.

        ln = smp.nn.FusedLayerNorm(1024, eps=1e-5)
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True,
                 memory_efficient=False, *, bias=True, device=None, dtype=None):
        del memory_efficient
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         bias=bias, device=device, dtype=dtype)
