"""Helpers for the Python tests: run scripts under mpirun or torchrun with the
in-tree package on PYTHONPATH, with a timeout, showing the output on failure."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
MP_DIR = TESTS_DIR / "mp"
REPO_ROOT = TESTS_DIR.parents[1]
PYTHON_DIR = REPO_ROOT / "python"

if importlib.util.find_spec("smp") is None:
    sys.path.insert(0, str(PYTHON_DIR))

# A multi-process script that has not finished by then has hung.
PROCESS_TIMEOUT_S = 240


def _env(extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PYTHON_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["SMP_COMM_TIMEOUT"] = "60"
    env.pop("SM_HP_MP_PARAMETERS", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _run(cmd, env, timeout, expect_rc=0):
    """Runs cmd in its own process group; kills the whole group on timeout."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=str(TESTS_DIR),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(
            f"timed out after {timeout} s: {' '.join(cmd)}\n--- output ---\n{out[-20000:]}",
            pytrace=False,
        )
    if expect_rc is not None and (proc.returncode == 0) != (expect_rc == 0):
        pytest.fail(
            f"exit status {proc.returncode} (expected {'0' if expect_rc == 0 else 'non-zero'}): "
            f"{' '.join(cmd)}\n--- output ---\n{out[-20000:]}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def mpirun_prefix(np):
    cmd = ["mpirun", "-np", str(np), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def run_mpi(np, script, *args, env=None, timeout=PROCESS_TIMEOUT_S, expect_rc=0):
    """mpirun -np N python tests/python/mp/<script> args...; returns the
    CompletedProcess (stdout and stderr merged) and fails the test when the
    exit status is not the expected one or the run times out."""
    full_env = _env(env)
    cmd = mpirun_prefix(np)
    for name in dict.fromkeys(("PYTHONPATH", "SMP_COMM_TIMEOUT", *(env or {}))):
        cmd += ["-x", name]
    cmd += [sys.executable, str(MP_DIR / script), *map(str, args)]
    return _run(cmd, full_env, timeout, expect_rc)


def run_mpi_code(np, code, env=None, timeout=PROCESS_TIMEOUT_S, expect_rc=0, tag_output=False):
    """mpirun -np N python -c CODE. With tag_output, mpirun prefixes every line
    with "[job,rank]<stdout>:" and never joins pieces of two ranks' lines."""
    full_env = _env(env)
    cmd = mpirun_prefix(np)
    if tag_output:
        cmd.append("--tag-output")
    for name in dict.fromkeys(("PYTHONPATH", "SMP_COMM_TIMEOUT", *(env or {}))):
        cmd += ["-x", name]
    cmd += [sys.executable, "-c", code]
    return _run(cmd, full_env, timeout, expect_rc)


def run_torchrun(nproc, script, *args, env=None, timeout=PROCESS_TIMEOUT_S, expect_rc=0):
    """python -m torch.distributed.run --standalone --nproc_per_node N mp/<script>."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), str(MP_DIR / script), *map(str, args),
    ]
    return _run(cmd, _env(env), timeout, expect_rc)


@pytest.fixture
def smp_single():
    """The smp package in this (single) process; shut down after the test."""
    import smp

    yield smp
    smp.shutdown()


def ok_ranks(output, tag):
    """Ranks that printed "<tag> OK <rank>" (mpirun may join lines of
    different ranks, so this searches rather than splitting lines)."""
    return sorted(int(m) for m in re.findall(re.escape(tag) + r" OK (\d+)", output))
