# mpirun -np N (1, 2 or 4): smp.DistributedModel + smp.DistributedOptimizer train
# like plain single-process PyTorch on the same global batch, for every
# (tp, rdp) grid of the world, SGD(momentum) and Adam, with and without
# shard_optimizer_state and prescaled_batch; plus state dicts and error texts.
#
# MODEL_EQUIVALENCE_DEVICE=cuda runs on GPU local_rank (NCCL; tests/python/gpu).
#
# Tensor parallelism uses RowLinear, a stand-in for smp.nn.DistributedLinear
# defined here (weight split along the input dimension, bias on tp_rank 0 only)
# that follows smp's DistributedModule protocol with smp.comm collectives.
import os
import sys
import traceback
import warnings

import torch

import smp

TP = smp.TP_GROUP
STEPS = 5
ATOL = 1e-5
LOCAL_BATCH = 3
IN, HIDDEN, MID, OUT = 8, 12, 4, 3
ON_CUDA = os.environ.get("MODEL_EQUIVALENCE_DEVICE", "cpu") == "cuda"


def device():
    return torch.device("cuda", smp.local_rank()) if ON_CUDA else torch.device("cpu")


def split_range(total, parts, index):
    base, rem = divmod(total, parts)
    return index * base + min(index, rem), base + (1 if index < rem else 0)


# ---- the stand-in tensor-parallel layer --------------------------------------

class _GatherBatch(torch.autograd.Function):
    """Rows of every TP member's batch, in tp order. Backward: each member gets
    the sum over members of the gradient rows of its own batch."""

    @staticmethod
    def forward(ctx, x):
        g = smp.comm.allgather(x.contiguous(), TP)
        return g.reshape(-1, *x.shape[1:])

    @staticmethod
    def backward(ctx, gy):
        return smp.comm.reduce_scatter(gy.contiguous(), TP)


class _ReduceScatterBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return smp.comm.reduce_scatter(y.contiguous(), TP)

    @staticmethod
    def backward(ctx, g):
        return smp.comm.allgather(g.contiguous(), TP).reshape(-1, *g.shape[1:])


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return smp.comm.allreduce(g.contiguous().clone(), TP)


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return smp.comm.allreduce(y.contiguous().clone(), TP)

    @staticmethod
    def backward(ctx, g):
        return g


class RowLinear(torch.nn.Module):
    """y = x W^T + b with W [out, in] split along `in` over TP_GROUP, b on tp_rank 0."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.offset, size = split_range(in_features, smp.tp_size(), smp.tp_rank())
        self.weight = torch.nn.Parameter(torch.empty(out_features, size, device=device()))
        if smp.tp_rank() == 0:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device()))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_module(cls, linear):
        m = cls(linear.in_features, linear.out_features)
        with torch.no_grad():
            m._smp_load_full("weight", linear.weight)
            m._smp_load_full("bias", linear.bias)
        return m

    def forward(self, x):
        prescaled = smp.config()["prescaled_batch"]
        full = _CopyToGroup.apply(x) if prescaled else _GatherBatch.apply(x)
        xs = full.narrow(-1, self.offset, self.weight.shape[1])
        y = torch.nn.functional.linear(xs, self.weight, self.bias)
        return _SumOverGroup.apply(y) if prescaled else _ReduceScatterBatch.apply(y)

    # smp's DistributedModule protocol
    def _smp_shard_specs(self):
        specs = {"weight": {"split_dim": 1, "global_shape": (self.out_features, self.in_features),
                            "distributed": True}}
        if self.bias is not None:  # its gradient holds the whole TP group's batches
            specs["bias"] = {"split_dim": None, "global_shape": (self.out_features,),
                             "distributed": True}
        return specs

    def _smp_full_param_names(self):
        return {"weight": {"global_shape": (self.out_features, self.in_features), "holder": None},
                "bias": {"global_shape": (self.out_features,), "holder": 0}}

    def _smp_load_full(self, name, full):
        with torch.no_grad():
            if name == "weight":
                self.weight.copy_(full.narrow(1, self.offset, self.weight.shape[1]))
            elif self.bias is not None:
                self.bias.copy_(full)

    def _smp_gather_full(self, name):
        if name == "weight":
            parts = smp.comm.allgather(self.weight.detach().contiguous(), TP)
            return torch.cat(list(parts), dim=1)
        t = (self.bias.detach().clone() if self.bias is not None
             else torch.empty(self.out_features, device=self.weight.device))
        return smp.comm.broadcast(t, 0, TP)


# ---- the model ----------------------------------------------------------------

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        with smp.tensor_parallelism():
            self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, MID)
        self.norm = torch.nn.LayerNorm(MID)
        self.head = torch.nn.Linear(MID, OUT)
        self.unused = torch.nn.Parameter(torch.randn(2))
        self.register_buffer("scale", torch.tensor([1.5]))

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.head(self.norm(torch.tanh(self.fc2(h)))) * self.scale


def make_net(seed):
    torch.manual_seed(seed)
    net = Net()
    smp.set_tensor_parallelism(net.fc2)
    return net.to(device())


def global_batch(step, rows):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(rows, IN, generator=g).to(device()),
            torch.randn(rows, OUT, generator=g).to(device()))


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


def expect_error(cls, fragments, fn):
    try:
        fn()
    except cls as e:
        for f in fragments:
            assert f in str(e), f"{f!r} not in: {e}"
        return
    raise AssertionError(f"expected {cls.__name__} containing {fragments}")


def local_slice(model, name, full):
    spec = model.param_spec(name)
    if spec["split_dim"] is None:
        return full
    d = spec["split_dim"]
    off, size = split_range(full.shape[d], smp.tp_size(), smp.tp_rank())
    return full.narrow(d, off, size)


def check_params(model, ref, where):
    refp = dict(ref.named_parameters())
    for name, p in model.module.named_parameters():
        want = local_slice(model, name, refp[name].detach())
        assert p.shape == want.shape, (where, name, p.shape, want.shape)
        err = (p.detach() - want).abs().max().item()
        assert err <= ATOL, f"{where}: {name} differs by {err} on rank {smp.rank()}"


def run_case(tp, opt_kind, shard, prescaled, first):
    smp.init({"tensor_parallel_degree": tp, "ddp": True, "shard_optimizer_state": shard,
              "prescaled_batch": prescaled})
    where = f"tp {tp} rdp {smp.rdp_size()} {opt_kind} shard {shard} prescaled {prescaled}"
    if ON_CUDA:
        torch.cuda.set_device(device())
    smp.tp_register_with_module(torch.nn.Linear, RowLinear)
    ref = make_net(1234)
    net = make_net(1234 + smp.rank())  # rank 0's weights must win
    model = smp.DistributedModel(net)
    if tp > 1:
        assert isinstance(model.module.fc1, RowLinear), type(model.module.fc1)
        assert isinstance(model.module.fc2, RowLinear), type(model.module.fc2)
        assert model.is_distributed_parameter(model.module.fc1.weight)
    assert type(model.module.head) is torch.nn.Linear
    assert not model.is_distributed_parameter(model.module.head.weight)
    check_params(model, ref, where + " after wrapping")
    assert model.local_state_dict()["_smp_is_partial"] is True
    calls = []
    model.register_post_partition_hook(lambda m: calls.append(m))
    assert calls == [model]

    opt = smp.DistributedOptimizer(make_optimizer(opt_kind, model.parameters()))
    ref_opt = make_optimizer(opt_kind, ref.parameters())

    # Rows of the global batch: every dp rank its own, or one per TP group.
    if prescaled:
        shards, mine = smp.rdp_size(), smp.rdp_rank()
    else:
        shards, mine = smp.dp_size(), smp.dp_rank()
    for step in range(STEPS):
        x, y = global_batch(step, LOCAL_BATCH * shards)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        rows = slice(mine * LOCAL_BATCH, (mine + 1) * LOCAL_BATCH)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        if step % 2 == 0:
            model.backward(loss)
        else:
            loss.backward()  # averaging completes in opt.step()
        opt.step()
        check_params(model, ref, f"{where} step {step}")

    # Full optimizer state equals the reference optimizer's, by name.
    full = opt.state_dict()
    assert full["_smp_is_partial"] is (not shard and tp == 1), full["_smp_is_partial"]
    ref_names = {id(p): n for n, p in ref.named_parameters()}
    ref_state = {ref_names[id(p)]: s for p, s in ref_opt.state.items()}
    names = [n for g in full["_smp_param_names"] for n in g]
    n_checked = 0
    for i, st in full["state"].items():
        name = names[i]
        if name == "unused":
            continue
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                want = ref_state[name][k]
                assert v.shape == want.shape, (where, name, k, v.shape)
                err = (v - want).abs().max().item()
                assert err <= ATOL, f"{where}: optimizer state {name}.{k} differs by {err}"
                n_checked += 1
    assert n_checked >= 4, (where, n_checked)

    # Optimizer state round trips, by name: full and partial dicts into fresh
    # optimizers whose parameter order is reversed.
    local_sd = opt.local_state_dict()
    assert local_sd["_smp_is_partial"] is True
    for sd in (full, local_sd):
        params = list(model.parameters())[::-1]
        opt2 = smp.DistributedOptimizer(make_optimizer(opt_kind, params))
        opt2.load_state_dict(sd)
        for p in model.parameters():
            a, b = opt.state.get(p, {}), opt2.state.get(p, {})
            assert a.keys() == b.keys(), (where, a.keys(), b.keys())
            for k in a:
                va, vb = a[k], b[k]
                assert (torch.equal(va, vb) if torch.is_tensor(va) else va == vb), (where, k)

    # state_dict(gather_to_rank0=True): full model on rank 0, {} elsewhere.
    sd = model.state_dict()
    if smp.rank() == 0:
        plain = Net().to(device())
        plain.load_state_dict(sd, strict=True)
        x, _ = global_batch(99, 5)
        assert torch.allclose(plain(x), ref(x), atol=ATOL), where
        assert list(sd) == list(ref.state_dict()), (list(sd), list(ref.state_dict()))
    else:
        assert sd == {}, list(sd)

    # load_state_dict: full (every rank slices) and partial (copied as is).
    partial = {k: v.clone() if torch.is_tensor(v) else v
               for k, v in model.local_state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(ref.state_dict())
    check_params(model, ref, where + " after full load")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    model.load_state_dict(partial, same_partition_load=True)
    check_params(model, ref, where + " after partial load")
    expect_error(smp.ConfigError, ["missing keys ['unused', 'scale', 'fc1.weight'", "unexpected keys ['bogus']",
                                   "pass strict=False"],
                 lambda: model.load_state_dict({"bogus": torch.zeros(1)}))
    if ON_CUDA:
        assert all(p.is_cuda for p in model.parameters())

    if first:
        first_param = model.module.fc1.weight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the duplicate too
            dup = torch.optim.SGD(list(model.parameters()) + [first_param], lr=0.1)
        expect_error(smp.ConfigError,
                     ["parameter 'fc1.weight' appears more than once in the optimizer's "
                      "parameters (param_groups[0]['params'][1] and param_groups[0]['params']",
                      "unique_params = []", "unique_params_set = set()",
                      "if p not in unique_params_set:"],
                     lambda: smp.DistributedOptimizer(dup))
        expect_error(smp.StateError,
                     ["smp.DistributedModel was already created in this process",
                      "wrap the whole model once"],
                     lambda: smp.DistributedModel(torch.nn.Linear(2, 2)))
        expect_error(smp.ConfigError, ["unknown keyword argument(s) ['bogus']"],
                     lambda: smp.DistributedModel(torch.nn.Linear(2, 2), bogus=1))
    rank = smp.rank()
    smp.shutdown()
    return rank


def main(world):
    first = True
    for tp in (1, 2, 4):
        if world % tp:
            continue
        for opt_kind, shard, prescaled in (("sgd", False, False), ("adam", True, False),
                                           ("sgd", True, True), ("adam", False, True)):
            rank = run_case(tp, opt_kind, shard, prescaled, first)
            first = False
    print(f"model OK {rank}", flush=True)


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]))
    except BaseException:
        # Printed here: the excepthooks chained by repeated init may end the
        # process before a buffered traceback is written.
        traceback.print_exc()
        sys.stderr.flush()
        raise
