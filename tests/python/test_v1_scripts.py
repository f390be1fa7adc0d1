"""Issue 10's acceptance suite: scripts written the way smp v1's public
examples and API documentation write them (tests/python/mp/v1_scripts), run
unchanged under mpirun on several pipeline x tensor x data-parallel layouts
(the configuration reaches their bare `smp.init()` through
SM_HP_MP_PARAMETERS, as on SageMaker). Each compares the losses (and outputs)
it reads with plain PyTorch trained on the global batch (atol 1e-5) and prints
"<tag> OK <rank>" on every rank.

- train_loss_rank0: loss read and printed on world rank 0 only
- train_loss_pp_rank0: loss and outputs read on pp_rank 0 only
- train_loss_every_rank: every rank, reduce_mean/reduce_sum in different orders
- evaluate_concat: eval_step(...).concat() on every rank
- dict_return: a step returning a dict, out["logits"].concat(), out["loss"]
- partition_hooks: smp.set_partition after wrapping, post-partition and
  post-step hooks with (model, optimizer), model.module.module with ddp
"""

import json

import pytest

from conftest import ok_ranks, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

SCRIPTS = {
    "train_loss_rank0": "v1_train_rank0",
    "train_loss_pp_rank0": "v1_train_pp_rank0",
    "train_loss_every_rank": "v1_train_every_rank",
    "evaluate_concat": "v1_evaluate",
    "dict_return": "v1_dict_return",
    "partition_hooks": "v1_partition_hooks",
}

# name: (processes, config)
LAYOUTS = {
    "pp1": (1, {"microbatches": 2}),
    "pp2": (2, {"pipeline_parallel_degree": 2, "microbatches": 2}),
    "pp4": (4, {"pipeline_parallel_degree": 4, "microbatches": 4, "pipeline": "simple"}),
    "pp2_tp2": (4, {"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2,
                    "microbatches": 2}),
    "pp2_rdp2": (4, {"pipeline_parallel_degree": 2, "microbatches": 4}),
    "pp2_tp2_rdp2": (8, {"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2,
                         "microbatches": 2}),
    "pp4_tp2": (8, {"pipeline_parallel_degree": 4, "tensor_parallel_degree": 2,
                    "microbatches": 2}),
}

# Every script on pp2, pp4 and pp2 x tp2; the others on a subset (8 processes
# on a small CI machine are slow).
CASES = [(s, layout) for layout in ("pp2", "pp4", "pp2_tp2") for s in SCRIPTS]
CASES += [(s, "pp2_rdp2") for s in ("train_loss_rank0", "evaluate_concat", "partition_hooks")]
CASES += [(s, "pp2_tp2_rdp2") for s in ("train_loss_pp_rank0", "dict_return")]
CASES += [("train_loss_every_rank", "pp4_tp2")]
CASES += [(s, "pp1") for s in ("train_loss_rank0", "evaluate_concat")]


def run_v1_script(script, layout, runner=None):
    """Runs script on layout under mpirun (``runner(np, path, env)`` returning
    the output, for the GPU tests); checks every rank printed its OK line."""
    np_, config = LAYOUTS[layout]
    config = dict(config, ddp=True)
    if script == "partition_hooks":
        config.update(auto_partition=False, default_partition=0)
    env = {"SM_HP_MP_PARAMETERS": json.dumps(config)}
    path = f"v1_scripts/{script}.py"
    out = runner(np_, path, env) if runner else run_mpi(np_, path, env=env).stdout
    assert ok_ranks(out, SCRIPTS[script]) == list(range(np_)), out[-20000:]
    return out


@pytest.mark.parametrize("script,layout", CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_v1_script(script, layout):
    out = run_v1_script(script, layout)
    if script in ("train_loss_rank0", "dict_return"):
        # The loss is printed on rank 0 only, once per step.
        assert out.count("Train step 0 loss") == 1, out[-20000:]
