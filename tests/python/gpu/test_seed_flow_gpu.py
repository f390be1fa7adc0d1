"""Issue 5's seed flow (tests/python/mp/seed_flow.py) on 4 GPUs: pp2 x tp2, one
rank per GPU, CUDA tensors over NCCL. Skips without 4 CUDA GPUs."""

import pytest

from conftest import ok_ranks
from test_nccl import needs_gpus, run_gpu

pytestmark = [pytest.mark.timeout(600)] + needs_gpus(4)


@pytest.mark.parametrize("shard", [0, 1])
def test_seed_flow_on_4_gpus(tmp_path, shard):
    out = run_gpu(4, "seed_flow.py", tmp_path, shard, SEED_FLOW_DEVICE="cuda")
    assert ok_ranks(out, "seed_flow") == [0, 1, 2, 3], out[-20000:]
