"""The object API (smp.broadcast, send, recv_from, allgather, gather, barriers)."""

import pytest

from conftest import ok_ranks, run_mpi

pytestmark = pytest.mark.timeout(300)


@pytest.mark.mpi
def test_object_api_np8():
    out = run_mpi(8, "objects.py").stdout
    assert ok_ranks(out, "objects") == list(range(8)), out


def test_object_api_single_process(smp_single):
    smp = smp_single
    smp.init()
    assert smp.allgather({"a": 1}, smp.WORLD) == [{"a": 1}]
    assert smp.gather(3, smp.DP_GROUP) == [3]
    assert smp.broadcast("x", smp.WORLD) == "x"
    smp.barrier()
    smp.dp_barrier()
    smp.mp_barrier()
    with pytest.raises(smp.ConfigError) as e:
        smp.recv_from(1, smp.RankType.PP_RANK)
    msg = str(e.value)
    assert "PP_RANK 1 does not exist" in msg and "PP_RANK 0..0" in msg
