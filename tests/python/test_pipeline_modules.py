"""Module-level pipeline (smp.pipeline.modcall): placement of module subtrees
on stages, and training under mpirun equal to plain PyTorch on the global
batch (tests/python/mp/pipeline_modules.py): a toy model with data-dependent
control flow and a child called twice, Hugging Face GPT-2 and BERT (skipped
when transformers is not installed), pp 2 and 4, pp2 x rdp2, manual
placement, a forced module-level chain, errors, both schedules (interleaved
and simple) and their activation memory.

The CI runs a subset of the schedule x layout matrix; SMP_PIPELINE_FULL=1
(marker pipeline_full) runs all of it: GPT-2 and BERT under pp 2, pp 4,
pp2 x tp2 and pp2 x tp2 x rdp2 (tests/python/mp/hf_tp.py for the tp layouts),
each with both schedules."""

import importlib.util
import os

import pytest
import torch

from conftest import ok_ranks, run_mpi

pytestmark = pytest.mark.timeout(300)

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (optional test extra: pip install transformers)")


def _plan(root, stages, **kw):
    from smp.pipeline.modcall import ModulePlan

    return ModulePlan(root, stages, **kw)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)])
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight


def test_auto_placement_expands_containers_and_keeps_ties_together(smp_single):
    plan = _plan(_Tied(), 2)
    # weights 128, 72 x 4, 0 (head is tied to emb): stage 0 = 200, stage 1 = 216
    assert plan.assignment() == {"emb": 0, "layers.0": 0, "layers.1": 1, "layers.2": 1,
                                 "layers.3": 1, "head": 0}
    assert plan.stage_of("layers.3.weight") == 1
    assert plan.stage_of("head.weight") == 0 and plan.stage_of("emb.weight") == 0
    assert plan.stage_of("layers") == 0          # a container: the skeleton, stage 0
    # a unit larger than a stage's share is split into its children
    big = torch.nn.Sequential(torch.nn.Linear(1, 1),
                              torch.nn.Sequential(torch.nn.Linear(40, 40),
                                                  torch.nn.Linear(40, 40)))
    root = torch.nn.Module()
    root.body = big
    assert _plan(root, 2).assignment() == {"body.0": 0, "body.1.0": 0, "body.1.1": 1}
    with pytest.raises(smp_single.ConfigError, match="only 1 placeable submodule"):
        one = torch.nn.Module()
        one.a = torch.nn.Linear(2, 2)
        _plan(one, 2)


def test_manual_placement(smp_single):
    smp = smp_single
    net = _Tied()
    smp.set_partition(net.layers[1], 1)
    smp.set_partition(net.layers[3], 1)
    plan = _plan(net, 2, auto_partition=False, default_partition=0)
    assert plan.assignment() == {"layers.1": 1, "layers.3": 1}
    assert plan.stage_of("layers.1.bias") == 1 and plan.stage_of("layers.2.bias") == 0
    smp.set_partition(net.head, 1)
    with pytest.raises(smp.NotSupportedError, match=r"tied parameter .*'emb.weight'.* is used "
                       r"on stages \[0, 1\]"):
        _plan(net, 2, auto_partition=False)
    smp.set_partition(net.head, 0)
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2))
    smp.set_partition(seq, 1)
    smp.set_partition(seq[0], 0)
    root = torch.nn.Module()
    root.s = seq
    with pytest.raises(smp.NotSupportedError, match=r"module 's.0' was given stage 0 but it "
                       r"is inside 's' on stage 1"):
        _plan(root, 2, auto_partition=False)
    with pytest.raises(smp.ConfigError, match="default_partition .* is 5"):
        _plan(_Tied(), 2, auto_partition=False, default_partition=5)


def test_mode_choice(smp_single, monkeypatch):
    from smp.pipeline.modcall import use_module_pipeline

    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x) if float(x.sum()) > 0 else x

    assert not use_module_pipeline(seq)
    assert use_module_pipeline(Branchy())
    monkeypatch.setenv("SMP_PIPELINE_MODE", "module")
    assert use_module_pipeline(seq)
    monkeypatch.setenv("SMP_PIPELINE_MODE", "fx")
    assert not use_module_pipeline(Branchy())
    monkeypatch.setenv("SMP_PIPELINE_MODE", "bogus")
    with pytest.raises(smp_single.ConfigError, match="SMP_PIPELINE_MODE='bogus'"):
        use_module_pipeline(seq)


def _train(np, *args, env=None):
    out = run_mpi(np, "pipeline_modules.py", *[str(a) for a in args], env=env).stdout
    assert ok_ranks(out, "pipeline_modules") == list(range(np)), out
    return out


@pytest.mark.mpi
def test_toy_control_flow_and_child_called_twice_pp2():
    """Both schedules, 4 microbatches: the step statistics show 4 live
    microbatches per stage for simple, 1 for interleaved."""
    out = _train(2, "toy", 2, 4, "both")
    assert "'twice': 1" in out, out      # the child called twice lives on stage 1
    assert "case toy pp2 interleaved: passed" in out and "case toy pp2 simple: passed" in out


@pytest.mark.mpi
def test_manual_placement_pp2():
    _train(2, "manual", 2)


@pytest.mark.mpi
def test_forced_module_level_chain_pp2():
    _train(2, "seq", 2, 4, env={"SMP_PIPELINE_MODE": "module"})


@pytest.mark.mpi
def test_errors_on_a_stage_reach_every_stage():
    _train(2, "errors", 2)


@needs_transformers
@pytest.mark.mpi
def test_gpt2_pp2_both_schedules():
    out = _train(2, "gpt2", 2, 2, "both")
    assert "'lm_head': 0" in out and "'transformer.h.3': 1" in out, out
    assert "case gpt2 pp2 simple: passed" in out, out


@needs_transformers
@pytest.mark.mpi
def test_gpt2_pp2_activation_memory_per_schedule():
    """Peak saved-activation bytes of a step with 4 microbatches, on each
    stage: simple holds 4 microbatches' worth, interleaved one."""
    out = _train(2, "memory", "gpt2", 2)
    assert out.count("4 microbatches: simple") == 2, out


@needs_transformers
@pytest.mark.mpi
def test_gpt2_pp4():
    _train(4, "gpt2", 4)


@needs_transformers
@pytest.mark.mpi
def test_gpt2_pp2_rdp2():
    _train(4, "gpt2", 2)


@needs_transformers
@pytest.mark.mpi
def test_bert_pp2():
    _train(2, "bert", 2)


@needs_transformers
@pytest.mark.mpi
def test_gpt2_pp2_checkpoint_flow(tmp_path):
    """Partial save and resume equal to uninterrupted training; the full state
    dict loads into the plain GPT2LMHeadModel (strict, tie kept)."""
    _train(2, "checkpoint", tmp_path)


@needs_transformers
@pytest.mark.mpi
def test_bert_pp4():
    """Layers larger than a stage's share are split into their children."""
    out = _train(4, "bert", 4)
    assert "'bert.encoder.layer.0.attention': 1" in out, out


# ---- the full schedule x layout matrix (SMP_PIPELINE_FULL=1) ---------------------

_FULL = pytest.mark.skipif(os.environ.get("SMP_PIPELINE_FULL") != "1",
                           reason="the full schedule x layout matrix runs with "
                           "SMP_PIPELINE_FULL=1")


@_FULL
@pytest.mark.pipeline_full
@needs_transformers
@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("pp", [2, 4])
def test_full_pp(kind, pp):
    out = _train(pp, kind, pp, 4, "both")
    assert f"case {kind} pp{pp} simple: passed" in out, out


@_FULL
@pytest.mark.pipeline_full
@needs_transformers
@pytest.mark.mpi
@pytest.mark.parametrize("rdp", [1, 2])
@pytest.mark.timeout(700)
def test_full_pp2_tp2(rdp):
    """pp2 x tp2 (4 processes) and pp2 x tp2 x rdp2 (8): GPT-2 and BERT under
    both schedules (tests/python/mp/hf_tp.py)."""
    np = 4 * rdp
    cases = []
    for kind in ("gpt2", "bert"):
        for schedule in ("interleaved", "simple"):
            cases += ["+", "train", kind, 2, 2, "float32", schedule]
    out = run_mpi(np, "hf_tp.py", *[str(a) for a in cases[1:]], timeout=600).stdout
    assert ok_ranks(out, "hf_tp") == list(range(np)), out
    assert out.count(": passed") == 4, out


@_FULL
@pytest.mark.pipeline_full
@needs_transformers
@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["toy", "bert"])
def test_full_activation_memory(kind):
    out = _train(2, "memory", kind, 2)
    assert out.count("4 microbatches: simple") == 2, out
