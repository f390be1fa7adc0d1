"""Streaming full save (issue 16), under mpirun:

    mpirun -np N python ckpt_stream.py <dir> <pp> <tp>

Trains one step, then writes the full model twice: smp.save of
model.state_dict(gather_to_rank0=True) (plain.pt) and
smp.checkpoint.save_full_streaming (stream.pt); rank 0 checks that every ZIP
record is identical except the random .data/serialization_id and the index's
save id, and that smp.save_checkpoint(partial=False) (streaming) writes the
same state. Prints "stream OK <rank>".
"""

import json
import os
import sys
import zipfile

import torch
import torch.nn.functional as F

import smp

DIR, PP, TP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
VOCAB = 11


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vocab = torch.nn.Embedding(VOCAB, 3)
        self.dim = torch.nn.Embedding(VOCAB, 5)
        smp.set_tensor_parallelism(self.vocab, vocab_parallel=True)
        smp.set_tensor_parallelism(self.dim)

    def forward(self, ids):
        return torch.cat([self.vocab(ids), self.dim(ids)], dim=-1)


class Mid(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.fc = torch.nn.Linear(n_in, n_out)
        smp.set_tensor_parallelism(self.fc)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.out(x).mean(dim=1)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = Embed()
        self.mid1 = Mid(8, 10)
        self.mid2 = Mid(10, 6)
        self.head = Head()

    def forward(self, ids):
        return self.head(self.mid2(self.mid1(self.embed(ids))))


@smp.step
def train_step(model, ids, y):
    loss = F.cross_entropy(model(ids), y)
    model.backward(loss)
    return loss


def records(path):
    with zipfile.ZipFile(path) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}


def main():
    smp.init({"pipeline_parallel_degree": PP, "tensor_parallel_degree": TP, "ddp": True,
              "microbatches": 2 if PP > 1 else 1})
    torch.manual_seed(0)
    model = smp.DistributedModel(Net())
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 3), generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    opt.zero_grad()
    train_step(model, ids, y)
    opt.step()
    plain, stream = os.path.join(DIR, "plain.pt"), os.path.join(DIR, "stream.pt")
    if smp.rdp_rank() == 0:
        sd = model.state_dict(gather_to_rank0=True)
        if smp.rank() == 0:
            smp.save(sd, plain, partial=False)
        stats = smp.checkpoint.save_full_streaming(model, stream)
        assert (stats is not None) == (smp.rank() == 0), stats
    smp.save_checkpoint(os.path.join(DIR, "sc"), "full", partial=False, model=model)
    if smp.rank() == 0:
        a, b = records(plain), records(stream)
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        for k in a:
            if k in (".data/serialization_id", "smp/index.json"):
                continue
            assert a[k] == b[k], f"record {k} differs between the streaming and plain full save"
        ia, ib = json.loads(a["smp/index.json"]), json.loads(b["smp/index.json"])
        assert ia["tensors"] == ib["tensors"], "index tensors differ"
        loaded = torch.load(os.path.join(DIR, "sc", "full"), weights_only=True)
        assert loaded.keys() == sd.keys()
        for k, v in sd.items():
            assert torch.equal(loaded[k], v), k
    smp.barrier()
    print(f"stream OK {smp.rank()}", flush=True)
    smp.shutdown()


if __name__ == "__main__":
    main()
