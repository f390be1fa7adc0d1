"""Issue 5's seed flow (tests/python/mp/seed_flow.py) on 4 GPUs: pp2 x tp2, one
rank per GPU, CUDA tensors over NCCL. Skips without 4 CUDA GPUs."""

import shutil

import pytest
import torch

from conftest import ok_ranks, run_mpi

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(GPUS < 4, reason=f"needs 4 CUDA GPUs, torch sees {GPUS}"),
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (OpenMPI) on PATH"),
]


@pytest.mark.parametrize("shard", [0, 1])
def test_seed_flow_on_4_gpus(tmp_path, shard):
    env = {"SEED_FLOW_DEVICE": "cuda", "NCCL_NVLS_ENABLE": "0", "SMP_COMM_TIMEOUT": "120"}
    out = run_mpi(4, "seed_flow.py", tmp_path, shard, env=env).stdout
    print(out[-4000:])
    assert ok_ranks(out, "seed_flow") == [0, 1, 2, 3], out
