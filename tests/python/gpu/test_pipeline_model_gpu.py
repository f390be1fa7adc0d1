"""Issue 4 on 4 GPUs: tests/python/mp/pipeline_model_equivalence.py with CUDA
tensors (pp2 x tp2, pp2 x rdp2, pp4 through smp.DistributedModel, both
schedules, microbatches 1/2/4) against plain PyTorch. Skips without 4 GPUs."""

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


def test_pipeline_model_equivalence_on_4_gpus():
    env = {"PIPELINE_MODEL_DEVICE": "cuda", "NCCL_NVLS_ENABLE": "0", "SMP_COMM_TIMEOUT": "120"}
    out = run_mpi(4, "pipeline_model_equivalence.py", env=env).stdout
    print(out[-4000:])
    assert ok_ranks(out, "pipeline_model") == [0, 1, 2, 3], out
