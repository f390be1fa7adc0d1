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

import shutil

import pytest
import torch

from conftest import ok_ranks, run_mpi

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
RANKS = 8
TIMEOUT_S = 420
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
       "NVSHMEM_DISABLE_NVLS": "1", "SMP_COMM_TIMEOUT": "120"}

pytestmark = [
    pytest.mark.timeout(TIMEOUT_S + 60),
    pytest.mark.skipif(GPUS < RANKS, reason=f"needs {RANKS} CUDA GPUs, torch sees {GPUS}"),
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (OpenMPI) on PATH"),
]


def _run(script, *args, **env):
    out = run_mpi(RANKS, script, *args, env={**ENV, **env}, timeout=TIMEOUT_S).stdout
    print(out[-6000:])
    return out


def test_collectives_on_8_gpus():
    out = _run("../gpu/mp/nccl_collectives.py", NCCL_COLLECTIVES_DEVICE="cuda")
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
