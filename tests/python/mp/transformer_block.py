"""A pre-LayerNorm transformer layer in plain torch (no smp), with the
parameter names of smp.nn.DistributedTransformerLayer: the reference model of
model_equivalence.py, the layer reshard.py replaces under tp > 1, and part of
test_checkpoint_cli.py's unwrapped model."""

import math

import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    """A pre-LayerNorm transformer layer with the parameter names of
    smp.nn.DistributedTransformerLayer, which replaces it under tp > 1:
    query/key/value and output.dense1 split by output, attention.dense and
    output.dense2 by input (their biases on tp rank 0 only), LayerNorms
    replicated; intermediate 10 is uneven under tp 4. No dropout."""

    def __init__(self, hidden=8, heads=4, head_size=2, inter=10):
        super().__init__()
        self.heads, self.hd = heads, head_size
        a = heads * head_size
        self.attention = torch.nn.Module()
        self.attention.pre_layernorm = torch.nn.LayerNorm(hidden, eps=1e-5)
        for name in ("query", "key", "value"):
            setattr(self.attention, name, torch.nn.Linear(hidden, a))
        self.attention.dense = torch.nn.Linear(a, hidden)
        self.output = torch.nn.Module()
        self.output.pre_layernorm = torch.nn.LayerNorm(hidden, eps=1e-5)
        self.output.dense1 = torch.nn.Linear(hidden, inter)
        self.output.dense2 = torch.nn.Linear(inter, hidden)

    def forward(self, x):
        b, s, _ = x.shape
        at = self.attention
        h = at.pre_layernorm(x)
        split = lambda t: t.reshape(b, s, self.heads, self.hd).transpose(1, 2)  # noqa: E731
        q, k, v = split(at.query(h)), split(at.key(h)), split(at.value(h))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
        r1 = x + at.dense(ctx)
        out = self.output
        return r1 + out.dense2(F.gelu(out.dense1(out.pre_layernorm(r1))))
