# mpirun -np N (1, 2 or 4): smp v1's tensor-parallel API beyond the layers,
# for every tp degree that divides N (ddp on, the rest rdp):
# - a GPT-2-style model whose lm_head shares its weight with the word
#   embedding, marked by smp.tensor_parallelism() (with keywords that only some
#   replacements accept) or smp.set_tensor_parallelism(): the tied pair stays
#   replicated and tied, the rest is split, two SGD steps equal plain PyTorch,
#   and the gathered full state dict has wte == lm_head;
# - smp.nn.DistributedAttentionLayer (self and cross), DistributedTransformerOutputLayer,
#   DistributedTransformer and DistributedTransformerLMHead against plain-PyTorch
#   references (forward, input and parameter gradients), prescaled_batch off and on;
# - vocab-parallel DistributedEmbedding with an out-of-range id raises on every rank.
import math
import os

import torch
import torch.nn.functional as F

import smp
from smp import _C

ATOL = 1e-5
V, H = 11, 6


def close(a, b, what):
    assert a.shape == b.shape, (what, tuple(a.shape), tuple(b.shape))
    err = (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0
    scale = b.detach().abs().max().item() if b.numel() else 0.0
    assert err <= ATOL + 1e-5 * scale, f"{what} differs by {err} on rank {smp.rank()}"


# ---- tied weights ----------------------------------------------------------------

class GPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(V, H)
        self.wpe = torch.nn.Embedding(5, H)
        self.fc = torch.nn.Linear(H, 2 * H)
        self.proj = torch.nn.Linear(2 * H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]).expand_as(ids))
        return self.lm_head(h + self.proj(torch.tanh(self.fc(h))))


def make_gpt(seed, marking):
    torch.manual_seed(seed)
    if marking == "context":
        # attention_in_fp32 is a transformer-layer keyword and vocab_parallel an
        # embedding one: each replacement takes only what it accepts.
        with smp.tensor_parallelism(attention_in_fp32=True, vocab_parallel=True):
            return GPT()
    net = GPT()
    if marking == "set":
        smp.set_tensor_parallelism(net, attention_in_fp32=True, vocab_parallel=True)
    return net


def tie_case(tp, marking):
    smp.init({"tensor_parallel_degree": tp, "ddp": True})
    where = f"tie tp {tp} rdp {smp.rdp_size()} marking {marking}"
    ref = make_gpt(7, None)
    model = smp.DistributedModel(make_gpt(7 + smp.rank(), marking))
    m = model.get_module()
    assert m.lm_head.weight is m.wte.weight, where
    assert type(m.wte) is torch.nn.Embedding and type(m.lm_head) is torch.nn.Linear, where
    if tp > 1:
        assert isinstance(m.fc, smp.nn.DistributedLinear), (where, type(m.fc))
        assert isinstance(m.wpe, smp.nn.DistributedEmbedding) and m.wpe.vocab_parallel, where
        assert smp.utils.get_distribution_axis(m.fc.weight) == 1, where
        assert smp.utils.get_distribution_axis(m.wpe.weight) == 0, where
    assert smp.utils.get_distribution_axis(m.wte.weight) is None, where
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    rows = slice(2 * smp.dp_rank(), 2 * smp.dp_rank() + 2)
    for step in range(2):
        g = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(V, (2 * smp.dp_size(), 5), generator=g)
        labels = torch.randint(V, (2 * smp.dp_size(), 5), generator=g)
        ref_out = ref(ids[rows]).detach()
        ref_opt.zero_grad()
        F.cross_entropy(ref(ids).reshape(-1, V), labels.reshape(-1)).backward()
        ref_opt.step()
        opt.zero_grad()
        out = model(ids[rows])
        close(out, ref_out, f"{where} step {step} logits")
        model.backward(F.cross_entropy(out.reshape(-1, V), labels[rows].reshape(-1)))
        opt.step()
    assert m.lm_head.weight is m.wte.weight, where
    close(m.wte.weight, ref.wte.weight, f"{where} wte after 2 steps")
    sd = model.state_dict(gather_to_rank0=True)
    if smp.rank() == 0:
        assert torch.equal(sd["wte.weight"], sd["lm_head.weight"]), where
        for k, v in ref.state_dict().items():
            close(sd[k], v, f"{where} gathered {k}")
    smp.shutdown()


# ---- transformer modules ------------------------------------------------------------

def ln(hidden):
    return torch.nn.LayerNorm(hidden, eps=1e-5)


class RefAttention(torch.nn.Module):
    def __init__(self, heads, hd, hidden, pre, post, causal, cross=False):
        super().__init__()
        self.heads, self.hd, self.pre, self.post, self.causal, self.cross = (
            heads, hd, pre, post, causal, cross)
        for n in ("query", "key", "value"):
            setattr(self, n, torch.nn.Linear(hidden, heads * hd))
        self.dense = torch.nn.Linear(heads * hd, hidden)
        if pre:
            self.pre_layernorm = ln(hidden)
        if post:
            self.layernorm = ln(hidden)

    def forward(self, inputs):
        if self.cross:
            x, c, mask = inputs
        else:
            (x, mask), c = inputs, None
        b, s, _ = x.shape
        h = self.pre_layernorm(x) if self.pre else x
        kv = h if c is None else c
        split = lambda t: t.reshape(b, t.shape[1], self.heads, self.hd).transpose(1, 2)  # noqa
        q, k, v = split(self.query(h)), split(self.key(kv)), split(self.value(kv))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        if self.causal and not self.cross:
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        if mask is not None:
            scores = scores + mask
        out = x + self.dense((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1))
        return self.layernorm(out) if self.post else out


class RefOutput(torch.nn.Module):
    def __init__(self, hidden, inter, pre, post):
        super().__init__()
        self.pre, self.post = pre, post
        self.dense1 = torch.nn.Linear(hidden, inter)
        self.dense2 = torch.nn.Linear(inter, hidden)
        if pre:
            self.pre_layernorm = ln(hidden)
        if post:
            self.layernorm = ln(hidden)

    def forward(self, x):
        h = self.pre_layernorm(x) if self.pre else x
        out = x + self.dense2(F.gelu(self.dense1(h)))
        return self.layernorm(out) if self.post else out


class RefLayer(torch.nn.Module):
    def __init__(self, heads, hd, hidden, inter, pre, post, causal):
        super().__init__()
        self.attention = RefAttention(heads, hd, hidden, pre, post and not pre, causal)
        self.output = RefOutput(hidden, inter, pre, post)

    def forward(self, inputs):
        x, mask = inputs
        return self.output(self.attention((x, mask))), mask


class RefTransformer(torch.nn.Module):
    def __init__(self, n, heads, hd, hidden, inter, pre, post, causal):
        super().__init__()
        self.seq_layers = torch.nn.Sequential(*[
            RefLayer(heads, hd, hidden, inter, pre, post and (not pre or i == n - 1), causal)
            for i in range(n)])

    def forward(self, inputs):
        return self.seq_layers(inputs)


class RefLMHead(torch.nn.Module):
    def __init__(self, n, heads, hd, hidden, inter, vocab, positions, pre, post):
        super().__init__()
        self.word_embedding = torch.nn.Embedding(vocab, hidden)
        self.position_embedding = torch.nn.Embedding(positions, hidden)
        self.transformer = RefTransformer(n, heads, hd, hidden, inter, pre, post, True)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.word_embedding.weight

    def forward(self, inputs):
        ids, mask, _, _, labels = inputs
        h = self.word_embedding(ids) + self.position_embedding(torch.arange(ids.shape[1]))
        m = (1.0 - mask[:, None, None, :].float()) * -10000.0
        h, _ = self.transformer((h, m))
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1))
        return loss, logits


def batch_of(m):
    return 1 + m % 2


def rows(prescaled, rest, seed, fn=None):
    """(the reference's rows, this rank's rows)"""
    fn = fn or (lambda s, sd: torch.randn(s, generator=torch.Generator().manual_seed(sd)))
    if prescaled:
        t = fn((3, *rest), seed)
        return t, t
    parts = [fn((batch_of(m), *rest), seed + m) for m in range(smp.tp_size())]
    return torch.cat(parts), parts[smp.tp_rank()]


def mine(t, prescaled):
    if prescaled:
        return t
    off = sum(batch_of(m) for m in range(smp.tp_rank()))
    return t[off:off + batch_of(smp.tp_rank())]


def leaf(t):
    return t.clone().requires_grad_(t.is_floating_point())


def perturb(ref):
    # Same on every rank: dropout in train-mode forwards leaves ranks' torch
    # generators apart.
    torch.manual_seed(11)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)


def load(dist, ref):
    full = dist._smp_full_param_names()
    ref_names = dict(ref.named_parameters(remove_duplicate=False))
    assert set(full) == set(ref_names), sorted(set(full) ^ set(ref_names))
    for n, p in ref_names.items():
        dist._smp_load_full(n, p.detach())


def layout_slice(dist, name, full):
    part, local = dist, name
    while isinstance(part, smp.nn.DistributedContainer):
        part, local = part._smp_route(local)
    if part is None:
        return full
    return _C.nn.local_slice(part._smp_layout(local), full, smp.tp_size(), smp.tp_rank())


def check_grads(dist, ref, prescaled, what):
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    specs = dist._smp_shard_specs()
    assert set(specs) == {n for n, _ in dist.named_parameters()}, (what, sorted(specs))
    for name, p in dist.named_parameters():
        got = p.grad.clone()
        if not specs[name]["distributed"] and not prescaled:
            smp.comm.allreduce(got, smp.TP_GROUP)
        close(got, layout_slice(dist, name, ref_grads[name]), f"{what} grad of {name}")
    for name, p in ref.named_parameters():
        close(dist._smp_gather_full(name), p, f"{what} gather_full {name}")


def transformer_case(tp, prescaled):
    smp.init({"tensor_parallel_degree": tp, "ddp": True, "prescaled_batch": prescaled})
    what = f"tp {tp} prescaled {prescaled}"
    heads, hd, hidden, inter, s = 2 * tp, 3, 8, 10, 4
    for pre, post in ((False, True), (True, False), (True, True)):
        w = f"{what} pre {pre} post {post}"
        torch.manual_seed(3)
        x_all, x = rows(prescaled, (s, hidden), 50)
        g_all, _ = rows(prescaled, (s, hidden), 60)
        m_all, m = rows(prescaled, (1, 1, s), 70)
        mask_all, mask = ((t > 0.7).float() * -10000.0 for t in (m_all, m))
        c_all, c = rows(prescaled, (s + 1, hidden), 80)
        cmask_all, cmask = (t[..., :1].expand(*t.shape[:-1], s + 1).contiguous() * 0
                            for t in (mask_all, mask))
        cases = [
            ("attention", RefAttention(heads, hd, hidden, pre, post, True),
             smp.nn.DistributedAttentionLayer(heads, hd, hidden, 0.3, 0.3, causal_mask_size=s,
                                              pre_layernorm=pre, post_layernorm=post),
             lambda mod, xx, local: mod((xx, mask if local else mask_all))),
            ("cross attention", RefAttention(heads, hd, hidden, pre, post, False, cross=True),
             smp.nn.DistributedAttentionLayer(heads, hd, hidden, cross_attention=True,
                                              pre_layernorm=pre, post_layernorm=post,
                                              attention_in_fp32=True),
             lambda mod, xx, local: mod((xx, c if local else c_all,
                                         cmask if local else cmask_all))),
            ("output", RefOutput(hidden, inter, pre, post),
             smp.nn.DistributedTransformerOutputLayer(hidden, inter, 0.3, pre_layernorm=pre,
                                                      post_layernorm=post),
             lambda mod, xx, local: mod(xx)),
            ("transformer", RefTransformer(3, heads, hd, hidden, inter, pre, post, True),
             smp.nn.DistributedTransformer(3, heads, hd, hidden, inter, causal_mask_size=s,
                                           pre_layernorm=pre, post_layernorm=post),
             lambda mod, xx, local: mod((xx, mask if local else mask_all))[0]),
        ]
        for name, ref, dist, fwd in cases:
            perturb(ref)
            load(dist, ref)
            dist.eval()
            xl, xa = leaf(x), leaf(x_all)
            out, expected = fwd(dist, xl, True), fwd(ref, xa, False)
            close(out, mine(expected, prescaled), f"{w} {name} forward")
            out.backward(mine(g_all, prescaled))
            expected.backward(g_all)
            close(xl.grad, mine(xa.grad, prescaled), f"{w} {name} input grad")
            check_grads(dist, ref, prescaled, f"{w} {name}")
            dist.train()
            assert fwd(dist, x, True).shape == x.shape

    # The LM head: loss and logits on this rank's rows, parameter gradients.
    vocab, positions = 13, 6
    torch.manual_seed(5)
    ref = RefLMHead(2, heads, hd, hidden, inter, vocab, positions, True, True)
    perturb(ref)
    lm = smp.nn.DistributedTransformerLMHead(
        num_layers=2, num_attention_heads=heads, attention_head_size=hd, hidden_size=hidden,
        intermediate_size=inter, vocab_size=vocab, num_positions=positions,
        causal_mask_size=positions, pre_layernorm=True, post_layernorm=True)
    assert lm.lm_head.weight is lm.word_embedding.weight
    load(lm, ref)
    lm.eval()
    randint = lambda sh, sd: torch.randint(vocab, sh, generator=torch.Generator().manual_seed(sd))  # noqa
    ids_all, ids = rows(prescaled, (5,), 90, randint)
    am_all, am = rows(prescaled, (5,), 95, lambda sh, sd: (torch.rand(
        sh, generator=torch.Generator().manual_seed(sd)) > 0.3).long())
    lab_all, lab = rows(prescaled, (5,), 99, randint)
    loss, logits = lm((ids, am, None, None, lab))
    ref_loss, ref_logits = ref((ids_all, am_all, None, None, lab_all))
    close(logits, mine(ref_logits, prescaled), f"{what} lm head logits")
    local_ref_loss, _ = ref((mine(ids_all, prescaled), mine(am_all, prescaled), None, None,
                             mine(lab_all, prescaled)))
    close(loss, local_ref_loss, f"{what} lm head loss")
    g_all, _ = rows(prescaled, (5, vocab), 97)
    ref.zero_grad()
    logits.backward(mine(g_all, prescaled))
    ref_logits.backward(g_all)
    check_grads(lm, ref, prescaled, f"{what} lm head")
    smp.shutdown()


def errors_case(tp):
    smp.init({"tensor_parallel_degree": tp, "ddp": True})
    emb = smp.nn.DistributedEmbedding(7, 4, vocab_parallel=True)
    bad = 7 + smp.tp_rank() if smp.tp_rank() == tp - 1 else 3
    try:
        emb(torch.tensor([[0, bad]]))
        raise AssertionError("an out-of-range id did not raise")
    except smp.ConfigError as e:
        # Every rank raises (no hang): it names the id and the vocabulary.
        assert f"index {7 + tp - 1} is out of range for a vocabulary of 7 embeddings" in str(e), e
    try:
        emb(torch.tensor([[-1]]))
        raise AssertionError("a negative id did not raise")
    except smp.ConfigError as e:
        assert "index -1 is out of range" in str(e), e
    if tp > 1:
        for build in (lambda: smp.nn.DistributedAttentionLayer(tp + 1, 2, 4),
                      lambda: smp.nn.DistributedTransformer(2, tp + 1, 2, 4, 4)):
            try:
                build()
                raise AssertionError("uneven heads did not raise")
            except smp.ConfigError as e:
                assert f"num_attention_heads ({tp + 1}) must be divisible by " \
                       f"tensor_parallel_degree ({tp})" in str(e), e
    smp.shutdown()


def main():
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    for tp in (1, 2, 4):
        if world % tp:
            continue
        for marking in ("context", "set"):
            tie_case(tp, marking)
        for prescaled in (False, True):
            transformer_case(tp, prescaled)
        errors_case(tp)
    print(f"tp_v1 OK {os.environ.get('OMPI_COMM_WORLD_RANK', '0')}", flush=True)


if __name__ == "__main__":
    main()
