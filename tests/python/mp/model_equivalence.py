# mpirun -np N (1, 2 or 4): smp.DistributedModel + smp.DistributedOptimizer,
# with the real tensor-parallel layers of smp.nn, train like plain
# single-process PyTorch on the same global batch: every (tp, rdp) grid of the
# world, SGD(momentum) and Adam, shard_optimizer_state off and on,
# prescaled_batch off and on (all 8 combinations per grid), 5 steps, fp32,
# atol 1e-5; plus state dicts (full, partial, fresh-model reload), optimizer
# state dicts and error texts. One process runs every case (smp.init /
# smp.shutdown per case).
#
# The model is built from plain torch modules: Embedding -> Block (a user
# transformer block registered with smp.tp_register_with_module ->
# smp.nn.DistributedTransformerLayer) -> Linear -> GELU -> Linear -> LayerNorm
# -> Linear head. Two ways of marking, alternating over the cases:
#   "context": the whole net is created inside `with smp.tensor_parallelism():`
#              (every Linear, the Embedding and the Block are replaced);
#   "set":     created plain, then smp.set_tensor_parallelism(net.mlp) and
#              smp.set_tensor_parallelism(net.emb, vocab_parallel=True); the
#              Block and the head stay replicated.
# Sizes are chosen so that tp 4 splits unevenly (hidden 10, vocab 13).
#
# MODEL_EQUIVALENCE_DEVICE=cuda runs on GPU local_rank (NCCL; tests/python/gpu).
import os
import sys
import traceback
import warnings

import torch
import torch.nn.functional as F

import smp
from smp import _C
from transformer_block import Block

STEPS = 5
ATOL = 1e-5
LOCAL_BATCH = 2
SEQ = 3
VOCAB, HIDDEN, HEADS, HEAD_SIZE, INTER, CLASSES = 13, 10, 4, 2, 12, 5
ON_CUDA = os.environ.get("MODEL_EQUIVALENCE_DEVICE", "cpu") == "cuda"


def device():
    return torch.device("cuda", smp.local_rank()) if ON_CUDA else torch.device("cpu")


# ---- the model -----------------------------------------------------------------

def block_init_hook(hidden, heads, head_size, inter):
    """Block's constructor arguments -> DistributedTransformerLayer's."""
    return (), dict(num_attention_heads=heads, attention_head_size=head_size, hidden_size=hidden,
                    intermediate_size=inter, attention_dropout_prob=0.0, hidden_dropout_prob=0.0,
                    activation="gelu", pre_layernorm=True, post_layernorm=False, seed=0)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.block = Block(HIDDEN, HEADS, HEAD_SIZE, INTER)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 4 * HIDDEN), torch.nn.GELU(),
                                       torch.nn.Linear(4 * HIDDEN, HIDDEN))
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, CLASSES)
        self.register_buffer("scale", torch.tensor([1.5]))

    def forward(self, ids):
        h = self.block(self.emb(ids))
        return self.head(self.norm(h + self.mlp(h))) * self.scale


def make_net(seed, marking=None):
    """The full model from `seed`; marking None (plain), "context" or "set"."""
    torch.manual_seed(seed)
    if marking == "context":
        with smp.tensor_parallelism():
            net = Net()
    else:
        net = Net()
    with torch.no_grad():  # non-trivial LayerNorm parameters
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.3)
                m.bias.add_(torch.randn_like(m.bias) * 0.3)
    if marking == "set":
        smp.set_tensor_parallelism(net.mlp)
        smp.set_tensor_parallelism(net.emb, vocab_parallel=True)
    return net.to(device())


def global_batch(step, rows):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(VOCAB, (rows, SEQ), generator=g)
    labels = torch.randint(CLASSES, (rows, SEQ), generator=g)
    return ids.to(device()), labels.to(device())


def loss_fn(logits, labels):
    return F.cross_entropy(logits.reshape(-1, CLASSES), labels.reshape(-1))


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    # eps well above rounding noise: the gradient of attention.key.bias is
    # zero in exact arithmetic (softmax ignores a per-row shift), and with the
    # default eps Adam would turn its ~1e-9 noise into lr-sized steps.
    return torch.optim.Adam(params, lr=0.01, eps=1e-4)


def expect_error(cls, fragments, fn):
    try:
        fn()
    except cls as e:
        for f in fragments:
            assert f in str(e), f"{f!r} not in: {e}"
        return
    raise AssertionError(f"expected {cls.__name__} containing {fragments}")


def close(got, want, what):
    assert got.shape == want.shape, (what, tuple(got.shape), tuple(want.shape))
    err = (got.detach() - want.detach()).abs().max().item() if got.numel() else 0.0
    assert err <= ATOL, f"{what} differs by {err} on rank {smp.rank()}"


# ---- checks ----------------------------------------------------------------------

def local_expectations(model, ref):
    """{local parameter name: this rank's slice of the reference's parameter},
    sliced by the tensor-parallel module's own layout."""
    refp = dict(ref.named_parameters())
    out = {}
    dist_prefixes = []
    for prefix, m in model.get_module().named_modules():
        if smp.tp.is_dist_module(m):
            dist_prefixes.append(prefix)
            for name, _ in m.named_parameters():
                full = refp[f"{prefix}.{name}"].detach()
                out[f"{prefix}.{name}"] = _C.nn.local_slice(
                    m._smp_layout(name), full, smp.tp_size(), smp.tp_rank())
    for name, _ in model.get_module().named_parameters():
        if name not in out:
            out[name] = refp[name].detach()
    return out


def check_local_params(model, ref, where):
    want = local_expectations(model, ref)
    for name, p in model.get_module().named_parameters():
        close(p, want[name], f"{where}: {name}")


def check_gathered(model, ref, where):
    """state_dict(gather_to_rank0=True): the full model on rank 0, {} elsewhere."""
    sd = model.state_dict(gather_to_rank0=True)
    if smp.rank() != 0:
        assert sd == {}, (where, list(sd))
        return None
    ref_sd = ref.state_dict()
    assert set(sd) == set(ref_sd), (where, sorted(set(sd) ^ set(ref_sd)))
    for k, v in ref_sd.items():
        close(sd[k], v, f"{where}: gathered {k}")
    return sd


def check_replaced(model, marking):
    m = model.get_module()
    dist = smp.tp.is_dist_module
    if smp.tp_size() == 1:
        assert not any(dist(x) for x in m.modules()), "no replacement with tp 1"
        return
    assert isinstance(m.mlp[0], smp.nn.DistributedLinear), type(m.mlp[0])
    assert isinstance(m.mlp[2], smp.nn.DistributedLinear), type(m.mlp[2])
    assert isinstance(m.emb, smp.nn.DistributedEmbedding), type(m.emb)
    assert isinstance(m.mlp[1], torch.nn.GELU) and type(m.norm) is torch.nn.LayerNorm
    if marking == "context":
        assert isinstance(m.block, smp.nn.DistributedTransformerLayer), type(m.block)
        assert isinstance(m.head, smp.nn.DistributedLinear), type(m.head)
        assert m.emb.vocab_parallel is False
    else:
        assert type(m.block) is Block and type(m.head) is torch.nn.Linear
        assert m.emb.vocab_parallel is True  # the marking's keyword argument
        assert not model.is_distributed_parameter(m.head.weight)
    assert model.is_distributed_parameter(m.mlp[0].weight)
    assert not model.is_distributed_parameter(m.norm.weight)
    for p in model.parameters():
        assert p.device == device(), p.device
    # The slices are shard-sized: mlp[0].weight is [4*HIDDEN, HIDDEN] split by input.
    base, rem = divmod(HIDDEN, smp.tp_size())
    assert m.mlp[0].weight.shape == (4 * HIDDEN, base + (smp.tp_rank() < rem))
    assert (m.mlp[2].bias is None) == (smp.tp_rank() != 0)


def check_local_state_dict(model, ref, where):
    lsd = model.local_state_dict()
    assert lsd.pop("_smp_is_partial") is True
    want = local_expectations(model, ref)
    assert set(lsd) == set(want) | {"scale"}, (where, sorted(set(lsd) ^ set(want)))
    for k, v in want.items():
        close(lsd[k], v, f"{where}: local_state_dict {k}")
    if smp.tp_size() > 1:
        full = dict(ref.named_parameters())
        smaller = [k for k in lsd if k in full and lsd[k].numel() < full[k].numel()]
        assert "mlp.0.weight" in smaller and "emb.weight" in smaller, (where, smaller)


def check_optimizer_state(opt, ref, ref_opt, where):
    full = opt.state_dict()
    assert full["_smp_is_partial"] is (not opt._smp_sharded and smp.tp_size() == 1)
    ref_names = {id(p): n for n, p in ref.named_parameters()}
    ref_state = {ref_names[id(p)]: s for p, s in ref_opt.state.items()}
    names = [n for g in full["_smp_param_names"] for n in g]
    assert set(names) == set(ref_names.values()), (where, sorted(set(names)))
    checked = set()
    for i, st in full["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                close(v, ref_state[names[i]][k], f"{where}: optimizer state {names[i]}.{k}")
                checked.add(names[i])
    assert checked == set(ref_state), (where, sorted(set(ref_state) - checked))
    # Round trips by name: full and partial dicts into fresh optimizers whose
    # parameter order is reversed.
    local_sd = opt.local_state_dict()
    assert local_sd["_smp_is_partial"] is True
    for sd in (full, local_sd):
        opt2 = smp.DistributedOptimizer(make_optimizer(opt_kind_of(ref_opt),
                                                       list(opt._smp_model.parameters())[::-1]))
        opt2.load_state_dict(sd)
        for p in opt._smp_model.parameters():
            a, b = opt.state.get(p, {}), opt2.state.get(p, {})
            assert a.keys() == b.keys(), (where, a.keys(), b.keys())
            for k in a:
                va, vb = a[k], b[k]
                assert (torch.equal(va, vb) if torch.is_tensor(va) else va == vb), (where, k)


def opt_kind_of(opt):
    return "sgd" if isinstance(opt, torch.optim.SGD) else "adam"


# ---- one case ----------------------------------------------------------------------

def init(tp, shard, prescaled):
    smp.init({"tensor_parallel_degree": tp, "ddp": True, "shard_optimizer_state": shard,
              "prescaled_batch": prescaled})
    if ON_CUDA:
        torch.cuda.set_device(device())


def rows_of_this_rank(prescaled):
    """prescaled_batch off: every dp rank its own slice; on: one per TP group."""
    if prescaled:
        shards, mine = smp.rdp_size(), smp.rdp_rank()
    else:
        shards, mine = smp.dp_size(), smp.dp_rank()
    return shards, slice(mine * LOCAL_BATCH, (mine + 1) * LOCAL_BATCH)


def run_case(tp, opt_kind, shard, prescaled, marking, first):
    init(tp, shard, prescaled)
    where = (f"tp {tp} rdp {smp.rdp_size()} {opt_kind} shard {shard} prescaled {prescaled} "
             f"marking {marking}")
    ref = make_net(1234)
    net = make_net(1234 + smp.rank(), marking)  # rank 0's weights must win
    model = smp.DistributedModel(net)
    check_replaced(model, marking)
    check_local_params(model, ref, where + " after wrapping")
    opt = smp.DistributedOptimizer(make_optimizer(opt_kind, model.parameters()))
    # Partitioned (at wrapping with pp 1) and an optimizer exists: runs at once
    # with (model, optimizer), as in smp v1.
    calls = []
    model.register_post_partition_hook(lambda m, o: calls.append((m, o)))
    assert calls == [(model, opt)], calls
    ref_opt = make_optimizer(opt_kind, ref.parameters())
    shards, rows = rows_of_this_rank(prescaled)
    for step in range(STEPS):
        ids, labels = global_batch(step, LOCAL_BATCH * shards)
        ref_opt.zero_grad()
        loss_fn(ref(ids), labels).backward()  # mean over the whole global batch
        ref_opt.step()
        opt.zero_grad()
        loss = loss_fn(model(ids[rows]), labels[rows])
        if step % 2 == 0:
            model.backward(loss)
        else:
            loss.backward()  # averaging completes in opt.step()
        opt.step()
        check_local_params(model, ref, f"{where} step {step}")
    gathered = check_gathered(model, ref, where + " after 5 steps")
    check_local_state_dict(model, ref, where)
    check_optimizer_state(opt, ref, ref_opt, where)

    # The gathered dict loads into the plain model with strict=True: same outputs.
    ids, _ = global_batch(99, 4)
    if gathered is not None:
        plain = Net().to(device())
        plain.load_state_dict(gathered, strict=True)
        close(plain(ids), ref(ids), where + " plain model from the gathered state dict")

    # load_state_dict in place: full (every rank slices) and partial (copied).
    partial = {k: v.clone() if torch.is_tensor(v) else v
               for k, v in model.local_state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(ref.state_dict())
    check_local_params(model, ref, where + " after full load")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    model.load_state_dict(partial, same_partition_load=True)
    check_local_params(model, ref, where + " after partial load")
    expect_error(smp.ConfigError, ["missing keys ['scale', 'emb.weight'", "unexpected keys ['bogus']",
                                   "pass strict=False"],
                 lambda: model.load_state_dict({"bogus": torch.zeros(1)}))
    if first:
        check_errors(model)
    rank = smp.rank()
    smp.shutdown()
    reload_fresh(tp, shard, prescaled, marking, gathered, ref, first)
    return rank


def reload_fresh(tp, shard, prescaled, marking, gathered, ref, first):
    """A fresh DistributedModel (other initial weights) loading the gathered
    full state dict (sent from rank 0) reproduces the reference's outputs."""
    init(tp, shard, prescaled)
    where = f"tp {tp} prescaled {prescaled} marking {marking} fresh model"
    if first and tp > 1:
        # Marking after creation cannot replace a type registered with an
        # init_hook: its constructor arguments were never recorded.
        net = make_net(5, None)
        smp.set_tensor_parallelism(net)
        expect_error(smp.ConfigError,
                     ["cannot build DistributedTransformerLayer for a Block",
                      "create the module inside `with smp.tensor_parallelism():`"],
                     lambda: smp.DistributedModel(net))
    full = smp.allgather(gathered, smp.WORLD)[0]
    model = smp.DistributedModel(make_net(777 + smp.rank(), marking))
    model.load_state_dict(full, strict=True)
    check_local_params(model, ref, where)
    shards, rows = rows_of_this_rank(prescaled)
    ids, _ = global_batch(98, LOCAL_BATCH * shards)
    with torch.no_grad():
        close(model(ids[rows]), ref(ids)[rows], where + " outputs")
    smp.shutdown()


def check_errors(model):
    m = model.get_module()
    first_param = next(iter(model.parameters()))
    first_name = next(iter(n for n, _ in m.named_parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicate too
        dup = torch.optim.SGD(list(model.parameters()) + [first_param], lr=0.1)
    n = len(list(model.parameters()))
    expect_error(smp.ConfigError,
                 [f"parameter '{first_name}' appears more than once in the optimizer's "
                  f"parameters (param_groups[0]['params'][0] and param_groups[0]['params'][{n}])",
                  "unique_params = []", "unique_params_set = set()",
                  "if p not in unique_params_set:"],
                 lambda: smp.DistributedOptimizer(dup))
    # The documented recipe removes the duplicate.
    unique_params = []
    unique_params_set = set()
    for p in list(model.parameters()) + [first_param]:
        if p not in unique_params_set:
            unique_params.append(p)
            unique_params_set.add(p)
    smp.DistributedOptimizer(torch.optim.SGD(unique_params, lr=0.1))
    expect_error(smp.StateError,
                 ["smp.DistributedModel was already created in this process",
                  "wrap the whole model once"],
                 lambda: smp.DistributedModel(torch.nn.Linear(2, 2)))
    expect_error(smp.ConfigError, ["unknown keyword argument(s) ['bogus']"],
                 lambda: smp.DistributedModel(torch.nn.Linear(2, 2), bogus=1))


def main(world):
    smp.tp_register_with_module(Block, smp.nn.DistributedTransformerLayer,
                                init_hook=block_init_hook)
    rank, cases = None, 0
    for tp in (1, 2, 4):
        if world % tp:
            continue
        i = 0
        for opt_kind in ("sgd", "adam"):
            for shard in (False, True):
                for prescaled in (False, True):
                    marking = ("context", "set")[i % 2]
                    rank = run_case(tp, opt_kind, shard, prescaled, marking, first=i == 0)
                    i += 1
                    cases += 1
    print(f"model OK {rank} ({cases} cases)", flush=True)


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]))
    except BaseException:
        # Printed here: the excepthooks chained by repeated init may end the
        # process before a buffered traceback is written.
        traceback.print_exc()
        sys.stderr.flush()
        raise
