"""Launchers and failure behaviour: torchrun, timeouts, a rank dying."""

import time

import pytest

from conftest import ok_ranks, run_mpi, run_torchrun

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


@pytest.mark.mpi
def test_uncaught_exception_ends_the_job():
    t0 = time.monotonic()
    res = run_mpi(2, "abort_on_exception.py", expect_rc=1)
    assert time.monotonic() - t0 < 150, res.stdout
    assert "deliberate failure on rank 1" in res.stdout
    assert "is ending the job after an uncaught RuntimeError" in res.stdout
    assert "the job did not end" not in res.stdout
