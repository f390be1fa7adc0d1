"""Issue 4 on GPUs: tests/python/mp/pipeline_model_equivalence.py with CUDA
tensors, one rank per GPU, NCCL, against plain PyTorch, through
smp.DistributedModel: on 4 GPUs pp2 x tp2, pp2 x rdp2 and pp4; on 2 or 3 GPUs
pp2 alone (both schedules, microbatches 1/2/4, the Sequential and the
two-submodule model). Skips with fewer than 2 GPUs. 8 GPUs: test_full_grid_8gpu."""

import pytest

from conftest import ok_ranks
from test_nccl import GPUS, needs_gpus, run_gpu

RANKS = 4 if GPUS >= 4 else 2

pytestmark = [pytest.mark.timeout(600)] + needs_gpus(2)


def test_pipeline_model_equivalence_on_gpus():
    out = run_gpu(RANKS, "pipeline_model_equivalence.py", timeout=420,
                  PIPELINE_MODEL_DEVICE="cuda")
    assert ok_ranks(out, "pipeline_model") == list(range(RANKS)), out[-20000:]
