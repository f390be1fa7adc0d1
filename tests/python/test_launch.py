"""Launchers and failure behaviour: torchrun, timeouts, a rank dying."""

import time

import pytest

from conftest import ok_ranks, run_mpi, run_mpi_code, run_torchrun

pytestmark = pytest.mark.timeout(300)


@pytest.mark.torchrun
def test_torchrun_tp2_ddp():
    out = run_torchrun(2, "torchrun_basic.py").stdout
    assert ok_ranks(out, "torchrun") == [0, 1], out


@pytest.mark.mpi
def test_recv_from_silent_peer_times_out():
    out = run_mpi(2, "timeout_recv.py", env={"SMP_COMM_TIMEOUT": "2"}).stdout
    assert ok_ranks(out, "timeout") == [0, 1], out
    assert "timeout message:" in out


def _check_abort_output(res, t0):
    out = res.stdout
    assert time.monotonic() - t0 < 150, out
    # The traceback of rank 1, each line prefixed with its rank, then smp's line.
    assert "[smp rank 1] Traceback (most recent call last):" in out, out
    assert "[smp rank 1] RuntimeError: deliberate failure on rank 1" in out, out
    assert "abort_on_exception.py" in out, out
    assert ("[smp rank 1] smp: rank 1 of 2 is ending the job after an uncaught RuntimeError"
            in out), out
    assert "the job did not end" not in out


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["plain", "ddp"])
def test_uncaught_exception_prints_traceback_and_ends_the_job(mode):
    # "ddp": torch.distributed wraps sys.excepthook (it points sys.stderr at a
    # buffer while it calls the hook it wrapped); the traceback must still show.
    t0 = time.monotonic()
    res = run_mpi(2, "abort_on_exception.py", *(["ddp"] if mode == "ddp" else []), expect_rc=1)
    _check_abort_output(res, t0)


@pytest.mark.mpi
def test_uncaught_exception_after_user_init_process_group():
    # torch.distributed wraps the hook after smp installed its own.
    code = (
        "import socket, smp, torch.distributed as dist\n"
        "smp.init({'pipeline_parallel_degree': 2})\n"
        "if smp.rank() == 0:\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "    smp.broadcast(port, smp.WORLD)\n"
        "else:\n"
        "    port = smp.recv_from(0, smp.RankType.WORLD_RANK)\n"
        "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', "
        "rank=smp.rank(), world_size=smp.size())\n"
        "if smp.rank() == 1: raise RuntimeError('deliberate failure on rank 1')\n"
        "smp.barrier(timeout=200)\n"
        "print('rank 0 passed the barrier: the job did not end', flush=True)\n"
    )
    t0 = time.monotonic()
    res = run_mpi_code(2, code, expect_rc=1)
    out = res.stdout
    assert time.monotonic() - t0 < 150, out
    assert "[smp rank 1] RuntimeError: deliberate failure on rank 1" in out, out
    assert "smp: rank 1 of 2 is ending the job after an uncaught RuntimeError" in out, out
    assert "the job did not end" not in out


@pytest.mark.torchrun
@pytest.mark.parametrize("mode", ["plain", "ddp"])
def test_uncaught_exception_under_torchrun(mode):
    t0 = time.monotonic()
    res = run_torchrun(2, "abort_on_exception.py", *(["ddp"] if mode == "ddp" else []),
                       expect_rc=1)
    _check_abort_output(res, t0)
