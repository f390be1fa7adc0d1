"""The Python half of the C++/Python checkpoint interoperability test: the same
model, data and files as examples/cpp/checkpoint_tp.cc.

    mpirun -np 4 python checkpoint_interop.py <dir> <tp> <shard 0|1> save
    mpirun -np 4 python checkpoint_interop.py <dir> <tp> <shard 0|1> resume <atol>

save: trains 3 steps, saves Option 1 (<dir>/checkpoint.pt_<pp>_<tp>[_<rdp>]:
model.local_state_dict() and optimizer.local_state_dict()) and Option 2
(<dir>/full.pt: the full model and optimizer.state_dict()), trains 2 more steps
and writes <dir>/reference.pt (full parameters right after the save and at the
end, and the 2 losses). resume: for each option, a differently initialised
model and optimizer load the checkpoint (written by this script or by
checkpoint_tp --phase save) and train the same 2 steps; parameters after
loading, losses and final parameters must match reference.pt within atol.
Prints "checkpoint_interop OK <rank>".
"""

import collections
import os
import sys

import torch
import torch.nn.functional as F

import smp

DIR, TP, SHARD, PHASE = sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])), sys.argv[4]
ATOL = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
VOCAB, DIM, HIDDEN, OUT, BATCH, SEQ = 32, 16, 32, 4, 4, 5
STEPS, MORE = 3, 2


class Net(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        # The C++ model's layout: embedding and the first two Linear layers
        # tensor-parallel (replaced by smp.DistributedModel), the head not.
        with smp.tensor_parallelism():
            self.emb = torch.nn.Embedding(VOCAB, DIM)
            self.fc1 = torch.nn.Linear(DIM, HIDDEN)
            self.fc2 = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, OUT)

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        h = torch.relu(self.fc1(h))
        h = torch.relu(self.fc2(h))
        return self.head(h)


def batch(step, shard):
    ids = (torch.arange(BATCH * SEQ).reshape(BATCH, SEQ) * 3 + step * 31 + shard * 17) % VOCAB
    target = torch.sin((torch.arange(BATCH * OUT, dtype=torch.float32).reshape(BATCH, OUT)
                        + step * 7 + shard * 13) * 0.1)
    return ids, target


def build(seed):
    smp.init({"tensor_parallel_degree": TP, "ddp": True, "shard_optimizer_state": SHARD})
    torch.manual_seed(seed + smp.rank())
    model = smp.DistributedModel(Net(seed))
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
def fwd_bwd(model, ids, target):
    loss = F.mse_loss(model(ids), target)
    model.backward(loss)
    return loss


def train_step(model, optimizer, step):
    optimizer.zero_grad()
    loss = fwd_bwd(model, *batch(step, smp.dp_rank())).reduce_mean()
    optimizer.step()
    losses = smp.allgather(float(loss), smp.CommGroup.DP_GROUP)
    return sum(losses) / len(losses)


def full_params(model):
    if smp.rdp_rank() != 0:
        return {}
    return collections.OrderedDict(
        (k, v.detach().clone()) for k, v in model.state_dict(gather_to_rank0=True).items())


failures = []


def check(cond, what):
    if not cond:
        print(f"checkpoint_interop rank {smp.rank()}: {what}", file=sys.stderr, flush=True)
        failures.append(what)


def compare_params(got, want, what):
    if smp.rank() != 0:
        return
    for k, v in want.items():
        if k not in got:
            check(False, f"{what}: parameter {k} is missing")
        elif got[k].shape != v.shape or not torch.allclose(got[k], v, rtol=0, atol=ATOL):
            check(False, f"{what}: parameter {k} differs by {(got[k] - v).abs().max().item()}")


def save_phase():
    model, optimizer = build(0)
    for step in range(STEPS):
        train_step(model, optimizer, step)
    # Option 1: partial
    model_dict = model.local_state_dict()
    # With sharding every rdp rank saves the part it owns (the _<pp>_<tp>_<rdp>
    # files); local_state_dict()'s v1 default, gather_if_shard=True, would
    # gather every owner's part on each rank.
    opt_dict = optimizer.local_state_dict(gather_if_shard=False)
    if smp.rdp_rank() == 0 or SHARD:
        smp.save({"model_state_dict": model_dict, "optimizer_state_dict": opt_dict},
                 os.path.join(DIR, "checkpoint.pt"), partial=True)
    # Option 2: full model and full optimizer state
    opt_full = optimizer.state_dict()
    if smp.rdp_rank() == 0:
        model_full = model.state_dict(gather_to_rank0=True)
        if smp.rank() == 0:
            smp.save({"model_state_dict": model_full, "optimizer_state_dict": opt_full},
                     os.path.join(DIR, "full.pt"), partial=False)
    smp.barrier()
    saved = full_params(model)
    losses = [train_step(model, optimizer, s) for s in range(STEPS, STEPS + MORE)]
    final = full_params(model)
    if smp.rank() == 0:
        smp.save({"saved_params": saved, "final_params": final, "losses": losses},
                 os.path.join(DIR, "reference.pt"), partial=False)
    smp.shutdown()


def resume_phase():
    ref = smp.load(os.path.join(DIR, "reference.pt"), partial=False)
    for partial in (True, False):
        what = "Option 1 (partial)" if partial else "Option 2 (full)"
        model, optimizer = build(1000)
        if partial:
            checkpoint = smp.load(os.path.join(DIR, "checkpoint.pt"), partial=True)
            # Saved on another layout: smp.load resharded it (docs/api.md, "Resharding").
            same = "_smp_resharded_from" not in checkpoint["model_state_dict"]
            model.load_state_dict(checkpoint["model_state_dict"], same_partition_load=same)
        else:
            checkpoint = smp.load(os.path.join(DIR, "full.pt"), partial=False)
            model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        compare_params(full_params(model), ref["saved_params"], f"{what} right after loading")
        losses = [train_step(model, optimizer, s) for s in range(STEPS, STEPS + MORE)]
        if smp.rank() == 0:
            for s, (a, b) in enumerate(zip(losses, ref["losses"])):
                check(abs(a - b) <= ATOL, f"{what}: loss of step {STEPS + s} is {a}, "
                      f"uninterrupted {b}")
        compare_params(full_params(model), ref["final_params"], f"{what} after resuming")
        smp.shutdown()


def main():
    if PHASE == "save":
        save_phase()
    elif PHASE == "resume":
        resume_phase()
    else:
        raise SystemExit(f"unknown phase {PHASE!r}")
    if failures:
        raise SystemExit(1)
    print(f"checkpoint_interop OK {int(os.environ.get('OMPI_COMM_WORLD_RANK', 0))}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        raise
