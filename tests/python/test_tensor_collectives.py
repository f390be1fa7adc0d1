"""Tensor collectives (smp.comm) on CPU tensors over smp's groups."""

import pytest

from conftest import ok_ranks, run_mpi

pytestmark = pytest.mark.timeout(300)


def _ok(out, np):
    return ok_ranks(out, "tensors") == list(range(np))


@pytest.mark.mpi
def test_tensor_collectives_np8():
    out = run_mpi(8, "tensors.py", 2, 2).stdout
    assert _ok(out, 8), out


@pytest.mark.mpi
def test_tensor_collectives_np2_tp2():
    out = run_mpi(2, "tensors.py", 1, 2).stdout
    assert _ok(out, 2), out


def test_tensor_collectives_single_process(smp_single):
    import torch

    smp = smp_single
    smp.init()
    t = torch.ones(3)
    assert smp.comm.allreduce(t, smp.TP_GROUP, smp.ReduceOp.AVG) is t
    assert torch.equal(t, torch.ones(3))
    assert torch.equal(smp.comm.allgather(torch.arange(3)), torch.arange(3).reshape(1, 3))
    assert torch.equal(smp.comm.reduce_scatter(torch.arange(4.0)), torch.arange(4.0))
    assert torch.equal(smp.comm.broadcast(torch.ones(2), 0, smp.DP_GROUP), torch.ones(2))
    with pytest.raises(smp.ConfigError, match="timeout must be a positive number of seconds"):
        smp.comm.allreduce(t, smp.WORLD, timeout=0)


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [4, 8])
def test_gpu_collectives_script_on_cpu_tensors(np_):
    """tests/python/gpu/mp/nccl_collectives.py (the GPU suite's collective
    checks, every layout of the world size, RDP_GROUP included) on CPU tensors
    over MPI: validates the script the GPU runs at 4 and 8 ranks, and the host
    communicator on the full tp2 x pp2 x rdp2 grid."""
    out = run_mpi(np_, "../gpu/mp/nccl_collectives.py",
                  env={"NCCL_COLLECTIVES_DEVICE": "cpu"}).stdout
    assert "nccl_collectives: OK" in out, out
