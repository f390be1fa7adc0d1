"""Issue 6: the full grid tp2 x pp2 x rdp2 on 8 GPUs, one rank per GPU, NCCL.

The only layout in which every group kind (TP, PP, RDP, DP, MP) has two or more
members at once needs 8 ranks. Runs, under mpirun -np 8 with CUDA tensors:
  - the collective checks (gpu/mp/nccl_collectives.py: every 8-rank layout,
    pp2 x tp2 x rdp2 first; TP/DP/PP/RDP/WORLD groups, float32/bfloat16/int64);
  - the tensor/data parallel equivalence (mp/model_equivalence.py at world 8:
    (tp, rdp) in (1, 8), (2, 4), (4, 2));
  - the pipeline equivalence (mp/pipeline_model_equivalence.py at world 8:
    pp2 x tp2 x rdp2 with both schedules and microbatches 1/2/4, pp4 x tp2);
  - the seed's checkpoint flow (mp/seed_flow.py: pp2 x tp2 x rdp2) with
    shard_optimizer_state off and on.
Each must match plain PyTorch exactly as on the CPU. Skips without 8 GPUs (the
same scripts run on the CPU under mpirun -np 8 in tests/python).
"""

import pytest

from conftest import ok_ranks
from test_nccl import needs_gpus, run_gpu

RANKS = 8
TIMEOUT_S = 420

pytestmark = [pytest.mark.timeout(TIMEOUT_S + 60)] + needs_gpus(RANKS)


def _run(script, *args, **env):
    return run_gpu(RANKS, script, *args, timeout=TIMEOUT_S, **env)


def test_collectives_on_8_gpus():
    out = _run("../gpu/mp/nccl_collectives.py")
    assert "nccl_collectives: OK" in out, out[-20000:]
    assert "pp=2 tp=2 rdp=2" in out, out[-20000:]


def test_model_equivalence_on_8_gpus():
    out = _run("model_equivalence.py", RANKS, MODEL_EQUIVALENCE_DEVICE="cuda")
    for r in range(RANKS):
        assert f"model OK {r} " in out, out[-20000:]


def test_pipeline_model_equivalence_on_8_gpus():
    out = _run("pipeline_model_equivalence.py", PIPELINE_MODEL_DEVICE="cuda")
    assert ok_ranks(out, "pipeline_model") == list(range(RANKS)), out[-20000:]


@pytest.mark.parametrize("shard", [0, 1])
def test_seed_flow_on_8_gpus(tmp_path, shard):
    out = _run("seed_flow.py", tmp_path, shard, SEED_FLOW_DEVICE="cuda")
    assert ok_ranks(out, "seed_flow") == list(range(RANKS)), out[-20000:]
