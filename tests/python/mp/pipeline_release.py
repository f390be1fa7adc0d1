"""Pipeline parallelism keeps only this stage's tensors on each rank: the paths
that once saw every stage's parameters still work with the others released.

    mpirun -np 4 python pipeline_release.py <dir> <layout>

layout "pp2tp2" (pp2 x tp2) or "pp2rdp2" (pp2 x rdp2, shard_optimizer_state).
A model with tensor-parallel Linear layers and a module holding buffers is
wrapped and trained a few smp.step steps with DistributedOptimizer(Adam), then:

- the bytes of all parameters and buffers are this stage's only; every other
  stage's parameter is empty but keeps its name, dtype and requires_grad, and
  param_spec keeps its full shape; local_state_dict() holds this stage's entries;
- save_checkpoint / resume_from_checkpoint, partial (model and optimizer) and
  full (model), restore this stage's state exactly after more training;
- a full state dict of the plain model (every stage's entries) loads with
  strict=True: only this stage's part, no shape complaint about the others;
  state_dict(gather_to_rank0=True) gives it back;
- pp2rdp2: a plain torch optimizer state dict over every parameter loads into
  the DistributedOptimizer: this stage's owned parameters take their state, the
  released ones none;
- smp.save/smp.load of local_state_dict() round-trips.

Prints "pipeline_release OK <rank>".
"""

import copy
import os
import sys

import torch
import torch.nn.functional as F

import smp
from pipeline_common import Shift, held_bytes

DIR, LAYOUT = sys.argv[1], sys.argv[2]
IN, HID, OUT, BATCH = 6, 10, 3, 8


def make_net():
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), Shift(HID, spread=0.2), torch.nn.Tanh(),
                               torch.nn.Linear(HID, HID), torch.nn.ReLU(),
                               torch.nn.Linear(HID, OUT))


def check(cond, what):
    if not cond:
        raise AssertionError(f"pipeline_release {LAYOUT} rank {smp.rank()} (pp_rank "
                             f"{smp.pp_rank()}): {what}")


def check_released(model, plain):
    local = list(model.local_parameters()) + list(model.local_buffers())
    local_ids = {id(t) for t in local}
    total = held_bytes(list(model.get_module().parameters()) + list(model.get_module().buffers()))
    mine = held_bytes(local)
    check(total == mine > 0, f"parameters and buffers hold {total} bytes, this stage's {mine}")
    full_shapes = {n: tuple(p.shape) for n, p in plain.named_parameters()}
    for name, p in model.get_module().named_parameters():
        check(model.param_spec(name)["global_shape"] == full_shapes[name],
              f"param_spec('{name}') = {model.param_spec(name)}")
        check(p.dtype == torch.float32 and p.requires_grad, f"{name}: {p.dtype}")
        if id(p) not in local_ids:
            check(p.numel() == 0 and p.grad is None, f"{name} of another stage is {p.shape}")


@smp.step
def train_step(model, x, y):
    loss = F.mse_loss(model(x), y)
    model.backward(loss)
    return loss


def train(model, optimizer, steps, first):
    for i in range(first, first + steps):
        g = torch.Generator().manual_seed(10 + i)
        x = torch.randn(BATCH * smp.dp_size(), IN, generator=g)
        y = torch.randn(BATCH * smp.dp_size(), OUT, generator=g)
        lo = smp.dp_rank() * BATCH
        optimizer.zero_grad()
        train_step(model, x[lo:lo + BATCH], y[lo:lo + BATCH])
        optimizer.step()


def snapshot(model, optimizer):
    sd = {k: v.clone() for k, v in model.local_state_dict().items() if torch.is_tensor(v)}
    return sd, copy.deepcopy(optimizer.local_state_dict())


def same_model(a, b, what):
    check(a.keys() == b.keys(), f"{what}: keys {sorted(a)} != {sorted(b)}")
    for k in a:
        check(torch.equal(a[k], b[k]), f"{what}: {k} differs")


def same_opt(a, b, what):
    sa, sb = a["state"], b["state"]
    check(sa.keys() == sb.keys(), f"{what}: optimizer state keys {sorted(sa)} != {sorted(sb)}")
    for i in sa:
        for k, v in sa[i].items():
            check(not torch.is_tensor(v) or torch.equal(v, sb[i][k]), f"{what}: state {i}/{k}")


def main():
    tp = 2 if LAYOUT == "pp2tp2" else 1
    shard = LAYOUT == "pp2rdp2"
    smp.init({"pipeline_parallel_degree": 2, "tensor_parallel_degree": tp, "ddp": True,
              "microbatches": 2, "shard_optimizer_state": shard})
    torch.manual_seed(1)
    plain = make_net()
    torch.manual_seed(1)
    with smp.tensor_parallelism():
        net = make_net()
    model = smp.DistributedModel(net)
    check_released(model, plain)
    optimizer = smp.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    train(model, optimizer, 2, 0)
    check_released(model, plain)

    local_names = {n for n, _ in model.local_named_parameters()} | {
        n for n, _ in model.local_named_buffers()
        if n.rpartition(".")[2] != "scratch"}  # non-persistent
    lsd = model.local_state_dict()
    check(set(lsd) - {"_smp_is_partial"} == local_names,
          f"local_state_dict keys {sorted(lsd)}, local {sorted(local_names)}")
    check(all(v.numel() > 0 for v in lsd.values() if torch.is_tensor(v)), "empty local entry")
    osd = optimizer.local_state_dict()
    check(set(osd["_smp_shard_specs"]) == {n for n, _ in model.get_module().named_parameters()},
          "optimizer specs cover every parameter")

    # ---- smp.save / smp.load of this stage's part ---------------------------------
    f = os.path.join(DIR, "local.pt")
    saved_model, saved_opt = snapshot(model, optimizer)
    if smp.rdp_rank() == 0 or shard:
        smp.save({"model": model.local_state_dict(), "opt": optimizer.local_state_dict()}, f,
                 partial=True)
    smp.barrier()
    train(model, optimizer, 1, 2)
    obj = smp.load(f, partial=True)
    model.load_state_dict(obj["model"], same_partition_load=True)
    optimizer.load_state_dict(obj["opt"])
    now_model, now_opt = snapshot(model, optimizer)
    same_model(now_model, saved_model, "smp.load")
    same_opt(now_opt, saved_opt, "smp.load")

    # ---- partial checkpoint: model and optimizer --------------------------------------
    ckpt = os.path.join(DIR, "ckpt")
    smp.save_checkpoint(ckpt, "3", partial=True, model=model, optimizer=optimizer)
    saved_model, saved_opt = snapshot(model, optimizer)
    train(model, optimizer, 2, 3)
    smp.resume_from_checkpoint(ckpt, partial=True)
    now_model, now_opt = snapshot(model, optimizer)
    same_model(now_model, saved_model, "partial checkpoint")
    same_opt(now_opt, saved_opt, "partial checkpoint")
    check_released(model, plain)

    # ---- full checkpoint: model ------------------------------------------------------
    smp.save_checkpoint(ckpt, "full", partial=False, model=model)
    saved_model, _ = snapshot(model, optimizer)
    train(model, optimizer, 1, 5)
    smp.resume_from_checkpoint(ckpt, tag="full", partial=False, load_optimizer=False)
    now_model, _ = snapshot(model, optimizer)
    same_model(now_model, saved_model, "full checkpoint")
    check_released(model, plain)

    # ---- the plain model's full state dict (every stage's entries) --------------------
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.5)
    full = plain.state_dict()
    result = model.load_state_dict(full, strict=True)
    check(not result.missing_keys and not result.unexpected_keys, f"load result {result}")
    check_released(model, plain)
    gathered = model.state_dict(gather_to_rank0=True) if smp.rdp_rank() == 0 else {}
    if smp.rank() == 0:
        same_model(gathered, full, "full state dict round trip")

    # ---- a plain torch optimizer state dict over every parameter ------------------------
    if tp == 1:
        ref_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
        plain(torch.ones(2, IN)).sum().backward()
        ref_opt.step()
        ref_sd = ref_opt.state_dict()
        optimizer.load_state_dict(ref_sd)
        names = [n for n, _ in plain.named_parameters()]
        local = {n for n, _ in model.local_named_parameters()}
        owned = {n for n, o in zip(optimizer._smp_names, optimizer._smp_owned) if o}
        by_param = {id(p): n for n, p in model.get_module().named_parameters()}
        loaded = {by_param[id(p)]: s for p, s in optimizer.optimizer.state.items()}
        want = local & owned
        check(set(loaded) == want, f"optimizer state loaded for {sorted(loaded)}, want "
              f"{sorted(want)}")
        for n in want:
            i = names.index(n)
            check(torch.equal(loaded[n]["exp_avg"], ref_sd["state"][i]["exp_avg"]),
                  f"exp_avg of {n}")
        train(model, optimizer, 1, 6)
        check_released(model, plain)

    smp.barrier()
    print(f"pipeline_release OK {smp.rank()}", flush=True)
    smp.shutdown()


if __name__ == "__main__":
    main()
