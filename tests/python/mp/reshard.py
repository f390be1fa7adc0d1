"""Resharding a partial checkpoint (issue 12), under mpirun.

    mpirun -np N python reshard.py save <dir> <pp> <tp> <shard 0|1> <adam|sgd>
    mpirun -np M python reshard.py load <dir> <pp> <tp> <shard 0|1> <adam|sgd>

save: trains 3 steps on the layout, saves the seed's Option 1 checkpoint
(model + optimizer local state dicts + "epoch"), records the full model and
the full optimizer state (by parameter name) and, after one more step, the
full model again (the uninterrupted run) in <dir>/ref.pt.
load: builds the model with another initialisation on another layout, loads
the checkpoint with smp.load(partial=True) and the unchanged load_state_dict
calls, checks that the loaded model and optimizer state equal the saved ones
bit for bit, that same_partition_load=True is refused naming both layouts,
that rdp replicas read the bytes they share once per group (cooperative read),
and that one more step gives the uninterrupted run's parameters (atol 1e-6).
Prints "reshard OK <rank>".
"""

import os
import sys

import torch
import torch.nn.functional as F

import smp
from transformer_block import Block

MODE, DIR = sys.argv[1], sys.argv[2]
PP, TP, SHARD, OPT = int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5])), sys.argv[6]
# load: smp.load + load_state_dict; resume: smp.resume_from_checkpoint of the
# smp.save_checkpoint the save mode also writes.
API = sys.argv[7] if len(sys.argv) > 7 else "load"
VOCAB, CLASSES, SEQ, GLOBAL_BATCH = 11, 3, 3, 8
CKPT = os.path.join(DIR, "ckpt.pt")
REF = os.path.join(DIR, f"ref_{OPT}.pt")


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # 11 rows split by vocabulary (dim 0) and 5 columns split by embedding
        # dimension (dim 1): uneven under tp 2 and 4.
        self.vocab = torch.nn.Embedding(VOCAB, 3)
        self.dim = torch.nn.Embedding(VOCAB, 5)
        smp.set_tensor_parallelism(self.vocab, vocab_parallel=True)
        smp.set_tensor_parallelism(self.dim)

    def forward(self, ids):
        return torch.cat([self.vocab(ids), self.dim(ids)], dim=-1)


class Mid(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.fc = torch.nn.Linear(n_in, n_out)  # smp.nn.DistributedLinear: split by input
        smp.set_tensor_parallelism(self.fc)

    def forward(self, x):
        return torch.relu(self.fc(x))


def block_init_hook(hidden=8, heads=4, head_size=2, inter=10):
    return (), dict(num_attention_heads=heads, attention_head_size=head_size, hidden_size=hidden,
                    intermediate_size=inter, attention_dropout_prob=0.0, hidden_dropout_prob=0.0,
                    activation="gelu", pre_layernorm=True, post_layernorm=False)


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(6, CLASSES)  # replicated

    def forward(self, x):
        return self.out(x).mean(dim=1)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = Embed()
        with smp.tensor_parallelism():  # records Block's arguments for the replacement
            self.block = Block()
        self.mid1 = Mid(8, 10)
        self.mid2 = Mid(10, 6)  # 10 inputs: uneven under tp 4
        self.head = Head()

    def forward(self, ids):
        return self.head(self.mid2(self.mid1(self.block(self.embed(ids)))))


def build(seed):
    smp.tp_register_with_module(Block, smp.nn.DistributedTransformerLayer,
                                init_hook=block_init_hook)
    torch.manual_seed(seed)
    model = smp.DistributedModel(Net())
    if OPT == "adam":
        # eps 1e-3: attention.key.bias has a zero gradient in exact arithmetic
        # (softmax ignores a per-query constant), so its gradient is rounding
        # noise that differs between layouts; Adam's default eps (1e-8) would
        # turn that noise into lr-sized steps, eps 1e-3 keeps them negligible.
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9)
    return model, smp.DistributedOptimizer(opt)


@smp.step
def train_step(model, ids, y):
    loss = F.cross_entropy(model(ids), y)
    model.backward(loss)
    return loss


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // smp.dp_size()
    lo = smp.dp_rank() * per
    return ids[lo:lo + per], y[lo:lo + per]


def step(model, optimizer, i):
    optimizer.zero_grad()
    train_step(model, *data(i))
    optimizer.step()


def check(cond, what):
    if not cond:
        raise AssertionError(f"reshard rank {smp.rank()} ({MODE} pp{PP} tp{TP}): {what}")


def full_model(model):
    return {k: v.detach().clone() for k, v in model.state_dict(gather_to_rank0=True).items()}


def full_optimizer(optimizer):
    """Every parameter's full optimizer state, by name (gathered over PP_GROUP too)."""
    osd = optimizer.state_dict()
    by_name = {}
    for group, names in zip(osd["param_groups"], osd["_smp_param_names"]):
        for i, n in zip(group["params"], names):
            if i in osd["state"]:
                by_name[n] = {k: (v.clone() if torch.is_tensor(v) else v)
                              for k, v in osd["state"][i].items()}
    merged = {}
    for part in smp.allgather(by_name, smp.PP_GROUP):
        merged.update(part)
    return merged


def tensor_bytes(x):
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return 0


def check_cooperative(ckpt):
    """rdp replicas read the bytes they share once per RDP_GROUP: together they
    read less than each reading all its tensors (the model bytes once, not
    rdp_size times)."""
    stats = smp.checkpoint.last_load_stats
    check("cooperative" in stats, f"resharded load with rdp_size {smp.rdp_size()} did not read "
                                  f"cooperatively: {stats}")
    check(stats["cooperative"]["group_size"] == smp.rdp_size(), f"group {stats['cooperative']}")
    model_bytes = tensor_bytes(ckpt["model_state_dict"])
    rows = smp.allgather((stats["bytes"], tensor_bytes(ckpt["model_state_dict"])
                          + tensor_bytes(ckpt["optimizer_state_dict"]["state"])), smp.RDP_GROUP)
    read, own = sum(r[0] for r in rows), sum(r[1] for r in rows)
    check(read <= own - (smp.rdp_size() - 1) * model_bytes,
          f"the rdp group read {read} bytes for {own} bytes of state ({model_bytes} model bytes "
          f"per replica)")


def layout_name():
    return f"pp{smp.pp_size()}tp{smp.tp_size()}rdp{smp.rdp_size()}"


def main():
    smp.init({"pipeline_parallel_degree": PP, "tensor_parallel_degree": TP, "ddp": True,
              "microbatches": 2 if PP > 1 else 1, "shard_optimizer_state": SHARD})
    if MODE == "save":
        model, optimizer = build(seed=0)
        for i in range(3):
            step(model, optimizer, i)
        if smp.rdp_rank() == 0 or SHARD:
            smp.save({"model_state_dict": model.local_state_dict(),
                      "optimizer_state_dict": optimizer.local_state_dict(gather_if_shard=False),
                      "epoch": 7},
                     CKPT, partial=True)
        smp.barrier()
        smp.save_checkpoint(os.path.join(DIR, "sc"), "t", partial=True, model=model,
                            optimizer=optimizer, user_content={"epoch": 7})
        before, opt_before = full_model(model), full_optimizer(optimizer)
        step(model, optimizer, 3)
        after = full_model(model)
        if smp.rank() == 0:
            torch.save({"before": before, "opt_before": opt_before, "after": after,
                        "layout": layout_name()}, REF)
        smp.barrier()
    else:
        ref = torch.load(REF, weights_only=True)
        model, optimizer = build(seed=1)
    if MODE == "load" and API == "resume":
        uc = smp.resume_from_checkpoint(os.path.join(DIR, "sc"), tag="t")
        check(uc == {"epoch": 7}, f"user content {uc!r}")
    elif MODE == "load":
        ckpt = smp.load(CKPT, partial=True)
        check(ckpt["epoch"] == 7, f"user entry epoch: {ckpt['epoch']!r}")
        if ref["layout"] != layout_name():
            try:
                model.load_state_dict(ckpt["model_state_dict"], same_partition_load=True)
            except smp.CheckpointError as e:
                text = str(e)
                check("same_partition_load=False" in text and f"pp_size {smp.pp_size()}" in text
                      and "saved with" in text, f"same_partition_load=True error: {text}")
            else:
                check(False, "same_partition_load=True on a changed layout did not raise")
        if smp.rdp_size() > 1:
            check_cooperative(ckpt)
        model.load_state_dict(ckpt["model_state_dict"], same_partition_load=False)
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    if MODE == "load":
        loaded, opt_loaded = full_model(model), full_optimizer(optimizer)
        if smp.rank() == 0:
            check(loaded.keys() == ref["before"].keys(), "model keys")
            for k, v in ref["before"].items():
                check(torch.equal(loaded[k], v), f"loaded '{k}' differs from the saved one")
            check(opt_loaded.keys() == ref["opt_before"].keys(),
                  f"optimizer state names {sorted(opt_loaded)} vs {sorted(ref['opt_before'])}")
            for n, st in ref["opt_before"].items():
                check(st.keys() == opt_loaded[n].keys(), f"state keys of '{n}'")
                for k, v in st.items():
                    w = opt_loaded[n][k]
                    same = torch.equal(w.cpu(), v.cpu()) if torch.is_tensor(v) else w == v
                    check(same, f"optimizer state '{k}' of '{n}' differs from the saved one")
        step(model, optimizer, 3)
        after = full_model(model)
        if smp.rank() == 0:
            for k, v in ref["after"].items():
                err = (after[k] - v).abs().max().item()
                check(err <= 1e-6, f"after one step '{k}' differs by {err} from the "
                                   f"uninterrupted run on {ref['layout']}")
        smp.barrier()
    print(f"reshard OK {smp.rank()}", flush=True)
    smp.shutdown()


if __name__ == "__main__":
    main()
