"""smp.DistributedModel / DistributedOptimizer: training equivalence with plain
PyTorch under mpirun (mp/model_equivalence.py: a model of plain torch modules
whose Linear, Embedding and a registered user block are replaced by smp.nn's
tensor-parallel layers; (tp, rdp) in (1,1) (2,1) (4,1) (2,2) (1,4) with 1, 2 and
4 ranks, (1,8) (2,4) (4,2) with 8; SGD and Adam, shard_optimizer_state and prescaled_batch off and on;
state dicts and error texts), and tensor-parallelism marking and registration
in one process."""

import pytest
import torch

from conftest import ok_ranks, run_mpi

pytestmark = pytest.mark.timeout(300)


@pytest.mark.mpi
@pytest.mark.parametrize("np", [1, 2, 4, 8])
def test_training_equivalence(np):
    out = run_mpi(np, "model_equivalence.py", np).stdout
    assert ok_ranks(out, "model") == list(range(np)), out


class _Dist(torch.nn.Module):
    """A minimal protocol-following replacement for the registry tests."""

    def __init__(self, n, scale=1, fused=False):
        super().__init__()
        self.n, self.scale, self.fused = n, scale, fused
        self.weight = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * self.weight

    def _smp_shard_specs(self):
        return {"weight": {"split_dim": None, "global_shape": (self.n,)}}

    def _smp_full_param_names(self):
        return ["weight"]

    def _smp_load_full(self, name, full):
        with torch.no_grad():
            getattr(self, name).copy_(full)

    def _smp_gather_full(self, name):
        return getattr(self, name).detach()


def test_marking_and_registry():
    import smp

    class Scale(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.arange(float(n)))

        def forward(self, x):
            return x * self.weight

    seen = []
    smp.tp_register_with_module(
        Scale, _Dist,
        init_hook=lambda n: ((n,), {"scale": 2}),
        forward_hook=lambda x: (seen.append("in") or (x + 1,), {}),
        return_hook=lambda y: (seen.append("out"), y * 10)[1])

    with smp.tensor_parallelism(fused=True):
        a = Scale(3)
        with smp.tensor_parallelism(enabled=False):
            b = Scale(3)
    c = Scale(3)
    assert smp.tp.tp_config(a) == {"fused": True}
    assert smp.tp.tp_config(b) is None and smp.tp.tp_config(c) is None
    assert torch.nn.Module.__init__ is smp.tp._orig_module_init  # context restored

    # init_hook gets the recorded constructor arguments; weights come from the original.
    d = smp.tp.make_distributed(a)
    # ... and the marking's keyword arguments
    assert isinstance(d, _Dist) and d.scale == 2 and d.n == 3 and d.fused is True
    assert torch.equal(d.weight, torch.arange(3.0))
    assert torch.equal(d(torch.ones(3)), torch.arange(3.0) * 2 * 10)
    assert seen == ["in", "out"]
    smp.set_tensor_parallelism(c)
    assert smp.tp.tp_config(c) == {}

    # A module created outside the context has no recorded arguments.
    with pytest.raises(smp.ConfigError, match="create the module inside `with "
                                              "smp.tensor_parallelism\\(\\):`"):
        smp.tp.make_distributed(c)

    @smp.tp_register(_Dist)
    class Other(torch.nn.Module):
        pass

    assert smp.tp.registry()[Other] is _Dist
    assert smp.tp.make_distributed(torch.nn.ReLU()) is None
    with pytest.raises(smp.ConfigError, match="module_cls must be a torch.nn.Module subclass"):
        smp.tp_register_with_module(int, _Dist)


def test_single_process_model_and_errors(smp_single):
    smp = smp_single
    with pytest.raises(smp.StateError, match="smp.DistributedModel needs smp.init\\(\\) first"):
        smp.DistributedModel(torch.nn.Linear(2, 2))
    smp.init()
    with pytest.raises(smp.StateError, match="create smp.DistributedModel\\(...\\) first"):
        smp.DistributedOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1))
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model = smp.DistributedModel(net)
    with pytest.raises(smp.ConfigError, match="is not a parameter of the DistributedModel"):
        smp.DistributedOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1))
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    x = torch.ones(4, 3)
    loss = model(x).sum()
    loss.backward()
    loss = model(x).sum()
    with pytest.raises(RuntimeError, match="was produced twice in one pass"):
        loss.backward()  # a second backward before the pass was finished
    # gradient accumulation is what backward_passes_per_step is for
    smp.shutdown()
    smp.init()
    net = torch.nn.Linear(3, 1)
    model = smp.DistributedModel(net, backward_passes_per_step=2)
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    for _ in range(2):
        model.backward(model(x).sum())
    assert torch.equal(net.weight.grad, torch.full((1, 3), 8.0))
    opt.step()
    opt.zero_grad()
    assert net.weight.grad is None


def test_moving_the_wrapped_model_rebuilds_the_gradient_buckets(smp_single):
    """model.to(dtype/device) after wrapping (the documented way for models that
    do not fit one device): the gradient averaging follows the local parameters'
    new dtype, so the gradients keep it exactly; a move while gradients await
    averaging raises."""
    smp = smp_single
    smp.init()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ref.load_state_dict(net.state_dict())
    model = smp.DistributedModel(net)
    assert model.to(torch.float64) is model
    ref.double()
    assert all(p.dtype == torch.float64 for p in model.local_parameters())
    x = torch.randn(5, 3, dtype=torch.float64)
    model.backward(model(x).sum())
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float64
        assert torch.equal(p.grad, q.grad)  # not rounded through float32 buckets
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad()
    model(x).sum().backward()  # averaging pending until opt.step()
    with pytest.raises(smp.StateError, match="moved or converted .* while gradients await "
                       "averaging"):
        model.to(torch.float32)
    opt.step()
    model.float()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.backward(model(x.float()).sum())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
