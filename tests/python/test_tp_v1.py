"""smp v1's tensor-parallel API around smp.nn: tied weights stay tied, each
replacement takes only the keywords it accepts, the distributed transformer
modules against plain PyTorch (mp/tp_v1.py under mpirun), and in one process
smp.set_activation_checkpointing, smp.nn.FusedLayerNorm,
smp.delay_param_initialization and smp.utils.get_distribution_axis."""

import importlib
import logging

import pytest
import torch

from conftest import ok_ranks, run_mpi

pytestmark = pytest.mark.timeout(300)


@pytest.mark.mpi
@pytest.mark.parametrize("np", [1, 2, 4])
def test_tied_weights_and_transformer_modules(np):
    out = run_mpi(np, "tp_v1.py").stdout
    assert ok_ranks(out, "tp_v1") == list(range(np)), out


def test_each_replacement_takes_only_its_keywords(smp_single):
    smp = smp_single
    kwargs = {"attention_in_fp32": True, "vocab_parallel": True, "fused_softmax": False}
    assert smp.tp.accepted_kwargs(smp.nn.DistributedTransformerLayer, kwargs) == {
        "attention_in_fp32": True, "fused_softmax": False}
    assert smp.tp.accepted_kwargs(smp.nn.DistributedEmbedding.from_module, kwargs) == {
        "vocab_parallel": True}
    assert smp.tp.accepted_kwargs(smp.nn.DistributedLinear.from_module, kwargs) == {}
    assert smp.tp.accepted_kwargs(lambda module, **kw: None, kwargs) == kwargs
    smp.init({})
    with smp.tensor_parallelism(attention_in_fp32=True):
        lin = torch.nn.Linear(3, 2)
    # Used to raise "from_module() got an unexpected keyword argument".
    assert isinstance(smp.tp.make_distributed(lin), smp.nn.DistributedLinear)


def test_tied_modules_are_not_replaced_and_logged_once(smp_single, caplog):
    smp = smp_single
    smp.init({})

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(5, 4)
            self.fc = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 5, bias=False)
            self.head.weight = self.wte.weight

    with smp.tensor_parallelism():
        net = Net()
    with caplog.at_level(logging.WARNING, logger="smp.tp"):
        out = smp.tp.replace_marked(net)
        smp.tp.replace_marked(net)
    assert out is net
    assert type(net.wte) is torch.nn.Embedding and type(net.head) is torch.nn.Linear
    assert net.head.weight is net.wte.weight
    assert isinstance(net.fc, smp.nn.DistributedLinear)
    msgs = [r.getMessage() for r in caplog.records if r.name == "smp.tp"]
    assert len(msgs) == 2, msgs  # wte and head, once each
    assert any("wte (Embedding) shares parameter 'weight' with another module" in m
               for m in msgs), msgs


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.lin(x))


def _grads(model, x):
    model.zero_grad()
    model(x).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("strategy", ["each", "contiguous", "group_2"])
def test_activation_checkpointing_sequential(smp_single, strategy):
    smp = smp_single
    torch.manual_seed(0)
    seq = torch.nn.Sequential(*[_Counting() for _ in range(5)])
    x = torch.randn(3, 4)
    want = _grads(seq, x)
    for m in seq:
        m.calls = 0
    smp.set_activation_checkpointing(seq, strategy=strategy)
    got = _grads(seq, x)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # every layer ran forward once more (recomputed during backward)
    assert [m.calls for m in seq] == [2] * 5
    with torch.no_grad():
        seq(x)  # no recomputation without autograd
    assert [m.calls for m in seq] == [3] * 5


def test_activation_checkpointing_module_and_errors(smp_single):
    smp = smp_single
    torch.manual_seed(0)
    m = _Counting()
    drop = torch.nn.Sequential(m, torch.nn.Dropout(0.5))
    x = torch.randn(3, 4)
    smp.set_activation_checkpointing(m)
    smp.set_activation_checkpointing(m)  # again: still one recomputation
    _grads(drop, x)
    assert m.calls == 2
    # preserve_rng_state: dropout inside a checkpointed module recomputes alike
    torch.manual_seed(1)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    torch.manual_seed(2)
    want = _grads(plain, x)
    smp.set_activation_checkpointing(plain)
    torch.manual_seed(2)
    got = _grads(plain, x)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    lst = torch.nn.ModuleList([_Counting(), _Counting()])
    smp.set_activation_checkpointing(lst)
    lst[0](x).sum().backward()
    assert lst[0].calls == 2
    with pytest.raises(smp.ConfigError, match="apply to torch.nn.Sequential modules only"):
        smp.set_activation_checkpointing(_Counting(), strategy="contiguous")
    with pytest.raises(smp.ConfigError, match="strategy must be \"each\", \"contiguous\" or "
                                              "\"group_<x>\" with x >= 1, got 'group_0'"):
        smp.set_activation_checkpointing(torch.nn.Sequential(), strategy="group_0")
    ck = importlib.import_module("smdistributed.modelparallel.torch.patches.checkpoint")
    assert ck.set_activation_checkpointing is smp.set_activation_checkpointing
    seq = torch.nn.Sequential(_Counting(), _Counting())
    y = ck.checkpoint_sequential(seq, x, strategy="group_2")
    y.sum().backward()
    assert [c.calls for c in seq] == [2, 2]
    z = ck.checkpoint(m, x)
    assert torch.equal(z, m(x))


def test_activation_checkpointing_survives_replacement(smp_single):
    smp = smp_single
    smp.init({})
    with smp.tensor_parallelism():
        lin = torch.nn.Linear(4, 4)
    smp.set_activation_checkpointing(lin)
    new = smp.tp.make_distributed(lin)
    assert getattr(new, smp.tp.CHECKPOINT_ATTR) == {
        "preserve_rng_state": True, "pack_args_as_tuple": False, "strategy": "each"}
    assert "forward" in new.__dict__


def test_fused_layer_norm_delay_init_and_utils(smp_single):
    smp = smp_single
    torch.manual_seed(0)
    ln = smp.nn.FusedLayerNorm(6, eps=1e-6)
    ref = torch.nn.LayerNorm(6, eps=1e-6)
    x = torch.randn(2, 6)
    assert torch.equal(ln(x), ref(x)) and [n for n, _ in ln.named_parameters()] == [
        "weight", "bias"]
    assert importlib.import_module("smdistributed.modelparallel.torch.nn").FusedLayerNorm is \
        smp.nn.FusedLayerNorm
    with smp.delay_param_initialization(enabled=True):
        lin = torch.nn.Linear(3, 3)
    assert lin.weight.device.type == "cpu" and lin.weight.abs().sum() > 0
    with pytest.raises(smp.ConfigError, match="enabled must be True or False, got 'yes'"):
        with smp.delay_param_initialization(enabled="yes"):
            pass
    utils = importlib.import_module("smdistributed.modelparallel.torch.utils")
    assert utils is smp.utils
    assert utils.get_distribution_axis(torch.zeros(2)) is None
    assert utils.get_distribution_axis("not a tensor") is None
    smp.init({})
    fc = smp.nn.DistributedLinear(4, 2)
    assert utils.get_distribution_axis(fc.weight) is None  # tp 1: nothing is split


def test_transformer_modules_errors(smp_single):
    smp = smp_single
    smp.init({})
    with pytest.raises(smp.NotSupportedError, match="rotary_dim=8 .* not supported"):
        smp.nn.DistributedTransformerLayer(2, 2, 4, 4, rotary_dim=8)
    with pytest.raises(smp.NotSupportedError, match="add_cross_attention=True is not supported"):
        smp.nn.DistributedTransformer(2, 2, 2, 4, 4, add_cross_attention=True)
    with pytest.raises(smp.NotSupportedError, match="distribute_embedding=True is not supported"):
        smp.nn.DistributedTransformerLMHead(1, 2, 2, 4, 4, 10, 8, distribute_embedding=True)
    with pytest.raises(smp.ConfigError, match="causal_mask_size \\(4\\) must be at least "
                                              "num_positions \\(8\\)"):
        smp.nn.DistributedTransformerLMHead(1, 2, 2, 4, 4, 10, 8, causal_mask_size=4)
    t = smp.nn.DistributedTransformer(3, 2, 2, 4, 4, pre_layernorm=True, post_layernorm=True)
    names = [n for n, _ in t.named_parameters()]
    assert "seq_layers.2.output.layernorm.weight" in names
    assert not any(n.startswith(("seq_layers.0.output.layernorm", "seq_layers.1.output.layernorm"))
                   or ".attention.layernorm" in n for n in names), names
    lm = smp.nn.DistributedTransformerLMHead(1, 2, 2, 4, 4, 10, 8, seed=3)
    assert lm.lm_head.weight is lm.word_embedding.weight
    assert "lm_head.weight" in lm._smp_full_param_names()
    lm2 = smp.nn.DistributedTransformerLMHead(1, 2, 2, 4, 4, 10, 8, seed=3)
    for (n, a), (_, b) in zip(lm.named_parameters(), lm2.named_parameters()):
        assert torch.equal(a, b), n  # one seed, one initialization
    ids = torch.randint(10, (2, 5))
    logits = lm((ids, torch.ones(2, 5), None, None, None))
    assert logits.shape == (2, 5, 10)
    with pytest.raises(smp.ConfigError, match="sequence length 9 exceeds num_positions 8"):
        lm((torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9), None, None, None))
    with pytest.raises(smp.ConfigError, match="index 10 is out of range for a vocabulary of 10"):
        smp.nn.DistributedEmbedding(10, 4)(torch.tensor([10]))
