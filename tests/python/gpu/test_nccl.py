"""NCCL backend on real GPUs, and what the other GPU tests share: the GPU
count, the environment of every GPU run and run_gpu(), which starts a script
under mpirun with one rank per GPU (tests/python/conftest.py's run_mpi, with
its timeout). test_nccl_collectives runs gpu/mp/nccl_collectives.py on 2 to 4
ranks; skipped when torch sees fewer than 2 CUDA devices.

The skip conditions only need torch, so collecting these files works before the
smp package is built.
"""

import shutil

import pytest
import torch

from conftest import run_mpi

TIMEOUT_S = 300
# Never NVLink multicast on these machines; NCCL calls get 120 s.
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "SMP_COMM_TIMEOUT": "120"}


def _gpu_count():
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver means no usable GPU
        return 0


GPUS = _gpu_count()
NP = max(2, min(4, GPUS))


def needs_gpus(n):
    """Skip marks for a test that runs one rank on each of n GPUs."""
    return [
        pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA GPUs, torch sees {GPUS}"),
        pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (OpenMPI) on PATH"),
    ]


def run_gpu(np_, script, *args, timeout=TIMEOUT_S, **env):
    """mpirun -np np_ python tests/python/mp/<script> args (a path relative to
    that folder, e.g. "../gpu/mp/x.py"), with GPU_ENV and `env`; returns the
    output and fails the test on a non-zero exit or a timeout."""
    out = run_mpi(np_, script, *args, env={**GPU_ENV, **env}, timeout=timeout).stdout
    print(out[-6000:])
    return out


pytestmark = needs_gpus(2)


def test_nccl_collectives():
    out = run_gpu(NP, "../gpu/mp/nccl_collectives.py")
    assert "nccl_collectives: OK" in out, out[-20000:]
