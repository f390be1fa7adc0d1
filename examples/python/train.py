"""The main smp demo: tensor- and data-parallel training with a sharded
checkpoint, saved by one job and resumed by the next.

    bash examples/run_demo.sh       # builds, then runs both phases on 8 ranks

    # by hand, after a build (PYTHONPATH=python):
    mpirun -np 8 python3 examples/python/train.py --phase train  --dir /tmp/smp-demo
    mpirun -np 8 python3 examples/python/train.py --phase resume --dir /tmp/smp-demo

Phase "train" trains a small network for --steps steps with tensor parallelism
(tensor_parallel_degree 2; the other factor of the world is data parallelism),
saves a partial checkpoint at --save-at with exactly the flow of the SageMaker
model parallel guide (model.local_state_dict(), optimizer.local_state_dict(),
smp.save(..., partial=True) on rdp_rank() == 0), keeps training to the end and
records the loss of every step. It also writes a full checkpoint (model and
optimizer state gathered to rank 0) and checks that stock
torch.load(weights_only=True) reads it into a plain, single-process PyTorch model.

Phase "resume" is a new job: it builds the model from a different random
initialisation, loads the partial checkpoint with smp.load, trains the remaining
steps and checks that every loss equals the uninterrupted run's (bit for bit)
and that the final parameters are identical. The last line on rank 0 is
"train: OK".
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import smp

VOCAB, HIDDEN, CLASSES, SEQ = 64, 32, 8, 4
GLOBAL_BATCH = 32


class Net(torch.nn.Module):
    """Embedding -> MLP -> classifier; the Linear and Embedding layers become
    tensor-parallel (smp.nn) inside smp.DistributedModel."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.fc1 = torch.nn.Linear(HIDDEN, 4 * HIDDEN)
        self.fc2 = torch.nn.Linear(4 * HIDDEN, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids):
        h = self.embed(ids).mean(dim=1)
        h = self.norm(h + self.fc2(F.gelu(self.fc1(h))))
        return self.head(h)


def batch(step):
    """This rank's share of the global batch of `step` (sharded by dp_rank, as
    smp's default batch semantics want)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = (ids.sum(dim=1) % CLASSES).long()
    per_rank = GLOBAL_BATCH // smp.dp_size()
    lo = smp.dp_rank() * per_rank
    return ids[lo:lo + per_rank], labels[lo:lo + per_rank]


def build(seed):
    torch.manual_seed(seed)
    with smp.tensor_parallelism():
        net = Net()
    model = smp.DistributedModel(net)
    # The guide's step 2: an optimizer over unique parameters.
    unique_params = []
    unique_params_set = set()
    for p in model.parameters():
        if p not in unique_params_set:
            unique_params.append(p)
            unique_params_set.add(p)
    del unique_params_set
    optimizer = smp.DistributedOptimizer(torch.optim.Adam(unique_params, lr=1e-2))
    return model, optimizer


def train_step(model, optimizer, step):
    ids, labels = batch(step)
    optimizer.zero_grad()
    loss = F.cross_entropy(model(ids), labels)
    model.backward(loss)
    optimizer.step()
    # The mean loss over the whole global batch, the same number on every rank.
    total = loss.detach().clone()
    smp.comm.allreduce(total, group=smp.DP_GROUP, op=smp.ReduceOp.AVG)
    return float(total)


def say(*args):
    if smp.rank() == 0:
        print(*args, flush=True)


def check(cond, what):
    if not cond:
        raise AssertionError(f"train.py check failed on rank {smp.rank()}: {what}")


def full_state(model):
    """The full model, gathered to rank 0 ({} elsewhere); collective over the
    ranks with rdp_rank() == 0."""
    return model.state_dict(gather_to_rank0=True) if smp.rdp_rank() == 0 else {}


def phase_train(args):
    model, optimizer = build(seed=0)
    ckpt = os.path.join(args.dir, "checkpoint.pt")
    losses = []
    for step in range(args.steps):
        if step == args.save_at:
            # Option 1 of the guide: a partial checkpoint, one file per (pp, tp) rank.
            model_dict = model.local_state_dict()
            opt_dict = optimizer.local_state_dict()
            if smp.rdp_rank() == 0:
                stats = smp.save({"model_state_dict": model_dict, "optimizer_state_dict": opt_dict,
                                  "step": step}, ckpt, partial=True)
                say(f"step {step}: saved partial checkpoint {ckpt}_<pp>_<tp> (rank 0: "
                    f"{stats['bytes']} bytes in {stats['seconds']:.3f} s)")
            smp.barrier()
        losses.append(train_step(model, optimizer, step))
        say(f"step {step:2d}  loss {losses[-1]:.6f}")

    # Option 2: the full model (and, beyond smp v1, the full optimizer state) on rank 0.
    model_full = full_state(model)
    opt_full = optimizer.state_dict()
    full_path = os.path.join(args.dir, "full.pt")
    if smp.rank() == 0:
        smp.save({"model_state_dict": model_full, "optimizer_state_dict": opt_full}, full_path,
                 partial=False)
        plain = Net()
        loaded = torch.load(full_path, weights_only=True)  # stock PyTorch reads smp's file
        plain.load_state_dict(loaded["model_state_dict"], strict=True)
        ids, _ = batch(0)
        with torch.no_grad():
            check(plain(ids).shape == (ids.shape[0], CLASSES), "plain model output shape")
        with open(os.path.join(args.dir, "losses.json"), "w") as f:
            json.dump(losses, f)
        torch.save({k: v.clone() for k, v in model_full.items()},
                   os.path.join(args.dir, "final_params.pt"))
        say(f"full checkpoint {full_path}: torch.load(weights_only=True) -> plain Net: ok")
    smp.barrier()
    say("train: phase train done")


def phase_resume(args):
    model, optimizer = build(seed=12345)  # a different init: everything must come from the checkpoint
    ckpt = os.path.join(args.dir, "checkpoint.pt")
    checkpoint = smp.load(ckpt, partial=True)
    model.load_state_dict(checkpoint["model_state_dict"], same_partition_load=True)
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    start = int(checkpoint["step"])
    say(f"resumed from {ckpt}_<pp>_<tp> at step {start}")
    with open(os.path.join(args.dir, "losses.json")) as f:
        expected = json.load(f)
    for step in range(start, args.steps):
        loss = train_step(model, optimizer, step)
        say(f"step {step:2d}  loss {loss:.6f}  (uninterrupted run: {expected[step]:.6f})")
        check(loss == expected[step], f"step {step}: resumed loss {loss!r} != {expected[step]!r}")
    final = full_state(model)
    if smp.rank() == 0:
        reference = torch.load(os.path.join(args.dir, "final_params.pt"), weights_only=True)
        check(final.keys() == reference.keys(), "parameter names")
        for name, tensor in reference.items():
            check(torch.equal(final[name], tensor), f"final parameter {name} differs")
        say("resumed run matches the uninterrupted run: every loss and every parameter identical")
    smp.barrier()
    say("train: OK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["train", "resume"], required=True)
    parser.add_argument("--dir", required=True, help="checkpoint folder (shared by all ranks)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-at", type=int, default=6)
    args = parser.parse_args()

    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    tp = 2 if world % 2 == 0 else 1
    smp.init({"tensor_parallel_degree": tp, "ddp": True})
    say(f"smp {smp.__version__}: {smp.size()} ranks, tp {smp.tp_size()} x rdp {smp.rdp_size()} "
        f"(pp {smp.pp_size()})")
    if smp.rank() == 0:
        os.makedirs(args.dir, exist_ok=True)
    smp.barrier()
    (phase_train if args.phase == "train" else phase_resume)(args)
    smp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
