"""Issue 10's acceptance scripts (tests/python/mp/v1_scripts, see
tests/python/test_v1_scripts.py) with CUDA tensors, one rank per GPU (NCCL
between pipeline stages, for the step results too), against plain PyTorch on
the same GPU. 1 GPU: pp1 (no pipeline, the StepOutput path without a
transfer); 2 GPUs: pp2; 4: pp4, pp2 x tp2, pp2 x rdp2; 8: pp2 x tp2 x rdp2 and
pp4 x tp2. Each case skips without enough GPUs."""

import pytest

from test_nccl import needs_gpus, run_gpu
from test_v1_scripts import LAYOUTS, SCRIPTS, run_v1_script

ALL = list(SCRIPTS)
NO_HOOKS = [s for s in SCRIPTS if s != "partition_hooks"]
CASES = ([(s, "pp1") for s in NO_HOOKS] + [(s, "pp2") for s in ALL]
         + [(s, lay) for lay in ("pp4", "pp2_tp2", "pp2_rdp2") for s in ALL]
         + [(s, lay) for lay in ("pp2_tp2_rdp2", "pp4_tp2") for s in ALL])

pytestmark = pytest.mark.timeout(600)


def _gpu_runner(np_, path, env):
    return run_gpu(np_, path, timeout=420, V1_DEVICE="cuda", **env)


@pytest.mark.parametrize("script,layout", CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_v1_script_on_gpus(script, layout):
    np_ = LAYOUTS[layout][0]
    for mark in needs_gpus(np_):
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    run_v1_script(script, layout, runner=_gpu_runner)
