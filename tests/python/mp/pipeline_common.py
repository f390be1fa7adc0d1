"""Shared by the pipeline test scripts of this folder: a buffers-only module,
the bytes a set of tensors holds, and the peak bytes of saved activations."""

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


class SavedActivationBytes:
    """Bytes of activations that autograd keeps for backward on this rank:
    installed with torch.autograd.graph.saved_tensors_hooks, it counts every
    saved tensor once (parameters excluded) from the forward that
    saves it until autograd frees the graph node holding it. `peak` is the
    largest total alive at once."""

    class _Held:
        def __init__(self, owner, key, tensor):
            self.owner, self.key, self.tensor = owner, key, tensor

        def __del__(self):
            self.owner._release(self.key)

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.refs = {}  # (data pointer, bytes) -> [bytes, references]
        self.alive = 0
        self.peak = 0

    def pack(self, t):
        if t.untyped_storage().data_ptr() in self.params or t.numel() == 0:
            return t
        # Per tensor view, not per storage: microbatches are views of one batch.
        nbytes = t.numel() * t.element_size()
        key = (t.data_ptr(), nbytes)
        entry = self.refs.setdefault(key, [nbytes, 0])
        if entry[1] == 0:
            self.alive += entry[0]
            self.peak = max(self.peak, self.alive)
        entry[1] += 1
        # detached: a tensor that an operation saves of its own output would
        # otherwise reference its graph node from inside it (a cycle that never
        # frees, for a branch that no backward runs through)
        return self._Held(self, key, t.detach())

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, SavedActivationBytes._Held) else held

    def _release(self, key):
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.alive -= entry[0]
            del self.refs[key]

    def measure(self, fn, *args):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            fn(*args)
        assert self.alive == 0, f"{self.alive} activation bytes still alive after the step"
        return self.peak
