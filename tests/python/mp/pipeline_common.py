"""Shared by the pipeline test scripts of this folder: a buffers-only module and
the bytes a set of tensors holds."""

import torch


class Shift(torch.nn.Module):
    """Adds a constant vector: a persistent and a non-persistent buffer, no
    parameters (a pipeline stage whose state is buffers only)."""

    def __init__(self, n, spread=0.1):
        super().__init__()
        self.register_buffer("offset", torch.linspace(-spread, spread, n))
        self.register_buffer("scratch", torch.zeros(n), persistent=False)

    def forward(self, x):
        return x + self.offset + self.scratch


def held_bytes(tensors):
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes():
            storages[(str(s.device), s.data_ptr())] = s.nbytes()
    return sum(storages.values())
