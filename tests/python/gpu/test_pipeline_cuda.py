"""Pipelined training on CUDA tensors (NCCL between stages), one rank per GPU
(2 to 4); skipped with fewer than 2 GPUs."""

from test_nccl import NP, needs_gpus, run_gpu

pytestmark = needs_gpus(2)


def test_pipeline_cuda():
    out = run_gpu(NP, "../gpu/mp/pipeline_cuda.py")
    assert out.count("pipeline_cuda: OK") == NP, out[-20000:]
