"""Writes tests/data/compat_v1: checkpoints written by smp before issue 11's
restructuring of the checkpoint engine, which every later smp must still load
(tests/python/test_checkpoint_compat.py).

Written by commit b269e93 of smp (main before issue 11), with torch 2.13.0:

    PYTHONPATH=python mpirun -np 2 python3 tests/data/make_compat.py tests/data/compat_v1

On 2 ranks (pp 1 x tp 2): a tensor-parallel model trained one step with Adam,
then
  partial/ckpt.pt        smp.save({"model", "optimizer"}, partial=True): one file per tp rank
                         and the manifest
  train/step1_partial/   smp.save_checkpoint(partial=True): model, optimizer states,
                         user content, smp_config.pt, and train/newest
  full/model.pt          smp.save(model.state_dict(gather_to_rank0=True), partial=False)
  expected.json          canonical() of what each file held when saved
Do not regenerate it with newer code: its point is to be old.
"""

import json
import math
import os
import sys


def canonical(obj):
    """A JSON-able rendering of a loaded object: containers keep their order
    and type name; tensors give dtype, shape and their values."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {"tensor": str(obj.dtype), "shape": list(obj.shape),
                "values": obj.detach().cpu().double().flatten().tolist()}
    if isinstance(obj, dict):
        return {"dict": type(obj).__name__,
                "items": [[repr(k), canonical(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [canonical(x) for x in obj]}
    if isinstance(obj, float) and math.isnan(obj):
        return {"float": "nan"}
    return {type(obj).__name__: obj if isinstance(obj, (int, float, str, bool, type(None)))
            else repr(obj)}


def main(out):
    import torch
    import torch.nn.functional as F

    import smp

    smp.init({"pipeline_parallel_degree": 1, "tensor_parallel_degree": 2, "ddp": True})
    assert smp.size() == 2 and smp.tp_size() == 2
    torch.manual_seed(0)
    with smp.tensor_parallelism():
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = smp.DistributedModel(net)
    params = list(dict.fromkeys(model.parameters()))
    optimizer = smp.DistributedOptimizer(torch.optim.Adam(params, lr=1e-2))

    @smp.step
    def train_step(model, x, y):
        loss = F.cross_entropy(model(x), y)
        model.backward(loss)
        return loss

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 4, generator=g), torch.randint(0, 2, (4,), generator=g)
    optimizer.zero_grad()
    train_step(model, x, y)
    optimizer.step()

    expected = {}
    state = {"model": model.local_state_dict(), "optimizer": optimizer.local_state_dict()}
    os.makedirs(os.path.join(out, "partial"), exist_ok=True)
    smp.barrier()
    smp.save(state, os.path.join(out, "partial", "ckpt.pt"), partial=True)
    expected[f"partial/tp{smp.tp_rank()}"] = canonical(state)

    smp.save_checkpoint(os.path.join(out, "train"), tag="step1", partial=True, model=model,
                        optimizer=optimizer, user_content={"step": 1, "note": "compat"})
    expected[f"train/model/tp{smp.tp_rank()}"] = canonical(model.local_state_dict())

    full = model.state_dict(gather_to_rank0=True)
    if smp.rank() == 0:
        os.makedirs(os.path.join(out, "full"), exist_ok=True)
        smp.save(full, os.path.join(out, "full", "model.pt"), partial=False)
        expected["full"] = canonical(full)
    gathered = smp.allgather(expected, smp.WORLD)
    if smp.rank() == 0:
        merged = {}
        for part in gathered:
            merged.update(part)
        with open(os.path.join(out, "expected.json"), "w") as fd:
            json.dump(dict(sorted(merged.items())), fd, indent=1)
            fd.write("\n")
    smp.barrier()
    print("make_compat OK", smp.rank())


if __name__ == "__main__":
    main(sys.argv[1])
