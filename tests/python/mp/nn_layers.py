# mpirun -np N (1, 2 or 4): smp.nn modules against plain torch modules on the
# union of the TP group's batches, for every tp degree that divides N, with
# prescaled_batch off and on; from_module and _smp_gather_full round trips.
import math

import torch
import torch.nn.functional as F

import smp
from smp import _C

try:
    smp.nn.DistributedLinear(4, 3)
    raise AssertionError("DistributedLinear before smp.init did not raise")
except smp.StateError as e:
    assert "smp.nn.DistributedLinear needs smp.init() first" in str(e), e


class TransformerReference(torch.nn.Module):
    """The non-distributed layer, with the parameter names of DistributedTransformerLayer."""

    def __init__(self, heads, head_size, hidden, inter, pre, post, causal):
        super().__init__()
        self.heads, self.hd, self.pre, self.post, self.causal = heads, head_size, pre, post, causal
        a = heads * head_size
        self.attention = torch.nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention, name, torch.nn.Linear(hidden, a))
        self.attention.dense = torch.nn.Linear(a, hidden)
        self.output = torch.nn.Module()
        self.output.dense1 = torch.nn.Linear(hidden, inter)
        self.output.dense2 = torch.nn.Linear(inter, hidden)
        for sub in (self.attention, self.output):
            if pre:
                sub.pre_layernorm = torch.nn.LayerNorm(hidden, eps=1e-5)
            # smp v1: with pre and post, only the output sublayer has a post LayerNorm.
            if post and (sub is self.output or not pre):
                sub.layernorm = torch.nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        at = self.attention
        h = at.pre_layernorm(x) if self.pre else x
        split = lambda t: t.reshape(b, s, self.heads, self.hd).transpose(1, 2)  # noqa: E731
        q, k, v = split(at.query(h)), split(at.key(h)), split(at.value(h))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        if self.causal:
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        if mask is not None:
            scores = scores + mask
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
        r1 = x + at.dense(ctx)
        if self.post and not self.pre:
            r1 = at.layernorm(r1)
        out = self.output
        h = out.pre_layernorm(r1) if self.pre else r1
        y = r1 + out.dense2(F.gelu(out.dense1(h)))
        return out.layernorm(y) if self.post else y


def batch_of(m):
    return 1 + m % 3


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def batch(prescaled, rest, seed, fn=randn):
    """(what the reference sees, what this rank passes)"""
    if prescaled:
        t = fn((3, *rest), seed)
        return t, t
    parts = [fn((batch_of(m), *rest), seed + m) for m in range(smp.tp_size())]
    return torch.cat(parts), parts[smp.tp_rank()]


def mine(all_rows, prescaled):
    if prescaled:
        return all_rows
    off = sum(batch_of(m) for m in range(smp.tp_rank()))
    return all_rows[off:off + batch_of(smp.tp_rank())]


def close(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (what, (a - b).abs().max().item())


def check(dist, ref, x_local, x_all, g_all, prescaled, what, forward=None):
    """Forward and backward of dist on this rank vs ref on the union; every
    parameter gradient vs this rank's slice of the reference's."""
    forward = forward or (lambda m, x: m(x))
    out = forward(dist, x_local)
    expected = forward(ref, x_all)
    close(out, mine(expected, prescaled), what + " forward")
    out.backward(mine(g_all, prescaled))
    expected.backward(g_all)
    if x_local.is_floating_point():
        close(x_local.grad, mine(x_all.grad, prescaled), what + " input grad")
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    specs = dist._smp_shard_specs()
    assert set(specs) == {n for n, _ in dist.named_parameters()}, (what, specs)
    for name, p in dist.named_parameters():
        got = p.grad.clone()
        if not specs[name]["distributed"] and not prescaled:
            smp.comm.allreduce(got, smp.TP_GROUP)
        layout = dist._smp_layout(name)
        want = _C.nn.local_slice(layout, ref_grads[name], smp.tp_size(), smp.tp_rank())
        close(got, want, f"{what} grad of {name}")
    for name, ref_p in ref.named_parameters():
        close(dist._smp_gather_full(name), ref_p.detach(), f"{what} gather_full {name}")


def load_from(dist, ref):
    assert set(dist._smp_full_param_names()) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        dist._smp_load_full(name, p.detach())


def leaf(t):
    return t.clone().requires_grad_(t.is_floating_point())


def run(tp, prescaled):
    what = f"tp {tp} prescaled {prescaled}"
    r = smp.tp_rank()

    for in_features in (10, 16):
        torch.manual_seed(1)
        lin = torch.nn.Linear(in_features, 5)
        dist = smp.nn.DistributedLinear.from_module(lin)
        assert isinstance(dist, smp.nn.DistributedModule)
        assert list(dist.state_dict()) == (["weight", "bias"] if r == 0 else ["weight"])
        assert (dist.bias is None) == (r != 0)
        spec = dist._smp_shard_specs()["weight"]
        assert spec["global_shape"] == (5, in_features)
        assert spec["split_dim"] == (1 if tp > 1 else None)
        sizes = [in_features // tp + (m < in_features % tp) for m in range(tp)]
        assert tuple(dist.weight.shape) == (5, sizes[r]), dist.weight.shape
        full_names = dist._smp_full_param_names()
        assert full_names["bias"] == {"global_shape": (5,), "split_dim": None, "holder": 0}
        assert full_names["weight"]["split_dim"] == 1
        x_all, x = batch(prescaled, (2, in_features), 10)
        g_all, _ = batch(prescaled, (2, 5), 20)
        check(dist, lin, leaf(x), leaf(x_all), g_all, prescaled, f"{what} linear {in_features}")

    # Fresh modules: the same seed gives slices of one full init everywhere.
    a = smp.nn.DistributedLinear(7, 3, seed=5)
    b = smp.nn.DistributedLinear(7, 3, seed=5)
    assert torch.equal(a._smp_gather_full("weight"), b._smp_gather_full("weight"))
    full = smp.allgather(a._smp_gather_full("weight"), smp.WORLD)
    assert all(torch.equal(full[0], t) for t in full)

    for vocab_parallel in (False, True):
        torch.manual_seed(2)
        emb = torch.nn.Embedding(11, 6, padding_idx=9)
        dist = smp.nn.DistributedEmbedding.from_module(emb, vocab_parallel=vocab_parallel)
        assert dist.padding_idx == 9
        assert dist._smp_shard_specs()["weight"]["split_dim"] == (
            None if tp == 1 else (0 if vocab_parallel else 1))
        ids_all, ids = batch(prescaled, (4,), 30,
                             fn=lambda s, seed: torch.randint(
                                 11, s, generator=torch.Generator().manual_seed(seed)))
        ids_all[0, 0] = 9
        if prescaled or r == 0:
            ids[0, 0] = 9
        g_all, _ = batch(prescaled, (4, 6), 40)
        check(dist, emb, ids, ids_all, g_all, prescaled, f"{what} embedding vp {vocab_parallel}")
        fresh = smp.nn.DistributedEmbedding(11, 6, padding_idx=-2, vocab_parallel=vocab_parallel)
        assert fresh.padding_idx == 9
        assert torch.equal(fresh._smp_gather_full("weight")[9], torch.zeros(6))

    for pre, post, causal, use_mask in ((False, True, False, True), (True, False, True, False),
                                        (True, True, False, True)):
        heads, hd, hidden, inter = 2 * tp, 3, 8, 10
        torch.manual_seed(3)
        ref = TransformerReference(heads, hd, hidden, inter, pre, post, causal)
        with torch.no_grad():  # non-trivial LayerNorm parameters and biases
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        dist = smp.nn.DistributedTransformerLayer(
            num_attention_heads=heads, attention_head_size=hd, hidden_size=hidden,
            intermediate_size=inter, attention_dropout_prob=0.2, hidden_dropout_prob=0.2,
            pre_layernorm=pre, post_layernorm=post, causal_mask_size=5 if causal else None)
        dist.eval()
        load_from(dist, ref)
        x_all, x = batch(prescaled, (5, hidden), 50)
        g_all, _ = batch(prescaled, (5, hidden), 60)
        mask_all = mask = None
        if use_mask:
            m_all, m = batch(prescaled, (1, 1, 5), 70)
            mask_all, mask = ((t > 0.8).float() * -10000.0 for t in (m_all, m))
        masks = {id(dist): mask, id(ref): mask_all}
        check(dist, ref, leaf(x), leaf(x_all), g_all, prescaled,
              f"{what} transformer pre {pre} post {post}",
              forward=lambda mod, t: mod(t, masks[id(mod)]))
        out, m_back = dist((x, mask))  # smp v1's tuple form
        assert m_back is mask
        close(out, dist(x, mask), "tuple form")
        dist.train()
        assert dist(x, mask).shape == x.shape

    try:
        smp.nn.DistributedEmbedding(4, 2, padding_idx=4, vocab_parallel=True)
        raise AssertionError("padding_idx outside the vocabulary did not raise")
    except smp.ConfigError as e:
        assert "padding_idx 4 is outside the vocabulary of 4 embeddings" in str(e), e
    try:
        dist._smp_load_full("attention.query.weight", torch.zeros(3))
        raise AssertionError("a wrong shape did not raise")
    except smp.ConfigError as e:
        assert "expected the full parameter of shape" in str(e), e
    if tp > 1:
        try:
            smp.nn.DistributedTransformerLayer(num_attention_heads=tp + 1, attention_head_size=2,
                                               hidden_size=4, intermediate_size=4)
            raise AssertionError("uneven heads did not raise")
        except smp.ConfigError as e:
            assert "must be divisible by tensor_parallel_degree" in str(e), e


world = int(__import__("os").environ.get("OMPI_COMM_WORLD_SIZE", "1"))
for tp in (1, 2, 4):
    if world % tp:
        continue
    for prescaled in (False, True):
        smp.init({"tensor_parallel_degree": tp, "ddp": world > 1, "prescaled_batch": prescaled})
        run(tp, prescaled)
        rank = smp.rank()
        smp.shutdown()
print(f"nn_layers OK {rank}", flush=True)
