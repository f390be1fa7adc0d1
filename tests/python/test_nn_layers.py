"""smp.nn tensor-parallel modules: forward and backward against plain torch
modules under mpirun (mp/nn_layers.py), errors and aliases in one process."""

import pytest

from conftest import ok_ranks, run_mpi

pytestmark = pytest.mark.timeout(300)


@pytest.mark.mpi
@pytest.mark.parametrize("np", [1, 2, 4])
def test_nn_layers_match_torch(np):
    out = run_mpi(np, "nn_layers.py").stdout
    assert ok_ranks(out, "nn_layers") == list(range(np)), out


def test_nn_needs_init_and_aliases(smp_single):
    import importlib

    smp = smp_single
    with pytest.raises(smp.StateError, match=r"smp.nn.DistributedEmbedding needs smp.init\(\) first"):
        smp.nn.DistributedEmbedding(10, 4)
    alias = importlib.import_module("smdistributed.modelparallel.torch.nn")
    assert alias is smp.nn
    assert alias.DistributedLinear is smp.nn.DistributedLinear
    smp.init()
    with pytest.raises(smp.ConfigError, match="padding_idx -11 is outside the vocabulary of 10"):
        smp.nn.DistributedEmbedding(10, 4, padding_idx=-11)
    with pytest.raises(smp.ConfigError, match="in_features must be positive, got 0"):
        smp.nn.DistributedLinear(0, 4)
    with pytest.raises(smp.ConfigError, match="at least one of pre_layernorm and post_layernorm"):
        smp.nn.DistributedTransformerLayer(4, 2, 8, 8, pre_layernorm=False, post_layernorm=False)
    with pytest.raises(smp.ConfigError, match="expects a torch.nn.Linear, got Embedding"):
        smp.nn.DistributedLinear.from_module(__import__("torch").nn.Embedding(3, 2))
    layer = smp.nn.DistributedTransformerLayer(2, 2, 4, 6, causal_mask_size=3)
    with pytest.raises(smp.ConfigError, match="sequence length 4 exceeds causal_mask_size 3"):
        layer(__import__("torch").zeros(1, 4, 4))
    with pytest.raises(smp.ConfigError, match="has no parameter 'weight'; its parameters are: "
                       "attention.query.weight"):
        layer._smp_gather_full("weight")
