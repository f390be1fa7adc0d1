"""What the scripts of this folder share besides their training loops: the
model (a chain of four layers, so that it splits over 2 or 4 pipeline stages),
the data, the device, and the plain-PyTorch reference they are checked against.

The scripts themselves are written the way smp v1's public examples and API
documentation write a training script (`smp.init()` with the configuration from
SM_HP_MP_PARAMETERS, `@smp.step` functions, `model.backward(loss)`, StepOutput
read on some ranks only); they run unchanged on every layout the test picks.

The reference is the same model trained with plain PyTorch on the whole global
batch; smp's rank with data-parallel rank d trains on rows
[d * share, (d + 1) * share) of it. A loss read on a rank is compared with the
reference model's loss on that rank's rows, before the reference's update of
the same step (atol 1e-5).

V1_DEVICE=cuda (the GPU tests) runs on cuda:local_rank.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import smp

IN, HIDDEN, CLASSES = 20, 24, 10
GLOBAL_BATCH = 16
STEPS = 4
ATOL = 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        x = F.relu(self.fc3(x))
        return F.log_softmax(self.fc4(x), 1)


def device():
    if os.environ.get("V1_DEVICE") == "cuda":
        torch.cuda.set_device(smp.local_rank())
        return torch.device("cuda", smp.local_rank())
    return torch.device("cpu")


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,),
                                                                      generator=g)


def my_rows():
    share = GLOBAL_BATCH // smp.dp_size()
    return slice(smp.dp_rank() * share, (smp.dp_rank() + 1) * share)


def batches(dev):
    """(data, target) of this rank's rows for each step (a DistributedSampler
    over dp_size() replicas would give the same)."""
    for step in range(STEPS):
        x, y = global_batch(step)
        yield x[my_rows()].to(dev), y[my_rows()].to(dev)


class Reference:
    """Plain PyTorch: the same model trained on the whole global batch."""

    def __init__(self, dev, lr=0.05):
        torch.manual_seed(1)
        self.model = Net().to(dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        self.dev = dev
        self.step = 0
        self.losses = []       # per step: loss on this rank's rows, before the update
        self.outputs = []      # per step: output on this rank's rows, before the update

    def train_step(self):
        x, y = global_batch(self.step)
        x, y = x.to(self.dev), y.to(self.dev)
        with torch.no_grad():
            out = self.model(x[my_rows()])
            self.outputs.append(out)
            self.losses.append(F.nll_loss(out, y[my_rows()]).item())
        self.opt.zero_grad()
        F.nll_loss(self.model(x), y).backward()
        self.opt.step()
        self.step += 1

    def run(self):
        for _ in range(STEPS):
            self.train_step()
        return self


def check_close(what, got, expected):
    got_t = torch.as_tensor(got, dtype=torch.float64).cpu()
    exp_t = torch.as_tensor(expected, dtype=torch.float64).cpu()
    if got_t.shape != exp_t.shape or not torch.allclose(got_t, exp_t, atol=ATOL, rtol=0):
        raise AssertionError(
            f"rank {smp.rank()} (pp {smp.pp_rank()} tp {smp.tp_rank()} rdp {smp.rdp_rank()}): "
            f"{what}: smp {got_t.flatten()[:6].tolist()} (shape {tuple(got_t.shape)}) != plain "
            f"PyTorch {exp_t.flatten()[:6].tolist()} (shape {tuple(exp_t.shape)})")

