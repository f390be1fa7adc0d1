"""Issue 4 on GPUs: tests/python/mp/pipeline_model_equivalence.py with CUDA
tensors, one rank per GPU, NCCL, against plain PyTorch, through
smp.DistributedModel: on 4 GPUs pp2 x tp2, pp2 x rdp2 and pp4; on 2 or 3 GPUs
pp2 alone (both schedules, microbatches 1/2/4, the Sequential and the
two-submodule model). Skips with fewer than 2 GPUs. 8 GPUs: test_full_grid_8gpu."""

import shutil

import pytest
import torch

from conftest import ok_ranks, run_mpi

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
RANKS = 4 if GPUS >= 4 else 2

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(GPUS < 2, reason=f"needs 2 or more CUDA GPUs, torch sees {GPUS}"),
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (OpenMPI) on PATH"),
]


def test_pipeline_model_equivalence_on_gpus():
    env = {"PIPELINE_MODEL_DEVICE": "cuda", "NCCL_NVLS_ENABLE": "0", "SMP_COMM_TIMEOUT": "120"}
    out = run_mpi(RANKS, "pipeline_model_equivalence.py", env=env, timeout=420).stdout
    print(out[-4000:])
    assert ok_ranks(out, "pipeline_model") == list(range(RANKS)), out
