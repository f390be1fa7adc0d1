"""NCCL backend on real GPUs: runs tests/python/gpu/mp/*.py under mpirun, one
rank per GPU (2 to 4 ranks). Skipped when torch sees fewer than 2 CUDA devices.

The skip condition only needs torch, so collecting this file works before the
smp package is built.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PYTHON_DIR = REPO / "python"
MP_DIR = HERE / "mp"
TIMEOUT_S = 300


def _gpu_count():
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver means no usable GPU
        return 0


GPUS = _gpu_count()
NP = max(2, min(4, GPUS))

pytestmark = [
    pytest.mark.skipif(GPUS == 0, reason="needs CUDA (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(0 < GPUS < 2, reason=f"needs at least 2 GPUs, torch sees {GPUS}"),
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (OpenMPI) on PATH"),
]


def _mpirun(script, np_):
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PYTHON_DIR), env.get("PYTHONPATH", "")) if p)
    env["NCCL_NVLS_ENABLE"] = "0"
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env["SMP_COMM_TIMEOUT"] = "120"
    # mpirun forwards only exported variables it is told about.
    for name in ("PYTHONPATH", "NCCL_NVLS_ENABLE", "SMP_COMM_TIMEOUT",
                 "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        cmd += ["-x", name]
    cmd += [sys.executable, str(MP_DIR / script)]
    # A session of its own, so that a timeout ends mpirun and every rank.
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        out, _ = proc.communicate()
        print(out)
        pytest.fail(f"{' '.join(cmd)} did not finish within {TIMEOUT_S} s (output above)")
    if proc.returncode != 0:
        print(out)
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode} (output above)")
    return out


def test_nccl_collectives():
    out = _mpirun("nccl_collectives.py", NP)
    print(out)
    assert "nccl_collectives: OK" in out
