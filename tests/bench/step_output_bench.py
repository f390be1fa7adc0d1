"""What handing a step's results to every pipeline stage costs (not a test).

smp.step moves the last stage's per-microbatch return values to every rank of
its PP_GROUP once per step (smp.pipeline.engine.share_results: one pickled
object broadcast for the structure and Python values, one tensor broadcast per
dtype for the tensors), so that StepOutput is a local object everywhere. This
times that transfer alone for what training and evaluation steps return:

- a scalar loss per microbatch (a training step returning its loss);
- the loss and logits of shape [microbatch rows, classes] (a training step
  returning (output, loss)), for growing sizes;

and, for scale, one pipelined training step of a small MLP with the same
microbatches (the step includes one transfer of its loss and logits).

    mpirun -np 2 python tests/bench/step_output_bench.py    # pp = world size
    SMP_BENCH_DEVICE=cuda mpirun -np 2 python tests/bench/step_output_bench.py

Environment: SMP_BENCH_DEVICE (cpu, or cuda: NCCL), SMP_BENCH_MICROBATCHES
(default 4), SMP_BENCH_REPEAT (default 20: the median is reported). Rank 0
prints a table; each time is the slowest stage's.
"""

import os
import statistics
import time

import torch
import torch.nn.functional as F

import smp
from smp.pipeline import engine


def slowest(seconds):
    t = torch.tensor([seconds], dtype=torch.float64)
    smp.comm.allreduce(t, group=smp.PP_GROUP, op=smp.ReduceOp.MAX)
    return float(t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, repeat):
    fn()  # warm up
    times = []
    for _ in range(repeat):
        smp.barrier(smp.PP_GROUP)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(slowest(time.perf_counter() - start))
    return statistics.median(times)


def main():
    smp.init({"pipeline_parallel_degree": int(os.environ.get("OMPI_COMM_WORLD_SIZE",
                                                             os.environ.get("WORLD_SIZE", 2))),
              "microbatches": int(os.environ.get("SMP_BENCH_MICROBATCHES", 4))})
    kind = os.environ.get("SMP_BENCH_DEVICE", "cpu")
    if kind == "cuda":
        torch.cuda.set_device(smp.local_rank())
    device = torch.device(kind, smp.local_rank()) if kind == "cuda" else torch.device("cpu")
    repeat = int(os.environ.get("SMP_BENCH_REPEAT", 20))
    mbs = smp.config()["microbatches"]
    last = smp.pp_rank() == smp.pp_size() - 1
    rows = []

    def transfer(results):
        return lambda: engine.share_results(results if last else None)

    loss = [torch.tensor(1.5, device=device) for _ in range(mbs)]
    rows.append(("scalar loss", 4 * mbs, time_it(transfer(loss), device, repeat)))
    for rows_mb, classes in ((8, 10), (32, 1000), (8, 50257), (32, 50257)):
        results = [(torch.randn(rows_mb, classes, device=device), torch.tensor(1.5, device=device))
                   for _ in range(mbs)]
        nbytes = mbs * (rows_mb * classes + 1) * 4
        rows.append((f"logits {rows_mb}x{classes} + loss", nbytes,
                     time_it(transfer(results), device, repeat)))

    torch.manual_seed(0)
    model = smp.DistributedModel(torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU())
          for _ in range(smp.pp_size())], torch.nn.Linear(256, 10)))
    model.to(device)
    opt = smp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01))

    @smp.step
    def train_step(model, x, y):
        out = model(x)
        loss = F.cross_entropy(out, y)
        model.backward(loss)
        return out, loss

    x = torch.randn(32 * mbs, 256, device=device)
    y = torch.randint(0, 10, (32 * mbs,), device=device)

    def one_step():
        opt.zero_grad()
        train_step(model, x, y)
        opt.step()

    step_s = time_it(one_step, device, repeat)
    if smp.rank() == 0:
        print(f"step output transfer, pp {smp.pp_size()}, {mbs} microbatches, {device.type}, "
              f"median of {repeat}")
        print(f"{'what':<32} {'bytes':>12} {'ms':>9} {'GB/s':>7}")
        for what, nbytes, sec in rows:
            print(f"{what:<32} {nbytes:>12} {sec * 1e3:>9.3f} {nbytes / sec / 1e9:>7.2f}")
        print(f"{'train step, 32x256 MLP, 32 rows/mb':<32} {'':>12} {step_s * 1e3:>9.3f}")
    smp.shutdown()


if __name__ == "__main__":
    main()
