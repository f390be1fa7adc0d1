"""The seed's checkpoint flow, end to end, under mpirun (issue 5).

    mpirun -np 4 python seed_flow.py <dir> <shard_optimizer_state 0|1>   # pp2 x tp2
    mpirun -np 8 python seed_flow.py <dir> <0|1>                         # pp2 x tp2 x rdp2

A model built under smp.tensor_parallelism() (its Linear layers become
tensor-parallel) and partitioned over 2 pipeline stages is wrapped with
smp.DistributedModel; the optimizer gets the deduplicated parameters (the
guide's step 2) and smp.DistributedOptimizer. After a few smp.step training
steps it saves and loads exactly as the guide's Option 1 and Option 2 do, and
checks: round trips are bit-exact (same_partition_load False and True); stock
torch.load(weights_only=True) reads every file smp.save wrote; training resumed
from the checkpoint (in a model re-initialised differently) continues exactly as
uninterrupted training; the full file loads into the plain model with
strict=True and gives the same outputs as the distributed model. Prints
"seed_flow OK <rank>".
"""

import copy
import glob
import os
import sys

import torch
import torch.nn.functional as F

import smp

DIR = sys.argv[1]
SHARD = bool(int(sys.argv[2]))
# SEED_FLOW_DEVICE=cuda: one GPU per rank, NCCL for the CUDA tensors.
DEVICE_TYPE = os.environ.get("SEED_FLOW_DEVICE", "cpu")


def device():
    if DEVICE_TYPE == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
HIDDEN, CLASSES, BATCH = 16, 4, 16


def make_net():
    return torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(2 * HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(2 * HIDDEN, CLASSES))


def build(seed):
    torch.manual_seed(seed)
    with smp.tensor_parallelism():
        net = make_net().to(device())
    model = smp.DistributedModel(net)
    unique_params = []
    unique_params_set = set()
    for p in model.parameters():
        if p not in unique_params_set:
            unique_params.append(p)
            unique_params_set.add(p)
    del unique_params_set
    optimizer = smp.DistributedOptimizer(torch.optim.Adam(unique_params, lr=1e-2))
    return model, optimizer


@smp.step
def train_step(model, x, y):
    loss = F.cross_entropy(model(x), y)
    model.backward(loss)
    return loss


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH * smp.dp_size(), HIDDEN, generator=g)
    y = torch.randint(0, CLASSES, (BATCH * smp.dp_size(),), generator=g)
    lo = smp.dp_rank() * BATCH
    return x[lo:lo + BATCH].to(device()), y[lo:lo + BATCH].to(device())


def step(model, optimizer, i):
    optimizer.zero_grad()
    out = train_step(model, *data(i))
    optimizer.step()
    return float(out.reduce_mean())


def check(cond, what):
    if not cond:
        raise AssertionError(f"seed_flow rank {smp.rank()}: {what}")


def local_snapshot(model, optimizer):
    sd = {k: v.clone() for k, v in model.local_state_dict().items() if torch.is_tensor(v)}
    # state_dict()s hold references to live tensors: copy them. This rank's own
    # part only (gather_if_shard=False): callers may be a subset of the ranks.
    return sd, copy.deepcopy(optimizer.local_state_dict(gather_if_shard=False))


def same_opt_state(a, b):
    sa, sb = a["state"], b["state"]
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        for name, v in sa[k].items():
            w = sb[k][name]
            if torch.is_tensor(v) and not torch.equal(v, w):
                return False
    return True


def init():
    smp.init({"pipeline_parallel_degree": 2, "tensor_parallel_degree": 2, "ddp": True,
              "microbatches": 2, "shard_optimizer_state": SHARD})
    if DEVICE_TYPE == "cuda":
        torch.cuda.set_device(smp.local_rank())


def main():
    init()
    model, optimizer = build(seed=0)
    for i in range(3):
        step(model, optimizer, i)

    # ---- Option 1: partial ------------------------------------------------------
    ckpt = os.path.join(DIR, "checkpoint.pt")
    model_dict = model.local_state_dict()
    opt_dict = optimizer.local_state_dict()
    check(model_dict["_smp_is_partial"] is True, "local_state_dict marks _smp_is_partial")
    saved_model, saved_opt = local_snapshot(model, optimizer)
    if smp.rdp_rank() == 0 or SHARD:
        smp.save({"model_state_dict": model_dict, "optimizer_state_dict": opt_dict},
                 ckpt, partial=True)
    smp.barrier()
    # The uninterrupted run continues from here; remember its losses and result.
    expected = [step(model, optimizer, i) for i in range(3, 6)]
    final_model, _ = local_snapshot(model, optimizer)

    # Every file smp.save wrote loads with stock torch.load(weights_only=True).
    if smp.rank() == 0:
        files = sorted(f for f in glob.glob(ckpt + "_*") if ".tmp" not in f)
        want = 2 * 2 * (smp.rdp_size() if SHARD else 1)
        check(len(files) == want, f"{len(files)} partial files, expected {want}: {files}")
        for f in files:
            obj = torch.load(f, weights_only=True)
            check("model_state_dict" in obj and "optimizer_state_dict" in obj, f"contents of {f}")

    for same_partition_load in (False, True):
        checkpoint = smp.load(ckpt, partial=True)
        model.load_state_dict(checkpoint["model_state_dict"],
                              same_partition_load=same_partition_load)
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        now_model, now_opt = local_snapshot(model, optimizer)
        for k, v in saved_model.items():
            check(torch.equal(now_model[k], v), f"round trip of {k} (same_partition_load="
                  f"{same_partition_load})")
        check(same_opt_state(now_opt, saved_opt), "optimizer state round trip")

    # ---- resume in a differently initialised model --------------------------------
    smp.shutdown()
    init()
    model, optimizer = build(seed=777)
    checkpoint = smp.load(ckpt, partial=True)
    model.load_state_dict(checkpoint["model_state_dict"], same_partition_load=True)
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    resumed = [step(model, optimizer, i) for i in range(3, 6)]
    check(resumed == expected, f"resumed losses {resumed} != uninterrupted {expected}")
    now_model, _ = local_snapshot(model, optimizer)
    for k, v in final_model.items():
        check(torch.equal(now_model[k], v), f"resumed parameter {k} differs from uninterrupted")

    # ---- Option 2: full -----------------------------------------------------------
    full = os.path.join(DIR, "full.pt")
    if smp.rdp_rank() == 0:
        model_dict = model.state_dict(gather_to_rank0=True)
        if smp.rank() == 0:
            smp.save({"model_state_dict": model_dict}, full, partial=False)
    smp.barrier()
    if smp.rdp_rank() == 0:
        checkpoint = smp.load(full, partial=False)
        model.load_state_dict(checkpoint["model_state_dict"])
        now_model, _ = local_snapshot(model, optimizer)
        for k, v in final_model.items():
            check(torch.equal(now_model[k], v), f"full round trip of {k}")
    if smp.rank() == 0:
        plain = make_net()
        plain.load_state_dict(torch.load(full, weights_only=True)["model_state_dict"], strict=True)
        x, _ = data(0)
        ref = plain.to(device())(x)
    # The distributed model's output for the same input, on the last stage.
    @smp.step
    def predict(model, x):
        return model(x)

    x, _ = data(0)
    out = predict(model, x)
    if smp.pp_rank() == smp.pp_size() - 1 and smp.tp_rank() == 0 and smp.rdp_rank() == 0:
        got = out.concat()
        # rank 0 holds the reference: send the prediction there.
        smp.send(got, 0, smp.RankType.WORLD_RANK)
    if smp.rank() == 0:
        src = [r for r in range(smp.size())
               if smp._C.topology().pp_rank(r) == smp.pp_size() - 1
               and smp._C.topology().tp_rank(r) == 0 and smp._C.topology().rdp_rank(r) == 0][0]
        got = smp.recv_from(src, smp.RankType.WORLD_RANK)
        check(torch.allclose(got.to(ref.device), ref, atol=1e-5), "plain model from the full file gives the "
              "distributed model's outputs")
    smp.barrier()
    print(f"seed_flow OK {smp.rank()}", flush=True)
    smp.shutdown()


if __name__ == "__main__":
    main()
