"""Pipelined training on CUDA tensors (NCCL between stages), one rank per GPU;
skipped with fewer than 2 GPUs (conditions of test_nccl.py)."""

from test_nccl import NP, _mpirun, pytestmark  # noqa: F401


def test_pipeline_cuda():
    out = _mpirun("pipeline_cuda.py", NP)
    assert out.count("pipeline_cuda: OK") == NP, out
