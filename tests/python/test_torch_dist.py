"""torch.distributed process groups created by smp.init with ddp=True."""

import pytest

from conftest import ok_ranks, run_mpi

pytestmark = pytest.mark.timeout(300)


@pytest.mark.mpi
@pytest.mark.parametrize("np, pp, tp, placement", [(8, 2, 2, "cluster"), (4, 1, 2, "spread")])
def test_process_groups(np, pp, tp, placement):
    out = run_mpi(np, "torch_dist.py", pp, tp, placement).stdout
    assert ok_ranks(out, "torch_dist") == list(range(np)), out


def test_process_groups_single_process(smp_single):
    import torch
    import torch.distributed as dist

    smp = smp_single
    smp.init({"ddp": True})
    x = torch.ones(2)
    dist.all_reduce(x, group=smp.get_dp_process_group())
    assert torch.equal(x, torch.ones(2))
    smp.shutdown()
    assert not dist.is_initialized()


def test_process_group_without_ddp_is_state_error(smp_single):
    smp = smp_single
    smp.init({"ddp": False})
    with pytest.raises(smp.StateError) as e:
        smp.get_tp_process_group()
    assert "ddp=False" in str(e.value) and "'ddp': True" in str(e.value)
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_ddp_backend_nccl_without_cuda(smp_single):
    import torch

    smp = smp_single
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(smp.ConfigError, match="'ddp_dist_backend' is 'nccl' but CUDA"):
        smp.init({"ddp": True, "ddp_dist_backend": "nccl"})
    assert not smp.is_initialized()
