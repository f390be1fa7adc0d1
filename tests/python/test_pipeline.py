"""Pipeline parallelism: smp.step / StepOutput (one process), the schedules
through the bindings, partitioning, and pipelined training under mpirun."""

import collections

import pytest
import torch
import torch.nn.functional as F

from conftest import ok_ranks, run_mpi, run_mpi_code

pytestmark = pytest.mark.timeout(300)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def test_step_gradients_equal_full_batch(smp_single):
    smp = smp_single
    for pipeline in ("interleaved", "simple"):
        smp.init({"microbatches": 4, "pipeline": pipeline})
        x, y = torch.randn(8, 5), torch.randn(8, 2)
        ref = _model()
        F.mse_loss(ref(x), y).backward()
        pm = smp.pipeline.PipelineModule(_model())

        @smp.step
        def train_step(model, x, y):
            loss = F.mse_loss(model(x), y)
            model.backward(loss)
            return loss

        loss = train_step(pm, x, y)
        assert isinstance(loss, smp.StepOutput) and len(loss.outputs) == 4
        assert not loss.outputs[0].requires_grad  # detached
        torch.testing.assert_close(loss.reduce_mean(), F.mse_loss(ref(x), y), atol=1e-6, rtol=0)
        for p, q in zip(pm.module.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0)
        stats = smp.pipeline.last_step_stats()
        assert stats["max_live_microbatches"] == (4 if pipeline == "simple" else 1), stats
        smp.shutdown()


class _Hooked(torch.nn.Module):
    """A wrapper with the engine's hook API, recording the calls."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.calls = []

    def forward(self, x):
        return self.lin(x)

    def backward(self, loss):
        smp_engine.current_step().record_backward(loss)

    def _smp_begin_microbatch_backward(self, is_last):
        self.calls.append(("begin", is_last))

    def _smp_finish_gradients(self):
        self.calls.append(("finish",))


smp_engine = None


def test_step_outputs_splitting_and_hooks(smp_single):
    global smp_engine
    smp = smp_single
    from smp.pipeline import engine as smp_engine

    smp.init({"microbatches": 2})
    Pair = collections.namedtuple("Pair", "a b")
    seen = []

    @smp.step(non_split_inputs=["w"], input_split_axes={"t": 1})
    def fn(model, x, nested, t, w, flag, **extra):
        seen.append((x.shape, nested["p"][0].shape, nested["p"][1].b.shape, nested["n"],
                     t.shape, w.shape, flag, extra["k"].shape))
        return x.sum(), x * 2, {"x": x}

    x = torch.arange(8.0).reshape(4, 2)
    nested = {"p": [torch.zeros(6), Pair(1, torch.ones(2, 3))], "n": 5}
    total, doubled, dicts = fn(None, x, nested, torch.zeros(3, 4), torch.zeros(5), "yes",
                               k=torch.zeros(2))
    assert seen == [((2, 2), (3,), (1, 3), 5, (3, 2), (5,), "yes", (1,))] * 2
    assert total.outputs == [torch.tensor(1.0 + 2 + 3), torch.tensor(4.0 + 5 + 6 + 7)]
    assert total.reduce_sum().item() == 28.0 and total.reduce_mean().item() == 14.0
    torch.testing.assert_close(doubled.concat(), x * 2)
    assert doubled.stack().shape == (2, 2, 2)
    assert doubled.reduce_mean().shape == (2, 2)
    # A returned dict stays a dict, its tensors StepOutputs (smp v1).
    assert isinstance(dicts, dict) and list(dicts) == ["x"]
    torch.testing.assert_close(dicts["x"].concat(), x)
    with pytest.raises(smp.NotSupportedError, match=r"reduce_mean: the step returned values of "
                       r"type\(s\) \['str'\]; only tensors and numbers"):
        smp.StepOutput(["a", "b"]).reduce_mean()

    @smp.step
    def numbers(model, x):
        return float(x.sum())

    # Values other than tensors become their per-microbatch list.
    assert numbers(None, x) == [6.0, 22.0]
    assert smp.StepOutput([6.0, 22.0]).reduce_mean() == 14.0

    # not divisible, bad axis, bad names, nested inside another step
    with pytest.raises(smp.ConfigError, match=r"argument 'x' has size 3 along split axis 0 "
                       r"\(shape \(3, 2\)\), which is not divisible by microbatches=2"):
        fn(None, torch.zeros(3, 2), nested, torch.zeros(3, 4), None, 1, k=torch.zeros(2))
    with pytest.raises(smp.ConfigError, match=r"argument 'nested'\['p'\]\[0\] has size 5"):
        fn(None, x, {"p": [torch.zeros(5)]}, torch.zeros(3, 4), None, 1, k=torch.zeros(2))
    with pytest.raises(smp.ConfigError, match=r"argument 't' has shape \(3,\), which has no "
                       r"split axis 1"):
        fn(None, x, nested, torch.zeros(3), None, 1, k=torch.zeros(2))
    with pytest.raises(smp.ConfigError, match=r"'nope' in non_split_inputs/input_split_axes is "
                       r"not a parameter"):
        smp.step(non_split_inputs=["nope"])(lambda model, x: x)(None, x)

    @smp.step
    def outer(model, x):
        return numbers(model, x)

    with pytest.raises(smp.StateError, match="called inside another smp.step"):
        outer(None, x)

    # hooks: begin before every microbatch backward (is_last on the final one), finish once
    m = _Hooked()

    @smp.step
    def train(model, x):
        model.backward(model(x).sum())

    train(m, torch.ones(4, 3))
    assert m.calls == [("begin", False), ("begin", True), ("finish",)], m.calls
    torch.testing.assert_close(m.lin.weight.grad, torch.full((1, 3), 2.0))  # 4 rows / 2 mbs

    @smp.step
    def twice(model, x):
        model.backward(model(x).sum())
        model.backward(model(x).sum())

    with pytest.raises(smp.StateError, match="model.backward called twice for microbatch 0"):
        twice(m, torch.ones(4, 3))
    smp.shutdown()


def test_step_output_containers_and_methods(smp_single):
    """smp v1's mapping of a step's return value, container by container, and
    StepOutput's local methods (one process: every rank holds the values)."""
    smp = smp_single
    smp.init({"microbatches": 2})
    Pair = collections.namedtuple("Pair", "a b")

    class Output(collections.OrderedDict):
        """A model-output mapping (as transformers' ModelOutput)."""

    @smp.step
    def fn(model, x):
        return (x, [x * 2, {"k": x.sum(), "n": 3}], Pair(x[:, 0], "s"),
                Output(logits=x + 1, loss=x.mean()), None)

    x = torch.arange(8.0).reshape(4, 2)
    t, lst, pair, out, none = fn(None, x)
    assert isinstance(t, smp.StepOutput) and len(t) == 2
    torch.testing.assert_close(t[1], x[2:])
    assert isinstance(lst, list) and isinstance(lst[1], dict)
    torch.testing.assert_close(lst[0].concat(), x * 2)
    torch.testing.assert_close(lst[1]["k"].reduce_sum(), x.sum())
    assert lst[1]["n"] == [3, 3]
    assert type(pair) is Pair and pair.b == ["s", "s"]
    torch.testing.assert_close(pair.a.concat(), x[:, 0])
    assert type(out) is dict and list(out) == ["logits", "loss"]
    torch.testing.assert_close(out["logits"].concat(), x + 1)
    assert none == [None, None]

    doubled = t.map(lambda v: v * 2)
    assert isinstance(doubled, smp.StepOutput)
    torch.testing.assert_close(doubled.concat(), x * 2)
    doubled.add_output(torch.zeros(2, 2))
    assert len(doubled) == 3 and doubled.stack().shape == (3, 2, 2)
    doubled.clear()
    assert doubled.outputs == [] and len(doubled) == 0
    with pytest.raises(smp.StateError, match="concat\\(\\) on an empty StepOutput"):
        doubled.concat()

    @smp.step
    def uneven(model, x):
        return x if x.sum() < 10 else "big"

    # Microbatches whose values differ in kind: the per-microbatch list.
    values = uneven(None, x)
    assert isinstance(values, list) and values[1] == "big"
    smp.shutdown()


def test_schedule_bindings(smp_single):
    smp = smp_single
    s = smp._C.pipeline.build_schedules(2, 2, "simple")
    assert s[0] == [("Forward", 0), ("SendActivation", 0), ("Forward", 1), ("SendActivation", 1),
                    ("RecvGrad", 0), ("Backward", 0), ("RecvGrad", 1), ("Backward", 1)]
    assert smp._C.pipeline.build_schedule(3, 2, 3) == [
        ("RecvActivation", 0), ("Forward", 0), ("Backward", 0), ("RecvActivation", 1),
        ("SendGrad", 0), ("Forward", 1), ("Backward", 1), ("RecvActivation", 2),
        ("SendGrad", 1), ("Forward", 2), ("Backward", 2), ("SendGrad", 2)]
    with pytest.raises(smp.ConfigError, match="pipeline schedule 'gpipe' is not known"):
        smp._C.pipeline.build_schedule(2, 0, 2, "gpipe")


def test_partitioning(smp_single):
    smp = smp_single
    from smp.pipeline.partition import balanced_split, plan

    assert balanced_split([1, 1, 1, 1], 2) == [0, 0, 1, 1]
    assert balanced_split([10, 0, 1, 1, 8], 2) == [0, 0, 1, 1, 1]
    assert balanced_split([5, 5, 5], 3) == [0, 1, 2]
    assert balanced_split([100, 1, 1, 1], 2) == [0, 1, 1, 1]
    with pytest.raises(smp.ConfigError, match="the model has 2 top-level module"):
        balanced_split([1, 1], 3)

    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4),
                              torch.nn.Linear(4, 40))
    assert [s for _, _, s in plan(seq, 2)] == [0, 0, 0, 1]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            with smp.partition(0):
                self.a = torch.nn.Linear(2, 2)
            with smp.partition(1):
                self.b = torch.nn.Sequential(torch.nn.Linear(2, 2))
            self.c = torch.nn.Linear(2, 2)

    net = Net()
    assert smp.pipeline.get_partition(net.b[0]) == 1
    assert [s for _, _, s in plan(net, 2, auto_partition=False, default_partition=1)] == [0, 1, 1]
    smp.set_partition(net.c, 0)
    with pytest.raises(smp.NotSupportedError, match="module 'c' is on stage 0 but comes after a "
                       "module on stage 1"):
        plan(net, 2, auto_partition=False)
    smp.set_partition(net.c, 1)
    smp.set_partition(net.b[0], 0)
    with pytest.raises(smp.NotSupportedError, match=r"module 'b.0' was given stage 0 but its "
                       "top-level module 'b' is on stage 1"):
        plan(net, 2, auto_partition=False)
    with pytest.raises(smp.ConfigError, match=r"pipeline stage\(s\) \[1\] hold no module"):
        plan(torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)), 2,
             auto_partition=False, default_partition=0)
    with pytest.raises(smp.ConfigError, match="default_partition is 3; it must be in 0..1"):
        plan(net, 2, auto_partition=False, default_partition=3)


def test_chain_tracing(smp_single):
    smp = smp_single
    from smp.pipeline.partition import run_steps, trace_chain

    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Linear(3, 4)
            self.a = torch.nn.Linear(3, 3)

        def forward(self, x, unused=None):
            return self.b(torch.relu(self.a(x * 2))).sum(dim=1, keepdim=True)

    m = Chain()
    order, steps = trace_chain(m)
    assert order == ["a", "b"]  # call order, not registration order
    assert [u for _, u in steps] == [None, "a", None, "b", None]
    x = torch.randn(2, 3)
    torch.testing.assert_close(run_steps(m, steps, x), m(x))

    class Skip(Chain):
        def forward(self, x):
            y = self.a(x)
            return self.b(y) + y.sum()

    with pytest.raises(smp.NotSupportedError, match=r"in the forward of Skip, operation .* takes "
                       r"\['a'\] but the previous result is 'b'; with "
                       r"pipeline_parallel_degree > 1 the model's forward must be a chain"):
        trace_chain(Skip())

    class TwoInputs(Chain):
        def forward(self, x, y):
            return self.b(self.a(x + y))

    with pytest.raises(smp.NotSupportedError, match=r"uses 2 inputs \(\['x', 'y'\]\)"):
        trace_chain(TwoInputs())

    class Branchy(Chain):
        def forward(self, x):
            if x.sum() > 0:
                return self.a(x)
            return self.b(x)

    with pytest.raises(smp.NotSupportedError, match=r"the forward of Branchy could not be traced "
                       "with torch.fx"):
        trace_chain(Branchy())


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 4])
def test_pipelined_training_matches_pytorch(np):
    out = run_mpi(np, "pipeline_train.py", np).stdout
    assert ok_ranks(out, "pipeline_train") == list(range(np)), out


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 4, 8])
def test_pipeline_through_distributed_model_matches_pytorch(np):
    """Through smp.DistributedModel and DistributedOptimizer, both schedules,
    microbatches 1/2/4, a Sequential and a two-submodule model: parameters equal
    plain PyTorch on the global batch. 2 ranks: pp2; 4: pp2 x tp2, pp2 x rdp2, pp4;
    8 ranks: pp2 x tp2 x rdp2 and pp4 x tp2. Every rank holds the bytes of its
    own stage's parameters and buffers only, also after building on the CPU,
    wrapping and then model.to(device)."""
    out = run_mpi(np, "pipeline_model_equivalence.py").stdout
    assert ok_ranks(out, "pipeline_model") == list(range(np)), out


@pytest.mark.mpi
@pytest.mark.parametrize("layout", ["pp2tp2", "pp2rdp2"])
def test_other_stages_released_state_dicts_and_checkpoints(tmp_path, layout):
    """With the other stages' tensors released: local_state_dict, smp.save/load,
    save_checkpoint/resume_from_checkpoint (partial and full), loading the plain
    model's full state dict and (pp2rdp2, sharded) a plain torch optimizer state
    dict over every parameter."""
    out = run_mpi(4, "pipeline_release.py", tmp_path, layout).stdout
    assert ok_ranks(out, "pipeline_release") == [0, 1, 2, 3], out


_ORPHANS = """
import torch, smp


class RootParam(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 2)
        self.b = torch.nn.Linear(2, 2)
        self.unused = torch.nn.Linear(2, 2)
        self.scale = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.b(self.a(x))


smp.init({"pipeline_parallel_degree": 2})
try:
    smp.DistributedModel(RootParam())
    raise SystemExit("no error")
except smp.NotSupportedError as e:
    text = str(e)
    for part in ("pipeline_parallel_degree 2", "'unused.weight'", "'unused.bias'", "'scale'",
                 "belong to no pipeline stage", "['a', 'b']", "would be neither trained nor saved",
                 "move them into a submodule that forward calls"):
        assert part in text, (part, text)
print(f"orphans OK {smp.rank()}", flush=True)
smp.shutdown()
"""


@pytest.mark.mpi
def test_tensors_outside_every_stage_are_refused():
    """A root parameter or a top-level module that forward never calls would be
    neither trained nor saved with pp > 1: smp.DistributedModel refuses it,
    naming each tensor."""
    out = run_mpi_code(2, _ORPHANS).stdout
    assert ok_ranks(out, "orphans") == [0, 1], out


def test_distributed_model_v1_arguments_and_hooks(smp_single):
    """smp v1's constructor arguments (accepted, validated; the ones that act
    change the gradients as v1 documents) and the post-partition / post-step
    hooks' timing and arguments, in one process (pp 1)."""
    smp = smp_single
    smp.init({"microbatches": 2})
    x, y = torch.randn(4, 5), torch.randn(4, 2)

    @smp.step
    def train_step(model, x, y):
        loss = F.mse_loss(model(x), y)
        model.backward(loss)
        return loss

    with pytest.raises(smp.ConfigError, match=r"unknown keyword argument\(s\) \['trace'\]; smp "
                       r"v1's arguments are trace_device, trace_execution_times"):
        smp.DistributedModel(_model(), trace=True)
    with pytest.raises(smp.ConfigError, match="trace_device must be 'cpu' or 'gpu', got 'tpu'"):
        smp.DistributedModel(_model(), trace_device="tpu")
    with pytest.raises(smp.ConfigError, match="backward_passes_per_step must be an int >= 1, "
                       "got 0"):
        smp.DistributedModel(_model(), backward_passes_per_step=0)
    with pytest.raises(smp.ConfigError, match="overlapping_allreduce must be True or False"):
        smp.DistributedModel(_model(), overlapping_allreduce="yes")

    # average_grads_across_microbatches=False: gradients summed over microbatches.
    model = smp.DistributedModel(_model(), trace_device="cpu", trace_execution_times=True,
                                 trace_memory_usage=True, overlapping_allreduce=False,
                                 average_grads_across_microbatches=False, bucket_cap_mb=1,
                                 find_unused_parameters=True, broadcast_buffers=False,
                                 gradient_as_bucket_view=True)
    assert model.partitioned and model.get_module() is model.module  # pp 1, no ddp
    calls = []
    model.register_post_partition_hook(lambda m, o: calls.append(("partition", m, o)))
    handle = model.register_post_step_hook(lambda m, o: calls.append(("never", m, o)))
    handle.remove()
    model.register_post_step_hook(lambda m, o: calls.append(("step", m, o)))
    assert calls == []  # no optimizer yet: they wait for the first step
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    train_step(model, x, y)
    assert calls == [("partition", model, opt), ("step", model, opt)], calls
    ref = _model()
    (F.mse_loss(ref(x[:2]), y[:2]) + F.mse_loss(ref(x[2:]), y[2:])).backward()
    for p, q in zip(model.get_module().parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0)
    train_step(model, x, y)
    assert len(calls) == 2  # once each
    model.register_post_partition_hook(lambda m, o: calls.append(("late", m, o)))
    assert calls[-1] == ("late", model, opt)
    smp.shutdown()

    # backward_passes_per_step=2 with smp.step: two steps accumulate.
    smp.init({"microbatches": 2})
    model = smp.DistributedModel(_model(), backward_passes_per_step=2)
    for _ in range(2):
        train_step(model, x, y)
    ref = _model()
    for _ in range(2):
        F.mse_loss(ref(x), y).backward()
    for p, q in zip(model.get_module().parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0)
    smp.shutdown()
