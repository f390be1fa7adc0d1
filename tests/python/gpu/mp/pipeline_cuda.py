"""Pipelined training on CUDA, one GPU per rank (pp = world size): activations
and gradients travel over NCCL (headers over the host communicator). Training
with both schedules and 4 microbatches equals plain PyTorch on the full batch
on one GPU. Prints "pipeline_cuda: OK" on every rank at the end.

    mpirun -np 2 python3 tests/python/gpu/mp/pipeline_cuda.py
"""

import os

import torch
import torch.nn.functional as F

import smp

torch.backends.cuda.matmul.allow_tf32 = False


def make_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
        torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8))


def data(i, device):
    g = torch.Generator().manual_seed(50 + i)
    return torch.randn(16, 32, generator=g).to(device), torch.randn(16, 8, generator=g).to(device)


@smp.step
def train_step(model, x, y):
    loss = F.mse_loss(model(x), y)
    model.backward(loss)
    return loss


for pipeline in ("interleaved", "simple"):
    smp.init({"pipeline_parallel_degree": int(os.environ.get("OMPI_COMM_WORLD_SIZE", "2")),
              "microbatches": 4, "pipeline": pipeline})
    device = torch.device("cuda", smp.local_rank())
    torch.cuda.set_device(device)
    ref = make_model().to(device)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    pm = smp.pipeline.PipelineModule(make_model().to(device))
    opt = torch.optim.SGD(pm.local_parameters(), lr=0.1)
    for i in range(3):
        x, y = data(i, device)
        ref_opt.zero_grad()
        ref_loss = F.mse_loss(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        opt.zero_grad()
        loss = train_step(pm, x, y).reduce_mean()
        assert loss.is_cuda and abs(loss.item() - ref_loss.item()) < 1e-5, (loss, ref_loss)
        opt.step()
    names = {id(p): n for n, p in pm.module.named_parameters()}
    ref_params = dict(ref.named_parameters())
    for p in pm.local_parameters():
        torch.testing.assert_close(p, ref_params[names[id(p)]], atol=1e-5, rtol=0)
    smp.shutdown()
print("pipeline_cuda: OK", flush=True)
