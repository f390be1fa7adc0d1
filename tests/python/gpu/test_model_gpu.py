"""smp.DistributedModel / DistributedOptimizer on GPUs: the training
equivalence script (tests/python/mp/model_equivalence.py: smp.nn layers,
every (tp, rdp) grid of the world, SGD and Adam, shard_optimizer_state and
prescaled_batch off and on, against plain PyTorch) with the model on GPU
local_rank, one rank per GPU (min(4, GPUs) ranks), so that gradients are
averaged through NCCL on the reducer's side stream while the tensor-parallel
layers run their own NCCL collectives. Skipped with fewer than 2 GPUs."""

import os
import signal
import subprocess
import sys

import pytest

# The same skip conditions as the NCCL tests (CUDA, >= 2 GPUs, mpirun).
from test_nccl import GPUS, REPO, TIMEOUT_S, pytestmark  # noqa: F401


def test_model_equivalence_on_gpus():
    np_ = min(4, GPUS)
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "python"), env.get("PYTHONPATH", "")) if p)
    env.update(NCCL_NVLS_ENABLE="0", SMP_COMM_TIMEOUT="120", MODEL_EQUIVALENCE_DEVICE="cuda")
    for name in ("PYTHONPATH", "NCCL_NVLS_ENABLE", "SMP_COMM_TIMEOUT", "MODEL_EQUIVALENCE_DEVICE"):
        cmd += ["-x", name]
    cmd += [sys.executable, str(REPO / "tests" / "python" / "mp" / "model_equivalence.py"),
            str(np_)]
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT_S} s\n{out[-20000:]}", pytrace=False)
    assert proc.returncode == 0, out[-20000:]
    for r in range(np_):
        assert f"model OK {r} " in out, out[-20000:]
