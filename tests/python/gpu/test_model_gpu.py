"""smp.DistributedModel / DistributedOptimizer on GPUs: the training
equivalence script (tests/python/mp/model_equivalence.py: smp.nn layers,
every (tp, rdp) grid of the world, SGD and Adam, shard_optimizer_state and
prescaled_batch off and on, against plain PyTorch) with the model on GPU
local_rank, one rank per GPU (min(4, GPUs) ranks), so that gradients are
averaged through NCCL on the reducer's side stream while the tensor-parallel
layers run their own NCCL collectives. Skipped with fewer than 2 GPUs."""

from test_nccl import GPUS, needs_gpus, run_gpu

pytestmark = needs_gpus(2)


def test_model_equivalence_on_gpus():
    np_ = min(4, GPUS)
    out = run_gpu(np_, "model_equivalence.py", np_, MODEL_EQUIVALENCE_DEVICE="cuda")
    for r in range(np_):
        assert f"model OK {r} " in out, out[-20000:]
